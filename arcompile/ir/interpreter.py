"""The reference interpreter: runs any IR graph with torch ops.

It is the yardstick every pass is checked against: ``aten.*`` nodes call the very torch op
they were traced from, ``sym.*`` nodes do Python arithmetic on sizes, and ``arc.*`` nodes run
the reference implementation registered for them in ``arcompile.ir.ops``. While running it
binds the graph's symbolic dims to the sizes it sees and fails with the dim that disagreed.
Intermediate tensors are freed after their last use, so a whole model fits in memory.

``compute_dtype=torch.float64`` runs the graph's floating-point maths in float64: float inputs
and constants are widened, every floating dtype named by an op (``dtype=`` of a cast or
factory, ``compute_dtype`` / ``softmax_dtype`` of an ``arc.*`` op) becomes float64, and so does
torch's default dtype while it runs. The numeric checks use it
(``arcompile/passes/numeric_check.py`` says why).
"""

from __future__ import annotations

import contextlib
import operator
import threading
from typing import Any, Callable, Iterator, Sequence

import torch

from arcompile.errors import VerifyError
from arcompile.ir.graph import SYM_DTYPES, Graph, Node, Value, resolve
import arcompile.ir.opdefs  # noqa: F401  (registers the arc.* ops' reference implementations)
from arcompile.ir.ops import reference_impl, resolve_op

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
              observe: Callable[[Node, list[Any]], None] | None = None,
              compute_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Run ``graph`` on ``inputs`` (in graph-input order) and return its outputs.

    ``observe(node, args)``, when given, sees every computed node's input values just before
    the node runs (calibration reads the activations entering each linear this way).
    ``compute_dtype`` (float64 only): run every floating-point op in it (module docstring)."""
    if len(inputs) != len(graph.inputs):
        raise VerifyError(f"graph '{graph.name}' takes {len(graph.inputs)} inputs, got {len(inputs)}")
    if compute_dtype not in (None, torch.float64):
        raise ValueError(f"compute_dtype must be None or torch.float64, got {compute_dtype}")
    widen = compute_dtype is not None
    order = graph.nodes()
    last_use = _last_uses(graph, order)
    env: dict[Value, Any] = dict(zip(graph.inputs, (_widen(x) if widen else x for x in inputs)))
    bound: dict[str, int] = {}
    default_dtype = torch.get_default_dtype()
    with torch.no_grad():
        if widen:  # factories without a dtype (scalar_tensor, float arange) make float64
            torch.set_default_dtype(torch.float64)
        try:
            for step, node in enumerate(order):
                if node.op == "arc.input":
                    result: Any = env[node.output]
                elif node.op == "arc.constant":
                    result = node.output.data if not widen else _wide_constant(node.output)
                else:
                    args = [env[v] for v in node.inputs]
                    if observe is not None:
                        observe(node, args)
                    result = evaluate_node(node, args, widen)
                results = result if len(node.outputs) > 1 else [result]
                for v, r in zip(node.outputs, results):
                    env[v] = r
                    if check_shapes:
                        _check(v, r, bound, node, widen)
                for v in last_use.get(step, ()):
                    env.pop(v, None)
        finally:
            torch.set_default_dtype(default_dtype)
    return [env[o] for o in graph.outputs]


_WIDENED = threading.local()  # the cache of ``widened_constants``, per thread


@contextlib.contextmanager
def widened_constants() -> Iterator[None]:
    """Within it, float64 runs widen each constant once and reuse it (a proof runs the same
    graphs several times; SmolLM2's weights take ~1 s to widen, 1 GB held until it ends)."""
    outer = getattr(_WIDENED, "cache", None)
    _WIDENED.cache = {} if outer is None else outer
    try:
        yield
    finally:
        _WIDENED.cache = outer


def _wide_constant(v: Value) -> torch.Tensor:
    if v.exact is not None:
        return v.exact
    cache = getattr(_WIDENED, "cache", None)
    if cache is None:
        return _widen(v.data)
    key = id(v.data)
    if key not in cache:  # the tensor is held too, so its id stays its own meanwhile
        cache[key] = (v.data, _widen(v.data))
    return cache[key][1]


def _widen(x: Any) -> Any:
    """float64 for a floating tensor or a floating dtype named in an attribute; else as is."""
    if isinstance(x, torch.Tensor):
        return x.to(torch.float64) if x.is_floating_point() else x
    if isinstance(x, torch.dtype):
        return torch.float64 if x.is_floating_point else x
    if isinstance(x, str) and x in _FLOAT_NAMES:  # e.g. arc.attention's softmax_dtype
        return "float64"
    if isinstance(x, list):
        return [_widen(a) for a in x]
    if isinstance(x, tuple):
        return tuple(_widen(a) for a in x)
    return x


_FLOAT_NAMES = {"float32", "float16", "bfloat16", "float"}
_EPS_OF_DTYPE = {"aten.rms_norm"}  # ops whose eps=None default follows the input's dtype


@torch.no_grad()
def evaluate_node(node: Node, args: list[Any], widen: bool = False) -> Any:
    """Compute one node from its input values; a list when it has several outputs.
    ``widen``: floating dtypes in the node's attributes become float64 (``run_graph``)."""

    attrs = {k: resolve(v, tuple(args)) for k, v in node.attrs.items()}
    if widen:
        attrs = _widen_dtypes(attrs)
    if node.op.startswith("sym."):  # operands a0, a1, ...: Values or literals
        return _SYM_FUNCS[node.op](*(attrs[f"a{i}"] for i in range(len(attrs))))
    if node.op.startswith("arc."):
        return reference_impl(node.op)(*args, **(_widen_dtypes(node.attrs) if widen
                                                  else node.attrs))
    if node.op in _RESHAPES:
        return attrs["self"].reshape(attrs["size"])
    if widen and node.op in _EPS_OF_DTYPE and attrs.get("eps") is None:
        # eps=None means finfo(input dtype).eps: keep the traced dtype's, not float64's
        attrs["eps"] = torch.finfo(node.outputs[0].dtype).eps
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


def evaluate_exact(node: Node, args: list[Any]) -> Any:
    """``evaluate_node`` in float64, as ``run_graph(compute_dtype=float64)`` runs the node
    (floating args widened; constant folding keeps this beside the value it stores)."""
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return evaluate_node(node, [_widen(a) for a in args], widen=True)
    finally:
        torch.set_default_dtype(default_dtype)


def _widen_dtypes(attrs: dict) -> dict:
    """``attrs`` with every attribute that picks a floating dtype made float64."""
    return {k: (_widen(v) if _names_dtype(k, v) else v) for k, v in attrs.items()}


def _names_dtype(name: str, value: Any) -> bool:
    """An attribute that picks a dtype: a torch.dtype anywhere, or a string in a *dtype key."""
    return isinstance(value, torch.dtype) or (name.endswith("dtype") and isinstance(value, str))


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


def _check(v: Value, r: Any, bound: dict[str, int], node: Node, widen: bool = False) -> None:
    if v.dtype in SYM_DTYPES or v.shape is None or not isinstance(r, torch.Tensor):
        return
    if r.dtype != (_widen(v.dtype) if widen else v.dtype):
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
