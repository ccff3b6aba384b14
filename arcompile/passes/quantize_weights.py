"""Weight-only quantization by round-to-nearest: linears with constant weights become
``arc.matmul_nbits`` (int4 group-wise or int8; symmetric, asymmetric with an integer zero
point, or asymmetric with a float minimum per block as llama.cpp's Q4_1; ``quant_math``).

Matches, after the fusions (so merged weights are quantized as the one matmul they run as):

- ``aten.linear(x, W[N, K], b)``, ``aten.mm(x, W[K, N])``, ``aten.addmm(b, x, W[K, N])``,
  ``aten.matmul(x, W[K, N])`` and ``aten.bmm(x[B, T, K], expand(W[K, N], [B, K, N]))`` (how
  ``run_decompositions()`` writes a linear on a non-contiguous input): y = x @ W^T + b
- ``arc.split_linear(x, W, b, sizes)``, W a constant or ``arc.concat_weights`` of constants
  (merged Q/K/V): split(x @ W^T + b, sizes)
- ``arc.gated_mlp(x, Wg, Wu, Wd)``: down(act(x @ Wg^T) * (x @ Wu^T)), gate and up quantized
  as one ``[2I, H]`` weight (one kernel call, as the float lowering does).

Produces, per weight matrix,
``arc.matmul_nbits(x, packed, scales[, zero_points][, block_offsets][, bias])`` over new
uint8/float constants (the float weights become dead; DCE removes them unless
something else reads them, e.g. a tied embedding). ``split_linear`` becomes matmul_nbits and
``aten.split_with_sizes``; ``gated_mlp`` becomes matmul_nbits, split, ``aten.silu`` /
``aten.gelu``, ``aten.mul.Tensor`` and matmul_nbits. Every one of those counts once under the
rule named for the format, e.g. ``int4_g32_sym``, ``int8_g128_asym`` or ``int4_g32_fmin``
(``zero_point`` "none", "int" or "float"; ``symmetric=True`` is "none").

Refuses (node left as it was, reason noted): a weight that is computed rather than a
constant, not 2-D or not float32, an input that is not float32 or whose last dim is not K,
and the LM head unless ``include_lm_head`` (the linear whose result is the logits, or whose
weight an embedding also reads). The embedding table itself is never quantized (a gather).

Numbers: changes the logits by design (|w - dequant(w)| <= scale / 2 per element), so the
pass manager's max|Δlogit| check cannot hold it; its gate is perplexity on held text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from arcompile.ir.graph import Graph, Node, Value
from arcompile.passes.base import Pass, PassResult
from arcompile.passes.match import TRANSPARENT, Match
from arcompile.passes.merge_linears import as_linear
from arcompile.passes.quant_math import QuantizedWeight, check_format, quantize

LINEARS = ("aten.linear", "aten.mm", "aten.addmm", "aten.matmul", "aten.bmm")
# Defaults from SmolLM2 (perplexity on 512 held tokens, fp32 12.79; decode ms/token at 2
# threads on a busy machine, fp32 38): int4 g32 asymmetric 16.0 (sym 19.1; g64/g128 asym
# 18.5/18.4), 17 ms; int8 g128 12.81 either way (g32 12.79), 21 ms. Asymmetric costs one byte
# per block. int4's float minimum (zero_point "float") gives this Q4_1-born model back: g32
# 12.79 at level 0, 12.80 at level 4 (g64 16.3-16.5, g128 20.0, the latter worse than the
# integer zero point's 18.4 though its weight error is 9% smaller); decode on an idle machine
# 8.5 ms against 7.5 for the integer zero point and 16.9 for fp32.
DEFAULT_BLOCK_SIZE = {4: 32, 8: 128}
# ORT's CPU kernel at accuracy_level 0 dequantizes 8-bit weights on every call (30-100x slower
# than fp32 here); level 4 (int8 activations per block) is its fast path for both widths
# (int4 g32: 17 ms/token against 24 at level 0; perplexity 19.25 against 19.11).
DEFAULT_ACCURACY_LEVEL = 4
# zero_point option -> the rule's suffix. "none": symmetric; "int": an integer zero point per
# block (MatMulNBits' own); "float": a float minimum per block (llama.cpp's Q4_1), run as the
# symmetric codes plus a float product of x's block sums (quant_math, ops_arc_quant).
ZERO_POINTS = {"none": "sym", "int": "asym", "float": "fmin"}
DEFAULT_ZERO_POINT = {4: "float", 8: "int"}


@dataclass
class Site:
    """One weight matrix to quantize: its float value ``[N, K]`` and where it came from."""

    weight_NK: torch.Tensor
    key: tuple  # identifies the source constants, so a shared weight is quantized once
    name: str  # the float weight's name, for the new constants' names


class QuantizeWeights(Pass):
    """See the module docstring."""

    name = "quantize_weights"
    tolerance = math.inf  # by design; gated by perplexity, not by max|Δlogit|

    def __init__(self, bits: int = 4, block_size: int | None = None, symmetric: bool = False,
                 include_lm_head: bool = False, accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
                 zero_point: str | None = None):
        if bits not in (4, 8):
            raise ValueError(f"quantize_weights: bits must be 4 or 8, got {bits}")
        self.bits = bits
        self.block_size = block_size or DEFAULT_BLOCK_SIZE[bits]
        check_format(bits, self.block_size)
        if accuracy_level not in (0, 4):
            raise ValueError(f"quantize_weights: accuracy_level must be 0 or 4, got "
                             f"{accuracy_level}")
        if symmetric and zero_point not in (None, "none"):
            raise ValueError(f"quantize_weights: symmetric has no zero point, got "
                             f"zero_point={zero_point!r}")
        self.zero_point = "none" if symmetric else zero_point or DEFAULT_ZERO_POINT[bits]
        if self.zero_point not in ZERO_POINTS:
            raise ValueError(f"quantize_weights: zero_point must be one of {ZERO_POINTS}, got "
                             f"{self.zero_point!r}")
        self.symmetric = self.zero_point == "none"
        self.include_lm_head = include_lm_head
        self.accuracy_level = accuracy_level

    @property
    def rule(self) -> str:
        return f"int{self.bits}_g{self.block_size}_{ZERO_POINTS[self.zero_point]}"

    def settings(self) -> dict:
        return {"bits": self.bits, "block_size": self.block_size, "symmetric": self.symmetric,
                "zero_point": self.zero_point, "include_lm_head": self.include_lm_head,
                "accuracy_level": self.accuracy_level, "method": "rtn"}

    def run(self, graph: Graph) -> PassResult:
        result = PassResult()
        done: dict[tuple, list[Value]] = {}  # this run's quantized weights, by source
        for node in graph.nodes():
            if node not in graph:
                continue
            if node.op == "arc.gated_mlp":
                m = self._gated_mlp(graph, node, done)
            elif node.op == "arc.split_linear":
                m = self._split_linear(graph, node, done)
            elif node.op in LINEARS:
                m = self._linear(graph, node, done)
            else:
                continue
            if m is None:
                continue
            if m:
                result.bump(self.rule, m["count"])
            else:
                result.note(f"kept {node.op} at {node.module or '<top>'} in float: {m.reason}")
        return result

    # -- matching ---------------------------------------------------------------------
    def _check_input(self, x: Value, K: int) -> Match:
        m = Match()
        if x.dtype != torch.float32:
            return m.fail(f"its input %{x.name} is {x.dtype}, not float32")
        if not x.shape or x.shape[-1] != K:
            return m.fail(f"its input %{x.name} {x.shape} does not end in K={K}")
        return m.ok()

    def _site(self, x: Value, weight: Value, layout: str, bias: Value | None) -> Match:
        """``Match(site=Site)`` for one linear: a quantizable weight, a float32 input ending
        in K, a float32 bias if any."""
        w = self._weight(weight, layout)
        if not w:
            return w
        checked = self._check_input(x, w["site"].weight_NK.shape[1])
        if not checked:
            return checked
        if bias is not None and bias.dtype != torch.float32:
            return Match().fail(f"its bias %{bias.name} is {bias.dtype}, not float32")
        return w

    @staticmethod
    def _weight(value: Value, layout: str) -> Match:
        """``Match(site=Site)`` when ``value`` is a float32 2-D constant (or a concatenation of
        constants); ``layout`` "out_in" ([N, K]) or "in_out" ([K, N])."""
        m = Match()
        parts = [value]
        dim = None
        if not value.is_constant and value.producer.op == "arc.concat_weights":
            parts, dim = list(value.producer.inputs), value.producer.attrs["dim"]
        for v in parts:
            if not v.is_constant:
                return m.fail(f"the weight %{v.name} is computed, not a constant")
            if v.dtype != torch.float32:
                return m.fail(f"the weight %{v.name} is {v.dtype}, not float32")
            if v.shape is None or len(v.shape) != 2:
                return m.fail(f"the weight %{v.name} is not 2-D")
        data = parts[0].data if dim is None else torch.cat([v.data for v in parts], dim)
        weight_NK = data if layout == "out_in" else data.t()
        return m.ok(site=Site(weight_NK, (tuple(parts), dim, layout), value.name))

    def _is_lm_head(self, graph: Graph, node: Node, weight: Value) -> bool:
        """The linear whose result is the logits (through views), or that reads an
        embedding's table (tied weights)."""
        if any(user.op == "aten.embedding" for user, _ in weight.uses()):
            return True
        out = node.outputs[0]
        while out not in graph.outputs:
            uses = out.uses()
            if len(uses) != 1 or uses[0][0].op not in TRANSPARENT:
                return False
            out = uses[0][0].outputs[0]
        return True

    # -- the three forms --------------------------------------------------------------
    @staticmethod
    def _as_linear(node: Node) -> Match:
        """``Match(x, weight, bias, layout)`` for the traced forms of y = x @ W^T + b."""
        m = Match()
        if node.op == "aten.matmul":
            x, weight = node.arg("self"), node.arg("other")
        elif node.op == "aten.bmm":
            # run_decompositions() writes x[B, T, K] @ W[K, N] as bmm(x, expand(W, [B, K, N]))
            x, expanded = node.arg("self"), node.arg("mat2")
            if not isinstance(expanded, Value) or expanded.producer.op != "aten.expand":
                return m.fail("aten.bmm: the right operand is not a weight expanded over batch")
            weight = expanded.producer.arg("self")
            if (not isinstance(weight, Value) or weight.shape is None or len(weight.shape) != 2
                    or tuple(expanded.shape[1:]) != tuple(weight.shape)
                    or x.shape is None or len(x.shape) != 3
                    or expanded.shape[0] != x.shape[0]):
                return m.fail("aten.bmm: the right operand is not a 2-D weight expanded over "
                              "the batch dim of the left")
        else:
            lin = as_linear(node)
            if not lin:
                return lin
            lin = lin["linear"]
            return m.ok(x=lin.x, weight=lin.weight, bias=lin.bias, layout=lin.layout)
        if not isinstance(weight, Value) or weight.shape is None or len(weight.shape) != 2:
            return m.fail(f"{node.op}: the right operand is not a 2-D tensor")
        return m.ok(x=x, weight=weight, bias=None, layout="in_out")

    def _linear(self, graph: Graph, node: Node, done: dict) -> Match | None:
        # y = x @ W^T + b  (aten.linear: W [N, K]; mm/addmm/matmul/bmm: W [K, N])
        m = self._as_linear(node)
        if not m:  # a matmul or bmm of two activations is no linear to report on
            return None if node.op in ("aten.matmul", "aten.bmm") else m
        x, weight, bias, layout = m["x"], m["weight"], m["bias"], m["layout"]
        w = self._site(x, weight, layout, bias)
        if not w:
            return w
        site = w["site"]
        if not self.include_lm_head and self._is_lm_head(graph, node, weight):
            return m.fail("it is the LM head, kept in float (include_lm_head=False)")
        out = node.outputs[0]
        y = self._matmul_nbits(graph, node, x, site, bias, out.shape, out.name, done)
        out.replace_all_uses_with(y)
        graph.remove_node(node)
        return m.ok(count=1)

    def _split_linear(self, graph: Graph, node: Node, done: dict) -> Match:
        # split(x @ W^T + b, sizes, -1), W the merged Q/K/V
        x, weight, *bias = node.inputs
        w = self._site(x, weight, node.attrs["weight_layout"], bias[0] if bias else None)
        if not w:
            return w
        site = w["site"]
        N = site.weight_NK.shape[0]
        y = self._matmul_nbits(graph, node, x, site, bias[0] if bias else None,
                               tuple(x.shape[:-1]) + (N,), f"{node.outputs[0].name}_merged", done)
        pieces = self._split(graph, node, y, list(node.attrs["sizes"]),
                             [v.name for v in node.outputs])
        for old, new in zip(node.outputs, pieces):
            old.replace_all_uses_with(new)
        graph.remove_node(node)
        return Match().ok(count=1)

    def _gated_mlp(self, graph: Graph, node: Node, done: dict) -> Match:
        # down(act(x @ Wg^T + bg) * (x @ Wu^T + bu)) + bd, with [Wg; Wu] as one weight
        x, w_gate, w_up, w_down, *rest = node.inputs
        layout = node.attrs["weight_layout"]
        has_bias = list(node.attrs.get("has_bias", (False, False, False)))
        it = iter(rest)
        b_gate, b_up, b_down = (next(it) if present else None for present in has_bias)
        gate = self._weight(w_gate, layout)
        up = self._weight(w_up, layout)
        down = self._weight(w_down, layout)
        for w in (gate, up, down):
            if not w:
                return w
        wg, wu = gate["site"], up["site"]
        inner, K = wg.weight_NK.shape
        checked = self._check_input(x, K)
        if not checked:
            return checked
        biases = [b for b in (b_gate, b_up, b_down) if b is not None]
        if any(not b.is_constant or b.dtype != torch.float32 for b in biases):
            return Match().fail("a bias is computed or not float32")
        origin, module = f"{self.name}/{self.rule}", node.module
        gate_up = Site(torch.cat([wg.weight_NK, wu.weight_NK], 0), ("gate_up", wg.key, wu.key),
                       f"{wg.name}_up")
        b_gate_up = None
        if b_gate is not None or b_up is not None:
            zeros = torch.zeros(inner)
            b_gate_up = graph.add_constant(
                torch.cat([b_gate.data if b_gate is not None else zeros,
                           b_up.data if b_up is not None else zeros]),
                name=f"{node.output.name}_gate_up_bias", module=module, origin=origin)
        lead = tuple(x.shape[:-1])
        base = node.output.name
        gu = self._matmul_nbits(graph, node, x, gate_up, b_gate_up, lead + (2 * inner,),
                                f"{base}_gate_up", done)
        g, u = self._split(graph, node, gu, [inner, inner], [f"{base}_gate", f"{base}_up"])
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
        y = self._matmul_nbits(graph, node, hidden, down["site"], b_down, out.shape,
                               f"{base}_down", done)
        out.replace_all_uses_with(y)
        graph.remove_node(node)
        return Match().ok(count=2)

    # -- building ---------------------------------------------------------------------
    def _constants(self, graph: Graph, node: Node, site: Site, done: dict) -> list:
        """``[packed, scales, zero points or None, block offsets or None]`` of ``site``, made
        once per run."""
        if site.key in done:
            return done[site.key]
        q: QuantizedWeight = quantize(site.weight_NK, self.bits, self.block_size,
                                      self.symmetric, float_minimum=self.zero_point == "float")
        origin, base = f"{self.name}/{self.rule}", site.name
        values = [graph.add_constant(q.packed, name=f"{base}_q{self.bits}_NbB",
                                     module=node.module, origin=origin),
                  graph.add_constant(q.scales, name=f"{base}_scales_Nb", module=node.module,
                                     origin=origin)]
        zero_points = offsets = None
        if q.zero_points is not None:
            zero_points = graph.add_constant(q.zero_points, name=f"{base}_zero_points_Nb",
                                             module=node.module, origin=origin)
        if q.block_offsets is not None:
            offsets = graph.add_constant(q.block_offsets, name=f"{base}_block_offsets_bN",
                                         module=node.module, origin=origin)
        done[site.key] = values + [zero_points, offsets]
        return done[site.key]

    def _matmul_nbits(self, graph: Graph, node: Node, x: Value, site: Site,
                      bias: Value | None, shape: tuple, name: str, done: dict) -> Value:
        N, K = site.weight_NK.shape
        packed, scales, zero_points, offsets = self._constants(graph, node, site, done)
        inputs = [v for v in (packed, scales, zero_points, offsets, bias) if v is not None]
        attrs = {"K": K, "N": N, "bits": self.bits, "block_size": self.block_size,
                 "has_zero_points": zero_points is not None,
                 "has_block_offsets": offsets is not None, "has_bias": bias is not None,
                 "accuracy_level": self.accuracy_level}
        return graph.add_node("arc.matmul_nbits", [x] + inputs, attrs,
                              [(x.dtype, shape)], module=node.module,
                              origin=f"{self.name}/{self.rule}", names=[name]).output

    def _split(self, graph: Graph, node: Node, y: Value, sizes: list[int],
               names: list[str]) -> list[Value]:
        lead = tuple(y.shape[:-1])
        return list(graph.add_op("aten.split_with_sizes",
                                 {"self": y, "split_sizes": sizes, "dim": -1},
                                 [(y.dtype, lead + (s,)) for s in sizes], module=node.module,
                                 origin=f"{self.name}/{self.rule}",
                                 names=[f"{n}_q" for n in names]).outputs)
