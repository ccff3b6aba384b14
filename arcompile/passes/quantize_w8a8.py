"""Static W8A8: int8 weights per output channel and int8 activations with a scale fixed by
calibration, so nothing measures an activation at run time (no dynamic quantization).

Matches, after the fusions and ``smooth_quant`` (the forms of ``linear_sites``):

- ``aten.linear`` / ``aten.mm`` / ``aten.addmm`` / ``aten.matmul`` / ``aten.bmm``:
  y = x @ W^T + b
- ``arc.split_linear(x, W, b, sizes)``: split(x @ W^T + b, sizes)
- ``arc.gated_mlp(x, Wg, Wu, Wd)``: two products, ``x @ [Wg; Wu]^T`` and
  ``h @ Wd^T`` with ``h = act(gate) * up``, each with its own activation scale.

Calibration: the graph as it stands runs the calibration sequences in the reference
interpreter; every product's input ``x`` gives one statistic of ``|x|`` over all its
elements: the max, or a percentile (``statistic="p99.99"``, values above it saturate).
Then, per product::

    C = channels j with max|x_j| > outlier_ratio * median_j max|x_j|  (the largest
        max_outliers of them; none when outlier_ratio is None)
    x_scale = stat(|x| outside C) / 127                        # zero point 0 (symmetric)
    w_scale[n] = max_{k not in C} |W[n, k]| / 63;   W_q = round(W / w_scale[n]), -63..63,
                 its rows C zero
    y = arc.qlinear(x, W_q^T [K, N] int8, w_scale [N][, C, W[:, C]^T]; x_scale) (+ b)
      = int8 product over the other channels + x[..., C] @ W[:, C]^T in float

Why the outlier channels: LLaMA-style models put a few "massive activations" at a sequence's
first token into a few channels (SmolLM2's down_proj input: 2,981 in one channel of layer 11
where the rest stays under 15; after SmoothQuant at alpha 0.5 still 132 against 14). One
per-tensor scale set by them rounds every other value to zero; clipping them instead (a
percentile) breaks the first token every later one attends to. Kept in float, they cost a
Gather and a ``[.., |C|] x [|C|, N]`` MatMul; everything else stays static int8.

Measured on SmolLM2 (fp32 perplexity 12.786 on the gate's 512 held tokens; smooth_quant at
alpha 0.5 first; 16 calibration sequences of 128 tokens, 4 in brackets): outlier_ratio 4:
12.895, +0.9% (46 of 120 products with outlier channels, 112 channels in all) [12.869];
6: 13.164 [-]; 8: 13.257, +3.7% (12 products, 25 channels) [12.749]; 16: [13.135]; none:
[15.48 with "max", 28.9 with "p99.99"]. 4 is the default: the one setting below +1% at both
calibration sizes (8 swings with the calibration set: the more text, the larger the maxima
the remaining channels' scale must cover). Statistics at ratio 8, 16 sequences: max 13.257,
mean_max 13.248, and p99.99 (4 sequences) 17.77: clipping hurts more than coarse steps.
Those figures had weight codes to +-127. With +-63 (``WEIGHT_QMAX``, below) the default
measured 12.812 (+0.20%) in the interpreter and 12.684 in ORT on an AVX2 EPYC.

Produces ``arc.qlinear`` (reference: ``ir/opdefs/qlinear.py``; ONNX: Q/DQ + MatMul,
``runtimes/onnxruntime/ops_arc_qdq.py``); ``split_linear`` becomes qlinear and
``aten.split_with_sizes``; ``gated_mlp`` becomes qlinear, split, ``aten.silu`` /
``aten.gelu``, ``aten.mul.Tensor`` and qlinear. Every product counts once under the rule
``w8a8_<statistic>`` (``w8a8_max``, ``w8a8_p99.99``); ``float_outlier_channels`` counts the
input channels kept in float, over all products.

Refuses (noted, left in float): a computed, non-2-D or non-float32 weight, an input that is
not float32 or whose last dim is not K, and the LM head unless ``include_lm_head`` (the
linear whose result is the logits, or whose weight an embedding also reads).

Numbers: changes the logits by design (activations rounded to a step of ``x_scale``, those
beyond the statistic clipped; weights to half a step of ``w_scale``); gated by perplexity
(``compiler/quantization.py``), not by max|Δlogit|.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import torch

from arcompile.eval.calibration import observe_inputs
from arcompile.ir.analysis import is_lm_head
from arcompile.ir.graph import Graph, Node, Value
from arcompile.passes.base import Pass, PassResult
from arcompile.passes.linear_sites import (
    LINEARS,
    AbsStats,
    WeightRef,
    as_linear,
    check_input,
    check_weight,
    gated_hidden,
    gated_parts,
    rewrite_gated_mlp,
    split_last,
    weight_shape_NK,
)
from arcompile.passes.match import Match

DEFAULT_STATISTIC = "max"
QMAX = 127  # activation codes -128..127 (symmetric scale: stat / 127)
# Weight codes stop at +-63 (7 bits). ONNX Runtime runs the int8 products as uint8 x int8
# (it shifts the int8 activations by 128), and its x86 kernels for CPUs without VNNI (AVX2,
# AVX-512F without VNNI) add each pair of u8*s8 products in int16 (vpmaddubsw), which
# saturates at 32767: with codes to +-127 a pair reaches 2 * 255 * 127 = 64770, and on such a
# CPU a 576-wide random layer came out 24% off (tests/test_quantize_w8a8.py). 2 * 255 * 63 =
# 32130 fits, so the engine computes the same numbers on every x86 CPU. ORT's own quantizer
# calls this reduce_range and advises it for those CPUs.
WEIGHT_QMAX = 63
# an input channel whose calibrated max exceeds this many times the median channel's runs in
# float (at most DEFAULT_MAX_OUTLIERS per product): see the module docstring
DEFAULT_OUTLIER_RATIO = 4.0
DEFAULT_MAX_OUTLIERS = 8


def parse_statistic(statistic: str) -> float | None:
    """None for "max" and "mean_max", the percentile for "pNN.NN"; ValueError otherwise."""
    if statistic in ("max", "mean_max"):
        return None
    m = re.fullmatch(r"p(\d+(?:\.\d+)?)", statistic)
    if m and 0 < float(m.group(1)) < 100:
        return float(m.group(1))
    raise ValueError(f"quantize_w8a8: statistic must be 'max', 'mean_max' or a percentile "
                     f"such as 'p99.99', got {statistic!r}")


@dataclass
class Product:
    """One matmul to quantize: what it reads (``port``, or "hidden" for a gated MLP's down
    input) and the weights it multiplies by (several: gate and up as one ``[2I, K]``)."""

    node: Node
    port: object
    weights: list[WeightRef]
    stats: AbsStats


def quantize_weight_per_channel(weight_NK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W_q^T [K, N] int8, scale [N] float32)``: symmetric, per output channel, codes
    -63..63 (``WEIGHT_QMAX``; round to nearest, ties to even)."""
    w = weight_NK.detach().float()
    scale = w.abs().amax(1) / WEIGHT_QMAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(w / scale[:, None]), -WEIGHT_QMAX, WEIGHT_QMAX).to(torch.int8)
    return q.t().contiguous(), scale.contiguous()


