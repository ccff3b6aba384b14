"""SmoothQuant: move activation outliers into the weights, per input channel, so that one
static per-tensor int8 scale fits each linear's input (``quantize_w8a8`` runs next).

For a linear y = x @ W^T, any positive ``s[K]`` gives the same y::

    y = (x / s) @ (W * s[None, :])^T
    s_j = max|x_j|^alpha / max_n |W[n, j]|^(1 - alpha)      (s_j = 1 where either max is 0)

with ``max|x_j|`` over the calibration tokens (``calibration.observe_inputs``) and
``max|W[:, j]|`` over every linear that reads ``x``. ``x / s`` is never computed: it is folded
into the node that makes ``x``. Three rules, one per producer:

- ``norm``: ``x = norm(...) * g (+ b)`` (arc.rms_norm, arc.layer_norm, arc.skip_rms_norm,
  arc.skip_layer_norm output 0) read only by linears, through views that keep the last dim
  (merged Q/K/V ``arc.split_linear``, ``arc.gated_mlp``'s gate and up, plain linears):
  ``g /= s`` (and ``b /= s``), every reader's ``W[:, j] *= s_j``.
- ``down``: ``arc.gated_mlp``'s ``h = act(x @ Wg^T) * (x @ Wu^T + bu)``: ``Wu[j, :] /= s_j``
  (and ``bu``), ``Wd[:, j] *= s_j``. The activation is left alone, so any act works.
- ``attention``: o_proj reads the attention's output, whose channel ``h * D + d`` (query head
  h) is a weighted sum of the value rows of KV head ``h // (Hq / Hkv)`` (GQA: consecutive query
  heads share a KV head, as arc.attention defines it), channel d. So scaling the value
  projection's output channel ``kv * D + d`` by ``1 / s`` scales exactly the o_proj input
  channels ``h * D + d`` for the query heads of that group, and ``s`` is computed per KV channel
  from the max over the group's heads. Proven on the graph, not assumed: the o_proj input must
  be ``reshape(transpose(out_BHqTD, 1, 2), [.., Hq * D])`` of output 0 of arc.attention /
  arc.attention_cached, and its value input ``transpose(reshape(v, [B, T, Hkv, D]), 1, 2)``
  with ``v`` one output of a linear or an arc.split_linear (its rows at that output's offset).
  arc.attention_cached_packed (``pack_attention``) takes and gives ``[B, T, n * D]`` with the
  same channel order: its output goes to o_proj through views only, and its value is the
  ``v`` input (separate) or channels ``(Hq + Hkv) * D ..`` of the packed q|k|v input, one
  linear's output. Every value on the way single-use, and in a cached graph the past value
  read by that attention alone (the cache then holds ``v / s``, consistently, step after step).

Produces new constants (and a new arc.concat_weights for merged weights) rewired into the
nodes that read them; the model's own tensors are never written. Counts: one per producer
smoothed under its rule.

Refuses (noted): a norm whose output has a reader that is not a smoothable linear (the LM
head, kept in float: its weight is the tied embedding), a computed or non-float32 weight or
norm gain, a V path with any other op (RoPE on V, a transpose that is not heads/tokens, a
use elsewhere), a head count that does not divide.

Numbers: exact in real arithmetic; in float32 a reordering of roundings. The pass proves
itself: logits before and after on the first calibration sequence (``PassResult.max_abs_diff``),
and raises when they differ by more than ``tolerance`` (in float64, relative to the logits'
magnitude: ``numeric_check.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from arcompile.errors import PassError
from arcompile.eval.calibration import graph_inputs, observe_inputs
from arcompile.ir.analysis import is_lm_head
from arcompile.ir.graph import Graph, Node, Value
from arcompile.passes.base import Pass, PassResult
from arcompile.passes.linear_sites import (
    AbsStats,
    WeightRef,
    as_linear,
    check_weight,
    constant_vector,
    gated_hidden,
    gated_parts,
    port_of,
    scale_vector,
    scale_weight,
    weight_shape_NK,
)
from arcompile.passes.match import TRANSPARENT, Match
from arcompile.passes.numeric_check import ROUNDED, gap, relative_gap, run_exact, within

# norm op -> ports of (gain, bias or None)
NORMS = {"arc.rms_norm": (1, None), "arc.layer_norm": (1, 2), "arc.skip_rms_norm": (2, None),
         "arc.skip_layer_norm": (2, 3)}
ATTENTIONS = ("arc.attention", "arc.attention_cached", "arc.attention_cached_packed")
DEFAULT_ALPHA = 0.5
PROOF_TOKENS = 64  # tokens of the first calibration sequence the self-check runs


@dataclass
class Group:
    """One smoothing: which activation (``observe``: node, input port or "hidden"), which
    weights take ``* s`` on their columns, and how ``x / s`` is folded in."""

    rule: str
    where: str
    observe: tuple[Node, object]
    readers: list[WeightRef]  # W[:, j] *= s_j
    K: int
    stats: AbsStats = field(default_factory=AbsStats)
    norm: Node | None = None  # rule norm: g /= s (and b)
    up: tuple[WeightRef, Value | None] | None = None  # rule down: Wu[j, :] /= s_j (and bu)
    value: tuple[WeightRef, int, Node, int] | None = None  # rule attention: (v weight, row
    # offset, the node holding v's bias or None, the bias port)
    heads: tuple[int, int, int] | None = None  # (Hq, Hkv, D) for the attention rule


class SmoothQuant(Pass):
    """See the module docstring."""

    name = "smooth_quant"
    # exact in real arithmetic, but the rescaled weights are stored in float32, each rounded
    # at 6e-8, which the float64 check sees (float32 had measured max|Δlogit| 4.9e-5 on
    # SmolLM2's cached step, alpha 0.5, 64 tokens)
    tolerance = ROUNDED

    def __init__(self, sequences: Sequence[Sequence[int]], alpha: float = DEFAULT_ALPHA,
                 calibration_text: str | None = None):
        if not 0 <= alpha <= 1:
            raise ValueError(f"smooth_quant: alpha must lie in [0, 1], got {alpha}")
        if not sequences:
            raise ValueError("smooth_quant needs calibration sequences")
        self.alpha = alpha
        self.sequences = [list(s) for s in sequences]
        self.calibration_text = calibration_text

    def settings(self) -> dict:
        return {"alpha": self.alpha, "calibration": {
            "samples": len(self.sequences), "tokens": len(self.sequences[0]),
            "text": self.calibration_text}}

    def run(self, graph: Graph) -> PassResult:
        result = PassResult()
        groups: list[Group] = []
        for node in graph.nodes():
            m = self._match(graph, node)
            if m is None:
                continue
            if m:
                groups.append(m["group"])
            else:
                result.note(f"{node.module or '<top>'} ({node.op}): not smoothed: {m.reason}")
        if not groups:
            return result

        watch: dict[Node, list[Group]] = {}
        for g in groups:
            watch.setdefault(g.observe[0], []).append(g)

        def visit(node: Node, args: list) -> None:
            for g in watch[node]:
                port = g.observe[1]
                g.stats.add(gated_hidden(node, args) if port == "hidden" else args[port])

        observe_inputs(graph, self.sequences, watch, visit)
        proof_inputs = graph_inputs(graph, self.sequences[0][:PROOF_TOKENS])
        before = run_exact(graph, proof_inputs)[0]

        origin = f"{self.name}/"
        # attention first: it edits V's rows, which the norm rule's column maxima then see
        for g in sorted(groups, key=lambda g: ("attention", "down", "norm").index(g.rule)):
            self._apply(graph, g, origin + g.rule)
            result.bump(g.rule)

        after = run_exact(graph, proof_inputs)[0]
        diff, relative = gap(after, before), relative_gap(after, before)
        result.max_abs_diff = diff
        if not within(relative, self.tolerance):
            raise PassError(f"smooth_quant changed the logits by {diff:.3g} ({relative:.3g} of "
                            f"their magnitude, in float64) on the first calibration sequence, "
                            f"beyond its tolerance {self.tolerance:g}")
        return result

    # -- matching ---------------------------------------------------------------------
    def _match(self, graph: Graph, node: Node) -> Match | None:
        if node.op in NORMS:
            return self._match_norm(graph, node)
        if node.op == "arc.gated_mlp":
            return self._match_down(node)
        if node.op in ATTENTIONS:
            return self._match_attention(graph, node)
        return None

    def _match_norm(self, graph: Graph, norm: Node) -> Match:
        # x = norm(...) * g (+ b);  readers: y = x @ W^T, through views keeping the last dim
        m = Match()
        gain_port, bias_port = NORMS[norm.op]
        y = norm.outputs[0]
        K = y.shape[-1] if y.shape else None
        if not isinstance(K, int):
            return m.fail(f"its width {K} is not a number")
        for port in (gain_port, bias_port):
            if port is None or port >= len(norm.inputs):
                continue
            v = norm.inputs[port]
            if not v.is_constant or v.dtype != torch.float32 or tuple(v.shape) != (K,):
                return m.fail(f"its gain/bias %{v.name} is not a float32 [{K}] constant")
        readers = _readers(y, K)
        if not readers:
            return readers
        refs, first = [], None
        for node, port in readers["uses"]:
            if node.op in ("arc.split_linear", "arc.gated_mlp") and port == 0:
                refs_here = ([WeightRef(node, 1, node.attrs["weight_layout"])]
                             if node.op == "arc.split_linear" else gated_parts(node)[1][:2])
            else:
                lin = as_linear(node)
                if not lin:
                    return m.fail(f"its output reaches {node.op} at {node.module or '<top>'}, "
                                  f"which is not a linear: {lin.reason}")
                lin = lin["linear"]
                if lin.x is not node.inputs[port]:
                    return m.fail(f"its output is the weight, not the input, of {node.op}")
                if is_lm_head(graph, node, lin.weight.value):
                    return m.fail("it feeds the LM head, kept in float")
                refs_here = [lin.weight]
            for ref in refs_here:
                checked = check_weight(ref)
                if not checked:
                    return checked
            refs += refs_here
            first = first or (node, port)
        return m.ok(group=Group("norm", norm.module, first, refs, K, norm=norm))

    def _match_down(self, mlp: Node) -> Match:
        # h = act(x @ Wg^T) * (x @ Wu^T + bu);  y = h @ Wd^T
        m = Match()
        _x, (_gate, up, down), (_bg, b_up, _bd) = gated_parts(mlp)
        for ref in (up, down):
            checked = check_weight(ref)
            if not checked:
                return checked
        if b_up is not None and not constant_vector(b_up):
            return m.fail("the up projection's bias is not a float32 constant")
        K = weight_shape_NK(down)[1]
        return m.ok(group=Group("down", mlp.module, (mlp, "hidden"), [down], K, up=(up, b_up)))

    def _match_attention(self, graph: Graph, attn: Node) -> Match:
        # o_proj(heads_to_channels(attention(q, k, channels_to_heads(v_proj(x)))))
        m = Match()
        Hq, Hkv, D = (attn.attrs.get(k) for k in ("num_heads", "num_kv_heads", "head_dim"))
        if not all(isinstance(d, int) and d > 0 for d in (Hq, Hkv, D)) or Hq % Hkv:
            return m.fail(f"heads {Hq} / {Hkv} x {D} do not divide")
        packed_op = attn.op == "arc.attention_cached_packed"
        packed = packed_op and attn.attrs.get("packed")
        if attn.op != "arc.attention":
            past = attn.inputs[{(True, True): 2, (True, False): 4}.get((packed_op, packed), 4)]
            if len(past.uses()) != 1:
                return m.fail(f"the past value %{past.name} has other readers")
            if attn.outputs[2].uses():
                return m.fail("the present value is read inside the graph")
        # down: attention output -> o_proj input
        if packed_op:  # out_BTX is [B, T, Hq * D] already
            o_side = _to_linear(attn.outputs[0], Hq, D)
        else:
            o_side = _heads_to_channels(attn.outputs[0], Hq, D)
        if not o_side:
            return o_side
        o_lin = o_side["linear"]
        if is_lm_head(graph, o_lin.node, o_lin.weight.value):
            return m.fail("the attention output feeds the LM head")
        # up: value input -> v projection output (channel kv * D + d at ``offset``)
        if packed:  # q | k | v of one [B, T, (Hq + 2 Hkv) * D] tensor
            v_side = _from_producer(attn.inputs[0], Hq + 2 * Hkv, D)
            shift = (Hq + Hkv) * D
        elif packed_op:
            v_side, shift = _from_producer(attn.inputs[2], Hkv, D), 0
        else:
            v_side, shift = _channels_to_heads(attn.inputs[2], Hkv, D), 0
        if not v_side:
            return v_side
        producer, index = v_side["producer"], v_side["index"]
        if producer.op == "arc.split_linear":
            ref = WeightRef(producer, 1, producer.attrs["weight_layout"])
            offset = sum(producer.attrs["sizes"][:index]) + shift
            bias_holder, bias_port = (producer, 2) if len(producer.inputs) > 2 else (None, 0)
        else:
            lin = as_linear(producer)
            if not lin:
                return m.fail(f"the value is made by {producer.op}, not a linear: {lin.reason}")
            lin = lin["linear"]
            ref, offset = lin.weight, shift
            bias_holder, bias_port = ((producer, port_of(producer, lin.bias))
                                      if lin.bias is not None else (None, 0))
        checked = check_weight(ref)
        if not checked:
            return checked
        if bias_holder is not None and not constant_vector(bias_holder.inputs[bias_port]):
            return m.fail("the value projection's bias is not a float32 constant")
        K = Hq * D
        return m.ok(group=Group(
            "attention", attn.module, (o_lin.node, port_of(o_lin.node, o_lin.x)),
            [o_lin.weight], K, value=(ref, offset, bias_holder, bias_port), heads=(Hq, Hkv, D)))

    # -- rewriting --------------------------------------------------------------------
    def _scales(self, x_max: torch.Tensor, w_max: torch.Tensor) -> torch.Tensor:
        s = x_max.pow(self.alpha) / w_max.pow(1 - self.alpha)
        ok = (x_max > 0) & (w_max > 0) & torch.isfinite(s)
        return torch.where(ok, s.clamp(min=1e-5), torch.ones_like(s))

    def _apply(self, graph: Graph, g: Group, origin: str) -> None:
        w_max = torch.stack([ref.tensor_NK().abs().amax(0) for ref in g.readers]).amax(0)
        x_max = g.stats.channel_max
        if g.rule == "attention":
            Hq, Hkv, D = g.heads
            group = Hq // Hkv
            # per KV channel: the max over the query heads sharing it
            s_kv = self._scales(x_max.reshape(Hkv, group, D).amax(1).reshape(-1),
                                w_max.reshape(Hkv, group, D).amax(1).reshape(-1))
            s = s_kv.reshape(Hkv, 1, D).expand(Hkv, group, D).reshape(-1)
            ref, offset, bias_holder, bias_port = g.value
            N = weight_shape_NK(ref)[0]
            rows = torch.ones(N)
            rows[offset:offset + s_kv.numel()] = 1 / s_kv
            scale_weight(graph, ref, rows_N=rows, origin=origin, suffix="smooth_v")
            if bias_holder is not None:
                scale_vector(graph, bias_holder, bias_port, 1 / s_kv, origin, "smooth_v",
                             start=offset)
        else:
            s = self._scales(x_max, w_max)
        for ref in g.readers:
            scale_weight(graph, ref, cols_K=s, origin=origin, suffix="smooth")
        if g.rule == "norm":
            gain_port, bias_port = NORMS[g.norm.op]
            scale_vector(graph, g.norm, gain_port, 1 / s, origin, "smooth")
            if bias_port is not None and bias_port < len(g.norm.inputs):
                scale_vector(graph, g.norm, bias_port, 1 / s, origin, "smooth")
        elif g.rule == "down":
            up, b_up = g.up
            scale_weight(graph, up, rows_N=1 / s, origin=origin, suffix="smooth")
            if b_up is not None:
                mlp = up.holder
                scale_vector(graph, mlp, port_of(mlp, b_up), 1 / s, origin, "smooth")


# -- the paths between a value and the nodes that read it ---------------------------------
def _readers(y: Value, K: int) -> Match:
    """``Match(uses=[(node, port)])``: the nodes reading ``y`` through views whose last dim
    stays ``K`` (so channel j is channel j everywhere); fails on a graph output."""
    m = Match()
    uses, todo = [], [y]
    while todo:
        v = todo.pop()
        if any(o is v for o in v.graph.outputs):
            return m.fail(f"%{v.name} is a graph output")
        for node, port in v.uses():
            if node.op in TRANSPARENT and node.arg("self") is v and len(node.outputs) == 1:
                out = node.outputs[0]
                if not out.shape or out.shape[-1] != K:
                    return m.fail(f"{node.op} reshapes it to {out.shape}, moving channels")
                todo.append(out)
            else:
                uses.append((node, port))
    if not uses:
        return m.fail("nothing reads it")
    return m.ok(uses=uses)


def _swaps_heads_and_tokens(node: Node) -> bool:
    if node.op == "aten.transpose.int":
        return {node.arg("dim0") % 4, node.arg("dim1") % 4} == {1, 2}
    if node.op == "aten.permute":
        return [d % 4 for d in node.arg("dims")] == [0, 2, 1, 3]
    return False


def _channel_map_kept(shape, H: int, D: int) -> bool:
    """A row-major view of heads x dims keeps channel ``h * D + d`` where its last dim is
    ``H * D`` or its last two are ``(H, D)``."""
    if not shape:
        return False
    return shape[-1] == H * D or (len(shape) >= 2 and tuple(shape[-2:]) == (H, D))


def _single_use(v: Value) -> bool:
    return len(v.uses()) == 1 and not any(o is v for o in v.graph.outputs)


def _heads_to_channels(out: Value, Hq: int, D: int) -> Match:
    """``Match(linear)``: the attention output ``[B, Hq, T, D]`` reaches one linear as
    ``reshape(transpose(out, 1, 2), [.., Hq * D])``, every value on the way single-use."""
    m = Match()
    if not _single_use(out):
        return m.fail("the attention output has other readers")
    node, _port = out.uses()[0]
    if not _swaps_heads_and_tokens(node) or len(out.shape or ()) != 4:
        return m.fail(f"the attention output goes to {node.op}, not a heads/tokens transpose")
    return _to_linear(node.outputs[0], Hq, D)


def _to_linear(v: Value, H: int, D: int) -> Match:
    """``Match(linear)``: ``v`` (heads x dims, channel ``h * D + d``) reaches one linear's
    input through single-use views that keep that channel map."""
    m = Match()
    while True:
        if not _channel_map_kept(v.shape, H, D):
            return m.fail(f"%{v.name} {v.shape} does not keep channel h * {D} + d")
        if not _single_use(v):
            return m.fail(f"%{v.name} on the way to o_proj has other readers")
        node, _port = v.uses()[0]
        if node.op in TRANSPARENT and node.arg("self") is v:
            v = node.outputs[0]
            continue
        lin = as_linear(node)
        if not lin:
            return m.fail(f"the attention output reaches {node.op}, not a linear: {lin.reason}")
        if lin["linear"].x is not v or v.shape[-1] != H * D:
            return m.fail(f"the attention output is not the input of {node.op}")
        return m.ok(linear=lin["linear"])


def _channels_to_heads(value_in: Value, Hkv: int, D: int) -> Match:
    """``Match(producer, index)``: the attention's value input ``[B, Hkv, T, D]`` is
    ``transpose(reshape(v, [B, T, Hkv, D]), 1, 2)`` of output ``index`` of ``producer``,
    every value on the way single-use."""
    m = Match()
    if not _single_use(value_in):
        return m.fail(f"the value %{value_in.name} has other readers")
    node = value_in.producer
    if not _swaps_heads_and_tokens(node):
        return m.fail(f"the value comes from {node.op}, not a heads/tokens transpose")
    return _from_producer(node.arg("self"), Hkv, D)


def _from_producer(v: Value, H: int, D: int) -> Match:
    """``Match(producer, index)``: ``v`` (``H`` heads x ``D``) is output ``index`` of
    ``producer``, through single-use views that keep channel ``h * D + d``."""
    m = Match()
    while True:
        if not _channel_map_kept(v.shape, H, D):
            return m.fail(f"%{v.name} {v.shape} does not keep channel kv * {D} + d")
        if not _single_use(v):
            return m.fail(f"%{v.name} on the way from the value projection has other readers")
        node = v.producer
        if node.op in TRANSPARENT and isinstance(node.arg("self"), Value):
            v = node.arg("self")
            continue
        if v.shape[-1] != H * D:
            return m.fail(f"%{v.name} {v.shape} is not {H} x {D} channels")
        return m.ok(producer=node, index=v.index)
