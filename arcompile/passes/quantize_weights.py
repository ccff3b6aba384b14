"""Weight-only quantization: linears with constant weights become ``arc.matmul_nbits``
(int4 group-wise or int8; symmetric, asymmetric with an integer zero point, or asymmetric with
a float minimum per block as llama.cpp's Q4_1; ``quant_math``), by round-to-nearest
(``method="rtn"``) or by GPTQ (``method="gptq"``, ``quant_gptq``: each weight's rounding
errors corrected against ``E[x^T x]`` of what it multiplies, measured by running the
``calibration`` token sequences through the unquantized graph in the reference interpreter
before anything is rewritten; the down projection's input inside ``arc.gated_mlp`` is
computed from its float gate and up weights). Both methods store the same format.

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
(``zero_point`` "none", "int" or "float"; ``symmetric=True`` is "none"); the LM head, with
``include_lm_head``, under ``lm_head_`` + its format (same block size; ``lm_head_bits`` 4 or
8 and ``lm_head_zero_point``, by default the others' zero point for the same width, else that
width's default).

Refuses (node left as it was, reason noted): a weight that is computed rather than a
constant, not 2-D or not float32, an input that is not float32 or whose last dim is not K,
and the LM head unless ``include_lm_head`` (the linear whose result is the logits, or whose
weight an embedding also reads).

The token embedding, with ``embedding="lm_head"`` and the LM head quantized: where the
lookup (``aten.embedding``) reads the LM head's own weight constant (tied weights), it becomes
``arc.gather_nbits(indices, packed, scales[, zero_points])`` on the head's quantized table, so
the float table goes dead and the engine holds the weights once, quantized (counted as
``embedding_`` + the head's rule). Not for the float-minimum form (``zero_point="float"``: no
lookup kernel reads its block offsets; noted, the lookup stays float) nor for an untied
table, which stays float. ``embedding="fp32"`` (the pass's default) keeps every lookup float.

``keep_float`` (module names) keeps those modules' linears in float, noted; ``keep_int8``
quantizes their 4-bit weights as int8 instead (``FALLBACK_INT8``, round-to-nearest: int8 mode's
defaults), and keeps float those already 8-bit. The perplexity gate's fallback
(``compiler/quant_fallback.py``) ranks modules by ``errors`` (per module, the largest relative error
of its quantized weights: on the calibration activations with GPTQ, ``|(W - Q) x|^2 /
|W x|^2`` summed over them, else in the weights, ``|W - Q|^2 / |W|^2``) and runs the pass
again with the worst kept. A run reuses the weights an earlier run of the same pass quantized
(by the float weights' names and the format), so only the first one calibrates.

Numbers: changes the logits by design (round-to-nearest: |w - dequant(w)| <= scale / 2 per
element; GPTQ: every element on its block's grid, a smaller error on the calibration
activations), so the pass manager's max|Δlogit| check cannot hold it; its gate is perplexity
on held text. GPTQ is deterministic for the same sequences.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Collection, Sequence

import torch

from arcompile import progress
from arcompile.eval.calibration import observe_inputs
from arcompile.ir.analysis import is_lm_head
from arcompile.ir.graph import Graph, Node, Value
from arcompile.ir.quant_math import QuantizedWeight, check_format, quantize
from arcompile.passes.base import Pass, PassResult
from arcompile.passes.linear_sites import (
    LINEARS,
    WeightRef,
    as_linear,
    check_input,
    check_weight,
    gated_hidden,
    gated_parts,
    port_of,
    rewrite_gated_mlp,
    split_last,
)
from arcompile.passes.match import Match
from arcompile.passes.quant_gptq import SecondMoment, gptq

# Defaults from SmolLM2 (perplexity on 512 held tokens, fp32 12.79; decode ms/token at 2
# threads on a busy machine, fp32 38): int4 g32 asymmetric 16.0 (sym 19.1; g64/g128 asym
# 18.5/18.4), 17 ms; int8 g128 12.81 either way (g32 12.79), 21 ms. Asymmetric costs one byte
# per block. int4's float minimum (zero_point "float") gives this Q4_1-born model back: g32
# 12.79 at level 0, 12.80 at level 4 (g64 16.3-16.5, g128 20.0, the latter worse than the
# integer zero point's 18.4 though its weight error is 9% smaller); decode on an idle machine
# 8.5 ms against 7.5 for the integer zero point and 16.9 for fp32. GPTQ takes the integer
# zero point to 12.84 at g32 (compiler/quantization.py's table), so `--quantize int4` uses that.
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
METHODS = ("rtn", "gptq")  # round-to-nearest; GPTQ on calibration text (quant_gptq)
# the token embedding: float, or reading the tied LM head's quantized table (_share_table)
EMBEDDINGS = ("fp32", "lm_head")


@dataclass(frozen=True)
class Format:
    """How one weight is stored: bits, block size along K, zero point option."""

    bits: int
    block_size: int
    zero_point: str  # "none", "int" or "float" (ZERO_POINTS)

    @property
    def errors_measure(self) -> str:
        """What ``errors`` measures."""
        return ("the relative output error on the calibration text" if self.method == "gptq"
                else "the relative weight error")

    @property
    def rule(self) -> str:
        return f"int{self.bits}_g{self.block_size}_{ZERO_POINTS[self.zero_point]}"


# what the gate's fallback widens a 4-bit module to (keep_int8): int8 mode's defaults
# (compiler/quantization.py: blocks of 32, integer zero point; +0.35% on SmolLM2 as a whole model)
FALLBACK_INT8 = Format(8, 32, "int")


@dataclass
class Site:
    """One weight matrix to quantize: its float value ``[N, K]`` and where it came from."""

    weight_NK: torch.Tensor
    key: tuple  # identifies the source constants, so a shared weight is quantized once
    name: str  # the float weight's name, for the new constants' names
    lm_head: bool = False


class QuantizeWeights(Pass):
    """See the module docstring."""

    name = "quantize_weights"
    tolerance = math.inf  # by design; gated by perplexity, not by max|Δlogit|

    def __init__(self, bits: int = 4, block_size: int | None = None, symmetric: bool = False,
                 include_lm_head: bool = False, accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
                 zero_point: str | None = None, lm_head_bits: int | None = None,
                 lm_head_zero_point: str | None = None, method: str = "rtn",
                 calibration: Sequence[Sequence[int]] | None = None,
                 calibration_text: str | None = None, embedding: str = "fp32",
                 keep_float: Collection[str] = (), keep_int8: Collection[str] = ()):
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
            raise ValueError(f"quantize_weights: zero_point must be one of {', '.join(ZERO_POINTS)}, got "
                             f"{self.zero_point!r}")
        self.symmetric = self.zero_point == "none"
        self.include_lm_head = include_lm_head
        if lm_head_bits not in (None, 4, 8):
            raise ValueError(f"quantize_weights: lm_head_bits must be 4 or 8, got "
                             f"{lm_head_bits}")
        if (lm_head_bits is not None or lm_head_zero_point is not None) and not include_lm_head:
            raise ValueError("quantize_weights: lm_head_bits / lm_head_zero_point need "
                             "include_lm_head=True")
        if lm_head_zero_point not in (None, *ZERO_POINTS):
            raise ValueError(f"quantize_weights: lm_head_zero_point must be one of "
                             f"{', '.join(ZERO_POINTS)}, got {lm_head_zero_point!r}")
        self.lm_head_bits = lm_head_bits or bits
        if embedding not in EMBEDDINGS:
            raise ValueError(f"quantize_weights: embedding must be one of "
                             f"{', '.join(EMBEDDINGS)}, got {embedding!r}")
        self.embedding = embedding
        self.accuracy_level = accuracy_level
        if method not in METHODS:
            raise ValueError(f"quantize_weights: method must be one of {METHODS}, got "
                             f"{method!r}")
        if method == "gptq" and not calibration:
            raise ValueError("quantize_weights: method 'gptq' needs calibration sequences")
        if method == "rtn" and calibration:
            raise ValueError("quantize_weights: method 'rtn' takes no calibration sequences")
        self.method = method
        self.calibration = [list(ids) for ids in calibration or ()]
        self.calibration_text = calibration_text
        self.format = Format(bits, self.block_size, self.zero_point)
        # the LM head: this format, or its own width and zero point (by default the others'
        # for the same width, else that width's default)
        self.lm_head_format = Format(self.lm_head_bits, self.block_size, lm_head_zero_point or (
            self.zero_point if self.lm_head_bits == bits else
            DEFAULT_ZERO_POINT[self.lm_head_bits]))
        self.timings: dict[str, float] = {}  # seconds: "calibration", "quantization"
        self.keep_float, self.keep_int8 = set(keep_float), set(keep_int8)
        self._widened = False  # the node being rewritten takes FALLBACK_INT8 (keep_int8)
        # module -> the largest relative error of its quantized weights (module docstring)
        self.errors: dict[str, float] = {}
        self.head_modules: set[str] = set()  # the LM head's module, once quantized
        # (the float weights' names, dim, layout) -> (quantized, relative error), across runs
        self._made: dict[tuple, tuple[QuantizedWeight, float]] = {}

    @property
    def errors_measure(self) -> str:
        """What ``errors`` measures."""
        return ("the relative output error on the calibration text" if self.method == "gptq"
                else "the relative weight error")

    @property
    def rule(self) -> str:
        return self.format.rule

    def settings(self) -> dict:
        out = {"bits": self.bits, "block_size": self.block_size, "symmetric": self.symmetric,
               "zero_point": self.zero_point, "include_lm_head": self.include_lm_head,
               "lm_head": (self.lm_head_format.rule if self.include_lm_head else "float32"),
               "embedding": self.embedding,
               "accuracy_level": self.accuracy_level, "method": self.method}
        if self.method != "rtn":
            out["calibration"] = {"samples": len(self.calibration),
                                  "tokens": len(self.calibration[0]),
                                  "text": self.calibration_text}
        return out

    def _format(self, site: Site) -> Format:
        return FALLBACK_INT8 if self._widened else self._primary(site)

    def _primary(self, site: Site) -> Format:
        return self.lm_head_format if site.lm_head else self.format

    def run(self, graph: Graph) -> PassResult:
        result = PassResult()
        self._moments: dict[tuple, SecondMoment] = {}
        if self.method == "gptq" and self._uncached(graph):
            start = time.perf_counter()
            self._moments = {key: moment for key, (_, moment)
                             in self.second_moments(graph).items()}
            self.timings["calibration"] = time.perf_counter() - start
        start = time.perf_counter()
        done: dict[tuple, list[Value]] = {}  # this run's quantized weights, by source
        # progress per node: the linears are spread evenly through the layers, so the rate
        # and estimate follow GPTQ's per-layer work
        for node in progress.track(graph.nodes(), f"quantizing weights ({self.method})",
                                   unit="nodes"):
            if node not in graph:
                continue
            m = self._match(graph, node)
            if m is None:
                continue
            if not m:
                result.note(f"kept {node.op} at {node.module or '<top>'} in float: {m.reason}")
                continue
            narrow = any(self._primary(site).bits < 8 for site, _ in m["sites"])
            if node.module in self.keep_float or (node.module in self.keep_int8 and not narrow):
                result.note(f"kept {node.op} at {node.module or '<top>'} in float: asked "
                            f"(the perplexity gate's fallback)")
                continue
            self._widened = node.module in self.keep_int8
            if node.op == "arc.gated_mlp":
                self._rewrite_gated_mlp(graph, node, m, done)
            elif node.op == "arc.split_linear":
                self._rewrite_split_linear(graph, node, m, done)
            else:
                self._rewrite_linear(graph, node, m, done)
            if not self._widened:  # the ranking's measure: the weights' own format
                self.errors[node.module] = max(self._made[self._cache_key(s)][1]
                                               for s, _ in m["sites"])
            site = m["sites"][0][0]
            if site.lm_head:
                self.head_modules.add(node.module)
            if site.lm_head and self.embedding == "lm_head":
                self._share_table(graph, site, done, result)
            rule = ("lm_head_" if site.lm_head else "") + self._format(site).rule
            result.bump(rule, 2 if node.op == "arc.gated_mlp" else 1)
            self._widened = False
        self.timings["quantization"] = time.perf_counter() - start
        self._moments = {}
        return result

    # -- calibration ------------------------------------------------------------------
    def _uncached(self, graph: Graph) -> bool:
        """Whether a weight this run would quantize was not quantized by an earlier run."""
        for node in graph.nodes():
            m = self._match(graph, node)
            if m and any((_stable(site.key), self._primary(site).rule) not in self._made
                         for site, _ in m["sites"]):
                return True
        return False

    def second_moments(self, graph: Graph) -> dict[tuple, tuple[Site, SecondMoment]]:
        """Per weight this pass would quantize (by its key): the Site and ``E[x^T x]`` of
        what it multiplies, over the calibration sequences run in the reference interpreter
        on ``graph`` as it stands (unquantized: every layer sees the float model's inputs)."""
        matched = {}
        for node in graph.nodes():
            m = self._match(graph, node)
            if m:
                matched[node] = m["sites"]
        moments: dict[tuple, tuple[Site, SecondMoment]] = {}

        def visit(node: Node, args: list) -> None:
            for site, features in matched[node]:
                x = features(args)
                if site.key not in moments:
                    moments[site.key] = (site, SecondMoment(x.shape[-1]))
                moments[site.key][1].add(x)

        observe_inputs(graph, self.calibration, matched, visit)
        return moments

    # -- matching ---------------------------------------------------------------------
    def _match(self, graph: Graph, node: Node) -> Match | None:
        """``Match(sites=[(Site, features)], ...)`` for a quantizable node, a failed Match
        (with the reason) for a linear kept in float, None for anything else. ``features``
        maps the node's input values to the activations the site's weight multiplies."""
        if node.op == "arc.gated_mlp":
            return self._match_gated_mlp(node)
        if node.op == "arc.split_linear":
            return self._match_split_linear(node)
        if node.op in LINEARS:
            return self._match_linear(graph, node)
        return None

    def _site(self, x: Value, ref: WeightRef, bias: Value | None) -> Match:
        """``Match(site=Site)`` for one linear: a quantizable weight, a float32 input ending
        in K, a float32 bias if any."""
        w = self._weight(ref)
        if not w:
            return w
        checked = check_input(x, w["site"].weight_NK.shape[1])
        if not checked:
            return checked
        if bias is not None and bias.dtype != torch.float32:
            return Match().fail(f"its bias %{bias.name} is {bias.dtype}, not float32")
        return w

    @staticmethod
    def _weight(ref: WeightRef) -> Match:
        """``Match(site=Site)`` when the weight ``ref`` reads is a float32 2-D constant, or a
        concatenation of such along N (``linear_sites.check_weight``)."""
        checked = check_weight(ref)
        if not checked:
            return checked
        parts, dim = ref.parts()
        return checked.ok(site=Site(ref.tensor_NK(), (tuple(parts), dim, ref.layout),
                                    ref.value.name))

    @staticmethod
    def _input_of(node: Node, x: Value):
        """``features`` for a node that multiplies its input ``x`` as it is."""
        index = port_of(node, x)
        return lambda args: args[index]

    # y = x @ W^T + b  (the traced forms linear_sites.as_linear reads)
    def _match_linear(self, graph: Graph, node: Node) -> Match | None:
        lin = as_linear(node)
        if not lin:  # a matmul or bmm of two activations is no linear to report on
            return None if node.op in ("aten.matmul", "aten.bmm") else lin
        lin = lin["linear"]
        site = self._weight(lin.weight)["site"]  # as_linear checked weight, input and bias
        if is_lm_head(graph, node, lin.weight.value):
            if not self.include_lm_head:
                return Match().fail("it is the LM head, kept in float (include_lm_head=False)")
            site.lm_head = True
        return Match().ok(x=lin.x, bias=lin.bias, sites=[(site, self._input_of(node, lin.x))])

    # split(x @ W^T + b, sizes, -1), W the merged Q/K/V
    def _match_split_linear(self, node: Node) -> Match:
        x, _weight, *bias = node.inputs
        ref = WeightRef(node, 1, node.attrs["weight_layout"])
        w = self._site(x, ref, bias[0] if bias else None)
        if not w:
            return w
        return w.ok(x=x, bias=bias[0] if bias else None,
                    sites=[(w["site"], self._input_of(node, x))])

    # down(act(x @ Wg^T + bg) * (x @ Wu^T + bu)) + bd, with [Wg; Wu] as one weight
    def _match_gated_mlp(self, node: Node) -> Match:
        x, refs, biases = gated_parts(node)
        sites = []
        for ref in refs:
            w = self._weight(ref)
            if not w:
                return w
            sites.append(w["site"])
        wg, wu, down = sites
        inner, K = wg.weight_NK.shape
        checked = check_input(x, K)
        if not checked:
            return checked
        if any(b is not None and (not b.is_constant or b.dtype != torch.float32)
               for b in biases):
            return Match().fail("a bias is computed or not float32")
        gate_up = Site(torch.cat([wg.weight_NK, wu.weight_NK], 0), ("gate_up", wg.key, wu.key),
                       f"{wg.name}_up")
        return Match().ok(x=x, gate_up=gate_up, down=down, inner=inner, biases=tuple(biases),
                          sites=[(gate_up, lambda args: args[0]),
                                 (down, lambda args: gated_hidden(node, args))])

    # -- rewriting --------------------------------------------------------------------
    def _rewrite_linear(self, graph: Graph, node: Node, m: Match, done: dict) -> None:
        out = node.outputs[0]
        y = self._matmul_nbits(graph, node, m["x"], m["sites"][0][0], m["bias"], out.shape,
                               out.name, done)
        out.replace_all_uses_with(y)
        graph.remove_node(node)

    def _rewrite_split_linear(self, graph: Graph, node: Node, m: Match, done: dict) -> None:
        x, site = m["x"], m["sites"][0][0]
        N = site.weight_NK.shape[0]
        y = self._matmul_nbits(graph, node, x, site, m["bias"], tuple(x.shape[:-1]) + (N,),
                               f"{node.outputs[0].name}_merged", done)
        pieces = split_last(graph, node, y, list(node.attrs["sizes"]),
                            [v.name for v in node.outputs], f"{self.name}/{self.rule}")
        for old, new in zip(node.outputs, pieces):
            old.replace_all_uses_with(new)
        graph.remove_node(node)

    def _rewrite_gated_mlp(self, graph: Graph, node: Node, m: Match, done: dict) -> None:
        rewrite_gated_mlp(graph, node, m["x"], m["biases"], m["inner"],
                          f"{self.name}/{self.rule}",
                          lambda v, bias, shape, name, part: self._matmul_nbits(
                              graph, node, v, m[part], bias, shape, name, done))

    def _share_table(self, graph: Graph, site: Site, done: dict, result: PassResult) -> None:
        """The lookups in the LM head's own float table (tied weights) read its quantized
        table instead (``arc.gather_nbits``)."""
        parts, dim, layout = site.key
        if dim is not None or layout != "out_in":  # a merged or [K, N] weight is no table
            return
        table, f = parts[0], self._format(site)
        for user, _ in list(table.uses()):
            if user.op != "aten.embedding" or user.arg("weight") is not table:
                continue
            if f.zero_point == "float":
                result.note(f"kept the embedding at {user.module or '<top>'} in float: the LM "
                            f"head's float-minimum blocks ({f.rule}) have no lookup kernel")
                continue
            packed, scales, zero_points, _ = done[site.key]
            out = user.outputs[0]
            N, K = site.weight_NK.shape
            y = graph.add_node(
                "arc.gather_nbits",
                [user.arg("indices"), packed, scales] + ([zero_points] if zero_points is not None
                                                         else []),
                {"K": K, "N": N, "bits": f.bits, "block_size": f.block_size,
                 "has_zero_points": zero_points is not None},
                [(out.dtype, out.shape)], module=user.module,
                origin=f"{self.name}/embedding_{f.rule}", names=[f"{out.name}_q"]).output
            out.replace_all_uses_with(y)
            graph.remove_node(user)
            result.bump(f"embedding_{f.rule}")

    # -- building ---------------------------------------------------------------------
    def _quantized(self, site: Site) -> QuantizedWeight:
        """``site``'s weight in its format, by this pass's method (or as an earlier run
        quantized it); its relative error goes into ``_made`` beside it."""
        cached = self._cache_key(site)
        if cached in self._made:
            return self._made[cached][0]
        f = self._format(site)
        # (no moment: its linear never ran on the calibration text; round-to-nearest then,
        # as for the fallback's int8, which needs no calibration)
        moment = None if self._widened else self._moments.pop(site.key, None)
        hessian = moment.hessian if moment is not None else None
        if self.method == "gptq" and hessian is not None:
            q = gptq(site.weight_NK, hessian, f.bits, f.block_size, f.zero_point)
        else:
            q = quantize(site.weight_NK, f.bits, f.block_size, f.zero_point == "none",
                         float_minimum=f.zero_point == "float")
        self._made[cached] = (q, relative_error(site.weight_NK, q.dequantize(), hessian))
        return q

    def _cache_key(self, site: Site) -> tuple:
        """``_made``'s key: the float weights by name (a copy of the graph keeps them) and the
        format this node takes."""
        return _stable(site.key), self._format(site).rule

    def _constants(self, graph: Graph, node: Node, site: Site, done: dict) -> list:
        """``[packed, scales, zero points or None, block offsets or None]`` of ``site``, made
        once per run."""
        if site.key in done:
            return done[site.key]
        q = self._quantized(site)
        origin, base = f"{self.name}/{self._format(site).rule}", site.name
        values = [graph.add_constant(q.packed, name=f"{base}_q{q.bits}_NbB",
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
        f = self._format(site)
        packed, scales, zero_points, offsets = self._constants(graph, node, site, done)
        inputs = [v for v in (packed, scales, zero_points, offsets, bias) if v is not None]
        attrs = {"K": K, "N": N, "bits": f.bits, "block_size": f.block_size,
                 "has_zero_points": zero_points is not None,
                 "has_block_offsets": offsets is not None, "has_bias": bias is not None,
                 "accuracy_level": self.accuracy_level}
        return graph.add_node("arc.matmul_nbits", [x] + inputs, attrs,
                              [(x.dtype, shape)], module=node.module,
                              origin=f"{self.name}/{f.rule}", names=[name]).output


def _stable(key):
    """A site's key with its float weights by name, which a copy of the graph keeps."""
    if isinstance(key, Value):
        return key.name
    return tuple(_stable(k) for k in key) if isinstance(key, tuple) else key


def relative_error(weight_NK: torch.Tensor, dequantized_NK: torch.Tensor,
                   hessian: torch.Tensor | None = None) -> float:
    """``|(W - Q) x|^2 / |W x|^2`` summed over the activations whose ``E[x^T x]`` is
    ``hessian``; without one, ``|W - Q|^2 / |W|^2``."""
    w = weight_NK.float()
    d = w - dequantized_NK.float()
    if hessian is None:
        return float((d * d).sum() / (w * w).sum().clamp_min(1e-30))
    return float(((d @ hessian) * d).sum() / ((w @ hessian) * w).sum().clamp_min(1e-30))