def activation_scale(stat: float) -> float:
    """``stat / 127`` as the float32 number the backend stores (1.0 for an all-zero input)."""
    scale = stat / QMAX if stat > 0 and math.isfinite(stat) else 1.0
    return float(torch.tensor(scale, dtype=torch.float32))


class QuantizeW8A8(Pass):
    """See the module docstring."""

    name = "quantize_w8a8"
    tolerance = math.inf  # by design; gated by perplexity, not by max|Δlogit|

    def __init__(self, sequences: Sequence[Sequence[int]], statistic: str = DEFAULT_STATISTIC,
                 include_lm_head: bool = False, calibration_text: str | None = None,
                 outlier_ratio: float | None = DEFAULT_OUTLIER_RATIO,
                 max_outliers: int = DEFAULT_MAX_OUTLIERS):
        self.percentile = parse_statistic(statistic)
        if outlier_ratio is not None and outlier_ratio <= 1:
            raise ValueError(f"quantize_w8a8: outlier_ratio must exceed 1, got {outlier_ratio}")
        if max_outliers < 0:
            raise ValueError(f"quantize_w8a8: max_outliers must be >= 0, got {max_outliers}")
        self.outlier_ratio = outlier_ratio
        self.max_outliers = max_outliers
        if not sequences:
            raise ValueError("quantize_w8a8 needs calibration sequences")
        self.statistic = statistic
        self.sequences = [list(s) for s in sequences]
        self.include_lm_head = include_lm_head
        self.calibration_text = calibration_text

    @property
    def rule(self) -> str:
        return f"w8a8_{self.statistic}"

    def settings(self) -> dict:
        return {"method": "static", "weights": "int8 per output channel, symmetric",
                "activations": "int8 per tensor, static, zero point 0",
                "statistic": self.statistic, "include_lm_head": self.include_lm_head,
                "outlier_ratio": self.outlier_ratio, "max_outliers": self.max_outliers,
                "calibration": {"samples": len(self.sequences),
                                "tokens": len(self.sequences[0]),
                                "text": self.calibration_text}}

    def run(self, graph: Graph) -> PassResult:
        result = PassResult()
        found: dict[Node, list[Product]] = {}
        for node in graph.nodes():
            m = self._match(graph, node)
            if m is None:
                continue
            if m:
                found[node] = m["products"]
            else:
                result.note(f"kept {node.op} at {node.module or '<top>'} in float: {m.reason}")
        if not found:
            return result

        def visit(node: Node, args: list) -> None:
            for p in found[node]:
                p.stats.add(gated_hidden(node, args) if p.port == "hidden" else args[p.port])

        observe_inputs(graph, self.sequences, found, visit)
        done: dict[tuple, tuple[Value, Value]] = {}
        for node, products in found.items():
            if node.op == "arc.gated_mlp":
                self._rewrite_gated_mlp(graph, node, products, done)
            elif node.op == "arc.split_linear":
                self._rewrite_split_linear(graph, node, products[0], done)
            else:
                self._rewrite_linear(graph, node, products[0], done)
            result.bump(self.rule, len(products))
        kept = sum(int(n.inputs[3].shape[0]) for n in graph.nodes()
                   if n.op == "arc.qlinear" and n.attrs.get("has_outliers"))
        if kept:
            result.bump("float_outlier_channels", kept)
        return result

    # -- matching ---------------------------------------------------------------------
    def _stats(self) -> AbsStats:
        return AbsStats(self.percentile, calls=len(self.sequences))

    def _match(self, graph: Graph, node: Node) -> Match | None:
        m = Match()
        if node.op == "arc.gated_mlp":
            x, (gate, up, down), biases = gated_parts(node)
            for ref in (gate, up, down):
                checked = check_weight(ref)
                if not checked:
                    return checked
            if any(b is not None and (not b.is_constant or b.dtype != torch.float32)
                   for b in biases):
                return m.fail("a bias is computed or not float32")
            checked = check_input(x, weight_shape_NK(gate)[1])
            if not checked:
                return checked
            return m.ok(products=[Product(node, 0, [gate, up], self._stats()),
                                  Product(node, "hidden", [down], self._stats())])
        if node.op == "arc.split_linear":
            ref = WeightRef(node, 1, node.attrs["weight_layout"])
            checked = check_weight(ref)
            if not checked:
                return checked
            checked = check_input(node.inputs[0], weight_shape_NK(ref)[1])
            if not checked:
                return checked
            if len(node.inputs) > 2 and node.inputs[2].dtype != torch.float32:
                return m.fail("its bias is not float32")
            return m.ok(products=[Product(node, 0, [ref], self._stats())])
        if node.op not in LINEARS:
            return None
        lin = as_linear(node)
        if not lin:  # a matmul or bmm of two activations is no linear to report on
            return None if node.op in ("aten.matmul", "aten.bmm") else lin
        lin = lin["linear"]
        if not self.include_lm_head and is_lm_head(graph, node, lin.weight.value):
            return m.fail("it is the LM head, kept in float (include_lm_head=False)")
        port = next(i for i, v in enumerate(node.inputs) if v is lin.x)
        return m.ok(products=[Product(node, port, [lin.weight], self._stats())],
                    bias=lin.bias)

    # -- building ---------------------------------------------------------------------
    def outliers(self, channel_max: torch.Tensor) -> torch.Tensor:
        """The input channels kept in float: those beyond ``outlier_ratio`` x the median
        channel's max, the largest ``max_outliers`` of them, in channel order (int64)."""
        if self.outlier_ratio is None or not self.max_outliers:
            return torch.zeros(0, dtype=torch.int64)
        beyond = torch.nonzero(channel_max > self.outlier_ratio * channel_max.median())[:, 0]
        if beyond.numel() > self.max_outliers:
            beyond = beyond[torch.topk(channel_max[beyond], self.max_outliers).indices]
        return beyond.sort().values

    def _qlinear(self, graph: Graph, node: Node, x: Value, product: Product,
                 bias: Value | None, shape: tuple, name: str, done: dict) -> Value:
        channels = self.outliers(product.stats.channel_max)
        key = (tuple((tuple(ref.parts()[0]), ref.layout) for ref in product.weights),
               tuple(channels.tolist()))
        origin, base = f"{self.name}/{self.rule}", product.weights[0].value.name
        if key not in done:
            weight_NK = torch.cat([ref.tensor_NK() for ref in product.weights], 0)
            outlier_CN = None
            if channels.numel():
                outlier_CN = weight_NK[:, channels].t().contiguous()
                weight_NK = weight_NK.clone()
                weight_NK[:, channels] = 0  # those channels' int8 codes add nothing
            q_KN, scale_N = quantize_weight_per_channel(weight_NK)
            made = [graph.add_constant(q_KN, name=f"{base}_q8_KN", module=node.module,
                                       origin=origin),
                    graph.add_constant(scale_N, name=f"{base}_scale_N", module=node.module,
                                       origin=origin)]
            if outlier_CN is not None:
                made += [graph.add_constant(channels, name=f"{base}_outlier_channels_C",
                                            module=node.module, origin=origin),
                         graph.add_constant(outlier_CN, name=f"{base}_outlier_CN",
                                            module=node.module, origin=origin)]
            done[key] = made
        stat = product.stats.value(without=channels if channels.numel() else None,
                                   mean_of_max=self.statistic == "mean_max")
        attrs = {"x_scale": activation_scale(stat), "x_zero_point": 0,
                 "has_outliers": bool(channels.numel()), "has_bias": bias is not None}
        inputs = list(done[key]) + ([bias] if bias is not None else [])
        return graph.add_node("arc.qlinear", [x] + inputs, attrs, [(x.dtype, shape)],
                              module=node.module, origin=origin, names=[name]).output

    def _rewrite_linear(self, graph: Graph, node: Node, product: Product, done: dict) -> None:
        # y = x @ W^T + b
        lin = as_linear(node)["linear"]
        out = node.outputs[0]
        y = self._qlinear(graph, node, lin.x, product, lin.bias, out.shape, out.name, done)
        out.replace_all_uses_with(y)
        graph.remove_node(node)

    def _rewrite_split_linear(self, graph: Graph, node: Node, product: Product,
                              done: dict) -> None:
        # split(x @ W^T + b, sizes, -1)
        x, _weight, *bias = node.inputs
        N = sum(node.attrs["sizes"])
        y = self._qlinear(graph, node, x, product, bias[0] if bias else None,
                          tuple(x.shape[:-1]) + (N,), f"{node.outputs[0].name}_merged", done)
        pieces = split_last(graph, node, y, list(node.attrs["sizes"]),
                            [v.name for v in node.outputs], f"{self.name}/{self.rule}")
        for old, new in zip(node.outputs, pieces):
            old.replace_all_uses_with(new)
        graph.remove_node(node)

    def _rewrite_gated_mlp(self, graph: Graph, node: Node, products: list[Product],
                           done: dict) -> None:
        # down(act(x @ Wg^T + bg) * (x @ Wu^T + bu)) + bd, [Wg; Wu] as one product
        x, (gate, _up, _down), biases = gated_parts(node)
        product = {"gate_up": products[0], "down": products[1]}
        rewrite_gated_mlp(graph, node, x, biases, weight_shape_NK(gate)[0],
                          f"{self.name}/{self.rule}",
                          lambda v, bias, shape, name, part: self._qlinear(
                              graph, node, v, product[part], bias, shape, name, done))
