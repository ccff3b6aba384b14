"""The linears the quantizing passes work on (``quantize_weights``, ``smooth_quant``,
``quantize_w8a8``: how each finds them, checks their weights and inputs, tells the LM head, and
rewrites a gated MLP), the weight edits they make, and the activation statistics they
calibrate with. Not a pass.

A linear is found in the forms the fusions leave:

- ``aten.linear(x, W[N, K], b)``, ``aten.mm(x, W[K, N])``, ``aten.addmm(b, x, W[K, N])``,
  ``aten.matmul(x, W[K, N])``, ``aten.bmm(x[B, T, K], expand(W[K, N], [B, K, N]))``:
  y = x @ W^T + b
- ``arc.split_linear(x, W, b, sizes)``: split(x @ W^T + b, sizes, -1)
- ``arc.gated_mlp(x, Wg, Wu, Wd)``: two matmul inputs, ``x`` for gate and up and
  ``h = act(x @ Wg^T + bg) * (x @ Wu^T + bu)`` for down (``gated_hidden`` computes ``h``
  from the node's input values, since no node of the graph holds it).

A weight is a float32 2-D constant or an ``arc.concat_weights`` of such constants along the
output dim (merged Q/K/V); ``WeightRef`` says where it is read, so an edit makes new constants
and rewires that one input, never touching the tensors the graph was built from (they are
the caller's model's parameters).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from arcompile.ir.graph import Graph, Node, Value
from arcompile.ir.opdefs.mlp import activate, apply_linear
from arcompile.passes.match import Match
from arcompile.passes.merge_linears import as_linear as traced_linear

LINEARS = ("aten.linear", "aten.mm", "aten.addmm", "aten.matmul", "aten.bmm")


@dataclass
class WeightRef:
    """A weight operand where it is read: ``holder.inputs[port]`` (the linear itself, or the
    ``aten.expand`` a bmm reads it through). ``layout``: "out_in" ([N, K]) or "in_out"."""

    holder: Node
    port: int
    layout: str

    @property
    def value(self) -> Value:
        return self.holder.inputs[self.port]

    def parts(self) -> tuple[list[Value], int | None]:
        """The constants the weight is made of, and the concat dim (None: one constant)."""
        v = self.value
        if not v.is_constant and v.producer.op == "arc.concat_weights":
            return list(v.producer.inputs), v.producer.attrs["dim"]
        return [v], None

    def tensor_NK(self) -> torch.Tensor:
        parts, dim = self.parts()
        data = parts[0].data if dim is None else torch.cat([p.data for p in parts], dim)
        return data if self.layout == "out_in" else data.t()


@dataclass
class Linear:
    """One matmul of an activation by a weight: y = x @ W^T + b."""

    node: Node
    x: Value
    weight: WeightRef
    bias: Value | None


def port_of(node: Node, value: Value) -> int:
    return next(i for i, v in enumerate(node.inputs) if v is value)


def check_weight(ref: WeightRef) -> Match:
    """Ok when the weight is a float32 2-D constant or a concat of such along N."""
    m = Match()
    parts, dim = ref.parts()
    for v in parts:
        if not v.is_constant:
            return m.fail(f"the weight %{v.name} is computed, not a constant")
        if v.dtype != torch.float32:
            return m.fail(f"the weight %{v.name} is {v.dtype}, not float32")
        if v.shape is None or len(v.shape) != 2:
            return m.fail(f"the weight %{v.name} is not 2-D")
    if dim is not None and dim != (0 if ref.layout == "out_in" else 1):
        return m.fail(f"the weight %{ref.value.name} is concatenated along K, not N")
    return m.ok()


def as_linear(node: Node) -> Match:
    """``Match(linear=Linear)`` when ``node`` is one of the traced linears (module docstring)
    with a constant float32 weight and a float32 input ending in K."""
    m = Match()
    if node.op == "aten.matmul":
        x, weight = node.arg("self"), node.arg("other")
        if not isinstance(weight, Value) or weight.shape is None or len(weight.shape) != 2:
            return m.fail("aten.matmul: the right operand is not a 2-D tensor")
        lin = Linear(node, x, WeightRef(node, port_of(node, weight), "in_out"), None)
    elif node.op == "aten.bmm":
        # run_decompositions() writes x[B, T, K] @ W[K, N] as bmm(x, expand(W, [B, K, N]))
        x, expanded = node.arg("self"), node.arg("mat2")
        if not isinstance(expanded, Value) or expanded.producer.op != "aten.expand":
            return m.fail("aten.bmm: the right operand is not a weight expanded over batch")
        holder = expanded.producer
        weight = holder.arg("self")
        if (not isinstance(weight, Value) or weight.shape is None or len(weight.shape) != 2
                or tuple(expanded.shape[1:]) != tuple(weight.shape)
                or x.shape is None or len(x.shape) != 3 or expanded.shape[0] != x.shape[0]):
            return m.fail("aten.bmm: the right operand is not a 2-D weight expanded over the "
                          "batch dim of the left")
        if len(expanded.uses()) != 1:
            return m.fail("aten.bmm: the expanded weight has other users")
        lin = Linear(node, x, WeightRef(holder, port_of(holder, weight), "in_out"), None)
    else:
        t = traced_linear(node)
        if not t:
            return t
        t = t["linear"]
        lin = Linear(node, t.x, WeightRef(node, port_of(node, t.weight), t.layout), t.bias)
    checked = check_weight(lin.weight)
    if not checked:
        return checked
    K = weight_shape_NK(lin.weight)[1]
    if not isinstance(lin.x, Value) or lin.x.dtype != torch.float32:
        return m.fail("its input is not a float32 tensor")
    if not lin.x.shape or lin.x.shape[-1] != K:
        return m.fail(f"its input %{lin.x.name} {lin.x.shape} does not end in K={K}")
    if lin.bias is not None and lin.bias.dtype != torch.float32:
        return m.fail(f"its bias %{lin.bias.name} is {lin.bias.dtype}, not float32")
    return m.ok(linear=lin)


def weight_shape_NK(ref: WeightRef) -> tuple[int, int]:
    shape = ref.value.shape
    return (shape[0], shape[1]) if ref.layout == "out_in" else (shape[1], shape[0])


def gated_parts(node: Node) -> tuple[Value, list[WeightRef], list[Value | None]]:
    """``(x, [gate, up, down] weight refs, [b_gate, b_up, b_down])`` of an arc.gated_mlp."""
    layout = node.attrs["weight_layout"]
    has_bias = list(node.attrs.get("has_bias", (False, False, False)))
    it = iter(range(4, len(node.inputs)))
    biases = [node.inputs[next(it)] if present else None for present in has_bias]
    return node.inputs[0], [WeightRef(node, p, layout) for p in (1, 2, 3)], biases


def gated_hidden(node: Node, args: list) -> torch.Tensor:
    """``h = act(x @ Wg^T + bg) * (x @ Wu^T + bu)``, the down projection's input, from an
    arc.gated_mlp node's input values (as ``observe_inputs`` hands them over)."""
    x, w_gate, w_up, _w_down, *rest = args
    it = iter(rest)
    has_bias = list(node.attrs.get("has_bias", (False, False, False)))
    b_gate, b_up, _b_down = (next(it) if present else None for present in has_bias)
    layout = node.attrs["weight_layout"]
    return (activate(apply_linear(x, w_gate, b_gate, layout), node.attrs["activation"])
            * apply_linear(x, w_up, b_up, layout))


