"""The reference interpreter: runs any IR graph with torch ops.

It is the yardstick every pass is checked against: ``aten.*`` nodes call the very torch op
they were traced from, ``sym.*`` nodes do Python arithmetic on sizes, and ``arc.*`` nodes run
the reference implementation registered for them in ``arcompile.ir.ops``. While running it
binds the graph's symbolic dims to the sizes it sees and fails with the dim that disagreed.
Intermediate tensors are freed after their last use, so a whole model fits in memory.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Sequence

import torch

from arcompile.errors import VerifyError
from arcompile.ir.graph import SYM_DTYPES, Graph, Node, Value, resolve

_SYM_FUNCS = {
    "sym.add": operator.add, "sym.sub": operator.sub, "sym.mul": operator.mul,
    "sym.floordiv": operator.floordiv, "sym.truediv": operator.truediv, "sym.mod": operator.mod,
    "sym.neg": operator.neg, "sym.eq": operator.eq, "sym.ne": operator.ne, "sym.lt": operator.lt,
    "sym.le": operator.le, "sym.gt": operator.gt, "sym.ge": operator.ge, "sym.pow": operator.pow,
    "sym.max": max, "sym.min": min, "sym.not": operator.not_, "sym.float": float, "sym.int": int,
}

# The IR is functional: a view means "the same values in this shape". Once remove_noops drops
# a `contiguous`, torch's view can refuse strides that reshape handles, so run views as reshapes.
_RESHAPES = {"aten.view", "aten._unsafe_view"}


def run_graph(graph: Graph, inputs: Sequence[torch.Tensor], check_shapes: bool = True,
              observe: Callable[[Node, list[Any]], None] | None = None) -> list[torch.Tensor]:
    """Run ``graph`` on ``inputs`` (in graph-input order) and return its outputs.

    ``observe(node, args)``, when given, sees every computed node's input values just before
    the node runs (calibration reads the activations entering each linear this way)."""
    if len(inputs) != len(graph.inputs):
        raise VerifyError(f"graph '{graph.name}' takes {len(graph.inputs)} inputs, got {len(inputs)}")
    order = graph.nodes()
    last_use = _last_uses(graph, order)
    env: dict[Value, Any] = dict(zip(graph.inputs, inputs))
    bound: dict[str, int] = {}
    with torch.no_grad():
        for step, node in enumerate(order):
            if node.op == "arc.input":
                result: Any = env[node.output]
            elif node.op == "arc.constant":
                result = node.output.data
            else:
                args = [env[v] for v in node.inputs]
                if observe is not None:
                    observe(node, args)
                result = evaluate_node(node, args)
            results = result if len(node.outputs) > 1 else [result]
            for v, r in zip(node.outputs, results):
                env[v] = r
                if check_shapes:
                    _check(v, r, bound, node)
            for v in last_use.get(step, ()):
                env.pop(v, None)
    return [env[o] for o in graph.outputs]


@torch.no_grad()
def evaluate_node(node: Node, args: list[Any]) -> Any:
    """Compute one node from its input values; a list when it has several outputs."""
    from arcompile.ir.ops import reference_impl

    attrs = {k: resolve(v, tuple(args)) for k, v in node.attrs.items()}
    if node.op.startswith("sym."):  # operands a0, a1, ...: Values or literals
        return _SYM_FUNCS[node.op](*(attrs[f"a{i}"] for i in range(len(attrs))))
    if node.op.startswith("arc."):
        return reference_impl(node.op)(*args, **node.attrs)
    from arcompile.frontend.from_export import resolve_op

    if node.op in _RESHAPES:
        return attrs["self"].reshape(attrs["size"])
    op = resolve_op(node.op)
    positional, keyword = [], {}
    for arg in op._schema.arguments:
        if arg.name not in attrs:
            continue
        if arg.kwarg_only or keyword or _gap_before(op, arg.name, attrs):
            keyword[arg.name] = attrs[arg.name]
        else:
            positional.append(attrs[arg.name])
    out = op(*positional, **keyword)
    return list(out) if isinstance(out, (tuple, list)) else out


def _gap_before(op, name: str, attrs: dict) -> bool:
    # once an optional argument was left out, the ones after it must go by name
    for arg in op._schema.arguments:
        if arg.name == name:
            return False
        if arg.name not in attrs:
            return True
    return False


def _last_uses(graph: Graph, order: list[Node]) -> dict[int, list[Value]]:
    position = {n: i for i, n in enumerate(order)}
    keep = set(graph.outputs)
    last: dict[int, list[Value]] = {}
    for node in order:
        for v in node.outputs:
            if v in keep:
                continue
            uses = v.uses()
            at = max((position[c] for c, _ in uses), default=position[node])
            last.setdefault(at, []).append(v)
    return last


def _check(v: Value, r: Any, bound: dict[str, int], node: Node) -> None:
    if v.dtype in SYM_DTYPES or v.shape is None or not isinstance(r, torch.Tensor):
        return
    if r.dtype != v.dtype:
        raise VerifyError(f"%{v.name} from {node.where()}: expected {v.dtype}, ran as {r.dtype}")
    if len(r.shape) != len(v.shape):
        raise VerifyError(f"%{v.name} from {node.where()}: expected rank {len(v.shape)}, "
                          f"ran with shape {tuple(r.shape)}")
    for i, (want, got) in enumerate(zip(v.shape, r.shape)):
        if isinstance(want, int):
            if want != got:
                raise VerifyError(f"%{v.name} from {node.where()}: dim {i} should be {want}, is {got}")
        elif want.isidentifier():
            if bound.setdefault(want, got) != got:
                raise VerifyError(f"%{v.name} from {node.where()}: dim {i} is symbol {want}, "
                                  f"bound to {bound[want]} earlier but {got} here")
