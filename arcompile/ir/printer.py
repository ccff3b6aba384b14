"""Text form of a graph, one line per node, for ``arcompile inspect`` and IR dumps."""

from __future__ import annotations

from typing import Any

from arcompile.ir.graph import Graph, Value, format_type


def _fmt(a: Any) -> str:
    if isinstance(a, Value):
        return f"%{a.name}"
    if isinstance(a, list):
        return "[" + ", ".join(_fmt(x) for x in a) + "]"
    if isinstance(a, tuple):
        return "(" + ", ".join(_fmt(x) for x in a) + ")"
    if isinstance(a, float):
        return f"{a:g}"
    return str(a)


def _values(a: Any):
    if isinstance(a, Value):
        yield a
    elif isinstance(a, (list, tuple)):
        for x in a:
            yield from _values(x)


def print_graph(graph: Graph, show_constants: bool = False, limit: int | None = None) -> str:
    ins = ", ".join(repr(v) for v in graph.inputs)
    outs = ", ".join(repr(v) for v in graph.outputs)
    lines = [f"graph {graph.name}({ins}) -> ({outs}) {{"]
    body = [n for n in graph.nodes() if n.op != "arc.input"]
    n_const = sum(1 for n in body if n.op == "arc.constant")
    if not show_constants:
        body = [n for n in body if n.op != "arc.constant"]
        lines.append(f"  # {n_const} constants (weights) not shown; --constants shows them")
    for i, node in enumerate(body):
        if limit is not None and i >= limit:
            lines.append(f"  # ... {len(body) - limit} more nodes")
            break
        outs_txt = ", ".join(repr(v) for v in node.outputs) or "()"
        attrs = node.resolved_attrs()
        # arc.* ops keep their operands in `inputs` only; aten ops name them in attributes
        referenced = {id(v) for v in _values(list(attrs.values()))}
        operands = [_fmt(v) for v in node.inputs if id(v) not in referenced]
        args = ", ".join(operands + [f"{k}={_fmt(v)}" for k, v in attrs.items()])
        where = f"  # {node.module}" if node.module else ""
        lines.append(f"  {outs_txt} = {node.op}({args}){where}")
    lines.append("  return " + ", ".join(f"%{v.name}" for v in graph.outputs))
    lines.append("}")
    return "\n".join(lines)


def summary(graph: Graph) -> dict[str, int]:
    """Op histogram, used by optimize's report and the profile."""
    counts: dict[str, int] = {}
    for n in graph.nodes():
        counts[n.op] = counts.get(n.op, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def type_of(v: Value) -> str:
    return format_type(v.dtype, v.shape)