def check_input(x: Value, K: int) -> Match:
    """A float32 input whose last dim is the weight's K."""
    m = Match()
    if x.dtype != torch.float32:
        return m.fail(f"its input %{x.name} is {x.dtype}, not float32")
    if not x.shape or x.shape[-1] != K:
        return m.fail(f"its input %{x.name} {x.shape} does not end in K={K}")
    return m.ok()


# -- rewrites ------------------------------------------------------------------------------
def split_last(graph: Graph, node: Node, y: Value, sizes: list[int], names: list[str],
               origin: str) -> list[Value]:
    """``aten.split_with_sizes(y, sizes, -1)``, outputs named ``<name>_q``."""
    lead = tuple(y.shape[:-1])
    return list(graph.add_op("aten.split_with_sizes",
                             {"self": y, "split_sizes": sizes, "dim": -1},
                             [(y.dtype, lead + (s,)) for s in sizes], module=node.module,
                             origin=origin, names=[f"{n}_q" for n in names]).outputs)


def rewrite_gated_mlp(graph: Graph, node: Node, x: Value, biases: tuple, inner: int,
                      origin: str, linear) -> None:
    """Replace the arc.gated_mlp ``node`` by ``down(act(gate) * up)`` with gate and up as one
    ``[2I, K]`` product then a split; ``linear(x, bias, shape, name, part)`` builds a product
    (``part`` "gate_up" or "down"). ``biases``: (gate, up, down), each a constant or None."""
    b_gate, b_up, b_down = biases
    module = node.module
    b_gate_up = None
    if b_gate is not None or b_up is not None:
        zeros = torch.zeros(inner)
        b_gate_up = graph.add_constant(
            torch.cat([b_gate.data if b_gate is not None else zeros,
                       b_up.data if b_up is not None else zeros]),
            name=f"{node.output.name}_gate_up_bias", module=module, origin=origin)
    lead, base = tuple(x.shape[:-1]), node.output.name
    gu = linear(x, b_gate_up, lead + (2 * inner,), f"{base}_gate_up", "gate_up")
    g, u = split_last(graph, node, gu, [inner, inner], [f"{base}_gate", f"{base}_up"], origin)
    activation = node.attrs["activation"]
    if activation == "silu":
        act = graph.add_op("aten.silu", {"self": g}, [(g.dtype, g.shape)], module=module,
                           origin=origin, names=[f"{base}_act"]).output
    else:
        approximate = "tanh" if activation == "gelu_tanh" else "none"
        act = graph.add_op("aten.gelu", {"self": g, "approximate": approximate},
                           [(g.dtype, g.shape)], module=module, origin=origin,
                           names=[f"{base}_act"]).output
    hidden = graph.add_op("aten.mul.Tensor", {"self": act, "other": u}, [(g.dtype, g.shape)],
                          module=module, origin=origin, names=[f"{base}_hidden"]).output
    out = node.output
    y = linear(hidden, b_down, out.shape, f"{base}_down", "down")
    out.replace_all_uses_with(y)
    graph.remove_node(node)


