"""Proving that an attention mask is causal, whatever ops the model built it with.

A mask is accepted only when (1) it depends on shapes alone: walking its inputs back, the
graph input (the tokens) is reached only through ops that read a shape (``sym_size``,
``new_ones``, ``full_like`` …), never its values; and (2) evaluated with the reference
interpreter for several sizes (B in 1, 2 and T in 1, 2, 3, 7, 16), the positions it keeps are
exactly the causal pattern: key j visible to query i iff ``j <= i + (S - L)``.

    keep = mask                         # mask_kind "bool": True keeps
    keep = ~mask                        # masked_fill(scores, mask, -inf): True drops
    keep = bias == 0, bias <= NEG       # mask_kind "additive": 0 keeps, -inf-like drops

Because the check runs the model's own mask ops, HF's position/cumsum/index construction,
nanoGPT's sliced tril buffer and a ``where(mask, 0, finfo.min)`` bias all pass, and a sliding
window or a bidirectional mask fails with the size where it differed.
"""

from __future__ import annotations

from typing import Any

import torch

from arcompile.ir.graph import SYM_DTYPES, Graph, Node, Value
from arcompile.ir.interpreter import evaluate_node

# Ops whose result depends only on the shape (and dtype) of their first input.
SHAPE_ONLY = {"aten.sym_size.int", "aten.sym_size", "aten.sym_numel", "aten.new_ones",
              "aten.new_zeros", "aten.new_full", "aten.new_empty", "aten.full_like",
              "aten.ones_like", "aten.zeros_like", "aten.empty_like"}
# A bias at or below this drops the key: exp(-1e4) is 0 in float32 and every float dtype.
NEG = -1e4
SIZES = [(1, 1), (2, 2), (1, 3), (2, 7), (1, 16)]


def is_neg_fill(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x <= NEG


def mask_reason(mask: Value, keep: str, query: Value, key: Value) -> str | None:
    """None when ``mask`` is causal for ``query`` against ``key``; otherwise why not.

    ``keep`` says how to read the mask: ``"true"`` (True keeps), ``"false"`` (True drops) or
    ``"additive"`` (0 keeps, a value <= NEG drops).
    """
    nodes, why = _shape_only_ancestors(mask)
    if why:
        return why
    graph = mask.graph
    for b, t in SIZES:
        binding = _binding(graph, b, t)
        if isinstance(binding, str):
            return binding
        try:
            m = _evaluate(mask, nodes, binding)
            length, source = (_size(d, binding) for d in (query.shape[-2], key.shape[-2]))
            heads = _size(query.shape[1], binding)
            kept = _keep(m, keep)
        except (ValueError, RuntimeError, TypeError, KeyError, IndexError) as e:
            return f"mask could not be evaluated at B={b}, T={t}: {e}"
        if isinstance(kept, str):
            return kept
        target = (b, heads, length, source)
        try:
            kept = torch.broadcast_to(kept, target)
        except RuntimeError:
            return f"mask of shape {tuple(m.shape)} does not broadcast to scores {target}"
        causal = torch.ones(length, source, dtype=torch.bool).tril(source - length)
        if not torch.equal(kept, causal.expand(target)):
            return f"mask is not causal (it differs at B={b}, T={t})"
    return None


def _keep(m: torch.Tensor, keep: str) -> torch.Tensor | str:
    if keep == "additive":
        if m.dtype == torch.bool or not m.is_floating_point():
            return "additive mask is not a float tensor"
        kept = m == 0
        if not bool((m[~kept] <= NEG).all()):
            return f"additive mask has values other than 0 and -inf-like (<= {NEG:g})"
        return kept
    if m.dtype != torch.bool:
        return f"mask has dtype {m.dtype}, not bool"
    return m if keep == "true" else ~m


def _shape_only_ancestors(mask: Value) -> tuple[list[Node], str | None]:
    """The nodes the mask is computed from, producers first, or why it is not shape-only.
    A shape-only op is kept but its inputs are not followed (they are stood in by zeros)."""
    order: list[Node] = []
    seen: set[Node] = set()
    stack: list[tuple[Node, bool]] = [(mask.producer, False)]
    while stack:  # depth-first, a node listed after all its inputs
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if node in seen:
            continue
        seen.add(node)
        if node.op == "arc.input":
            return [], f"mask depends on the input tokens (%{node.output.name})"
        stack.append((node, True))
        if node.op not in SHAPE_ONLY:
            stack.extend((v.producer, False) for v in node.inputs if v.producer not in seen)
    return order, None


def _binding(graph: Graph, b: int, t: int) -> dict[str, int] | str:
    """Sizes for the graph inputs' symbols: the leading dim takes b, the others t."""
    binding: dict[str, int] = {}
    for v in graph.inputs:
        for i, d in enumerate(v.shape or ()):
            if isinstance(d, str):
                if not d.isidentifier():
                    return f"graph input %{v.name} has a computed dim '{d}'"
                binding.setdefault(d, b if i == 0 else t)
    return binding


def _size(dim: Any, binding: dict[str, int]) -> int:
    if isinstance(dim, int):
        return dim
    # dims are symbol names or arithmetic on them ("T + 1", "4*B"); no calls, no attributes
    return int(eval(compile(dim, "<dim>", "eval"), {"__builtins__": {}}, dict(binding)))


def _evaluate(mask: Value, nodes: list[Node], binding: dict[str, int]) -> torch.Tensor:
    env: dict[Value, Any] = {}

    def stand_in(v: Value) -> Any:
        if v in env:
            return env[v]
        if v.dtype in SYM_DTYPES:
            raise ValueError(f"shape-only op reads symbolic %{v.name}")
        return torch.zeros([_size(d, binding) for d in v.shape], dtype=v.dtype)

    for node in nodes:
        if node.op == "arc.constant":
            env[node.output] = node.output.data
            continue
        args = [stand_in(v) if node.op in SHAPE_ONLY else env[v] for v in node.inputs]
        result = evaluate_node(node, args)
        results = result if len(node.outputs) > 1 else [result]
        env.update(zip(node.outputs, results))
    return env[mask]