# -- weight edits ------------------------------------------------------------------------
def scale_weight(graph: Graph, ref: WeightRef, *, rows_N: torch.Tensor | None = None,
                 cols_K: torch.Tensor | None = None, origin: str, suffix: str) -> None:
    """Rewire ``ref`` to a new weight ``W'[n, k] = W[n, k] * rows_N[n] * cols_K[k]`` of the
    same structure (one constant, or a new arc.concat_weights of new constants)."""
    parts, dim = ref.parts()
    new_parts, start = [], 0
    for v in parts:
        w = v.data if ref.layout == "out_in" else v.data.t()  # [n, K] slice of W
        n = w.shape[0]
        if rows_N is not None:
            w = w * rows_N[start:start + n, None].to(w.dtype)
        if cols_K is not None:
            w = w * cols_K[None, :].to(w.dtype)
        start += n
        data = (w if ref.layout == "out_in" else w.t()).contiguous()
        new_parts.append(graph.add_constant(data, name=f"{v.name}_{suffix}",
                                            module=v.producer.module, origin=origin))
    if dim is None:
        graph.set_input(ref.holder, ref.port, new_parts[0])
        return
    old = ref.value.producer
    merged = graph.add_node("arc.concat_weights", new_parts, dict(old.attrs),
                            [(old.output.dtype, old.output.shape)], module=old.module,
                            origin=origin, names=[f"{old.output.name}_{suffix}"])
    graph.set_input(ref.holder, ref.port, merged.output)


def scale_vector(graph: Graph, holder: Node, port: int, factor: torch.Tensor, origin: str,
                 suffix: str, start: int = 0) -> None:
    """Rewire ``holder.inputs[port]`` (a 1-D constant, or an arc.concat_weights of them: a
    norm's gain, a bias, merged biases) to new constants with elements
    ``start .. start + len(factor)`` multiplied by ``factor``."""
    v = holder.inputs[port]
    parts = list(v.producer.inputs) if not v.is_constant else [v]
    full = torch.ones(sum(p.shape[0] for p in parts))
    full[start:start + factor.numel()] = factor.float()
    new_parts, at = [], 0
    for p in parts:
        n = p.shape[0]
        data = p.data * full[at:at + n].to(p.data.dtype)
        at += n
        new_parts.append(graph.add_constant(data, name=f"{p.name}_{suffix}",
                                            module=p.producer.module, origin=origin))
    if v.is_constant:
        graph.set_input(holder, port, new_parts[0])
        return
    old = v.producer
    merged = graph.add_node("arc.concat_weights", new_parts, dict(old.attrs),
                            [(v.dtype, v.shape)], module=old.module, origin=origin,
                            names=[f"{v.name}_{suffix}"])
    graph.set_input(holder, port, merged.output)


def constant_vector(v: Value) -> bool:
    """A 1-D float32 constant, or an arc.concat_weights of such (merged biases)."""
    parts = [v] if v.is_constant else (list(v.producer.inputs)
                                       if v.producer.op == "arc.concat_weights" else None)
    return bool(parts) and all(p.is_constant and p.dtype == torch.float32
                               and p.shape is not None and len(p.shape) == 1 for p in parts)


# -- statistics --------------------------------------------------------------------------
class AbsStats:
    """Running statistics of ``|x|`` over calibration: the max per channel (last dim) and,
    for a ``percentile``, the ``k`` largest elements overall (with their channels), ``k`` set
    from the first tensor seen so that the k-th largest is that percentile of every element
    of the ``calls`` tensors (of one size) expected."""

    def __init__(self, percentile: float | None = None, calls: int = 1):
        if percentile is not None and not 0 < percentile < 100:
            raise ValueError(f"percentile must lie strictly between 0 and 100, got {percentile}")
        self.percentile = percentile
        self.calls = calls
        self.channel_max: torch.Tensor | None = None
        self.k: int | None = None
        self.top: torch.Tensor | None = None  # the k largest |x|, descending
        self.top_channels: torch.Tensor | None = None  # and the channel of each
        self.seen = 0
        self.call_max: list[torch.Tensor] = []  # the max per channel of each tensor seen

    def add(self, x: torch.Tensor) -> None:
        a = x.detach().abs().float().reshape(-1, x.shape[-1])
        m = a.amax(0)
        self.channel_max = m if self.channel_max is None else torch.maximum(self.channel_max, m)
        self.call_max.append(m)
        self.seen += a.numel()
        if self.percentile is None:
            return
        if self.k is None:
            self.k = max(1, math.ceil(a.numel() * self.calls * (1 - self.percentile / 100)))
        K = a.shape[-1]
        values = a.reshape(-1)
        channels = torch.arange(K).repeat(a.shape[0])
        if self.top is not None:
            values = torch.cat([self.top, values])
            channels = torch.cat([self.top_channels, channels])
        best = torch.topk(values, min(self.k, values.numel()))
        self.top, self.top_channels = best.values, channels[best.indices]

    def value(self, without: torch.Tensor | None = None, mean_of_max: bool = False) -> float:
        """The statistic a per-tensor scale is set from, over every channel but ``without``:
        the max, the mean over the tensors seen of each one's max (``mean_of_max``), or the
        percentile (of the elements left, from the largest ones kept)."""
        keep = torch.ones_like(self.channel_max, dtype=torch.bool)
        if without is not None:
            keep[without] = False
        if not keep.any():
            return 0.0
        if mean_of_max:
            return float(torch.stack([m[keep].max() for m in self.call_max]).mean())
        if self.percentile is None:
            return float(self.channel_max[keep].max())
        left = self.top[keep[self.top_channels]]
        if not left.numel():
            return 0.0
        K = self.channel_max.numel()
        remaining = self.seen * int(keep.sum()) // K
        k = max(1, math.ceil(remaining * (1 - self.percentile / 100)))
        return float(left[min(k, left.numel()) - 1])
