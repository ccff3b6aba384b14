"""An int8 KV cache: the in-place cache's keys and values stored as int8 codes with one
calibrated float scale per KV head and channel.

Matches, on the cached step after ``pack_attention`` (in-place runtime), every::

    # out, present_key, present_value = arc.attention_cached_packed(..., past_key, past_value
    #                                                               [, past_length, cos, sin])
    #   past_key / past_value float32 graph inputs [B, Hkv, P, D] read by nothing else

Produces the same op with ``kv_quant="per_channel"`` and two more inputs, constants
``k_scale`` / ``v_scale`` float32 [1, Hkv, 1, D] (``ir/opdefs/kv_cache.py``: the new rows are
stored as clamp(round_half_even(x / scale), -128, 127) and attention reads the cache
dequantized, the new rows included); the past inputs and the presents become int8, and
``graph.meta["kv_cache"]`` (a ``CachedStep``) records ``dtype="int8"`` and
``kv_quant="per_channel"``. It lowers to GroupQueryAttention's own int8 cache
(``k_quant_type``/``v_quant_type`` PER_CHANNEL), so the engine allocates int8 buffers: a
quarter of the float cache's bytes. One rule, ``per_channel``, counts the attentions rewritten.

Scales: the calibration sequences (``calibration.calibration_ids``) run through the float
step in the reference interpreter with an empty cache; the presents are then every position's
key (after rotary, as stored) and value. Per KV head and channel, scale = ``margin`` *
max|x| / 127. Rotary mixes the channel pairs it rotates (i, i + rot/2; interleaved: 2i,
2i + 1) by an angle that grows with the position, so a key channel's largest value at a
position beyond the calibration text can exceed what was seen; with ``rotary_pairs`` both
channels of a pair take the largest norm of the pair, sqrt(x_i^2 + x_j^2), which rotation
keeps, instead. Deterministic for the same sequences.

Refuses (graph left as it was, reason noted): a graph without a KV cache, a cache runtime
other than in-place (the concat runtime keeps ``arc.attention_cached``, which has no int8
form), any ``arc.attention_cached`` left that ``pack_attention`` did not pack, a cache that is
already quantized or not float32, a past input read by anything but its attention, and a
calibration run that fails.

Numbers: changes the logits by design (each cached element within scale / 2 where it is not
clamped), so the pass manager's max|Δlogit| check cannot hold it; ``quantization.quantize``
gates it by perplexity on held-out text (``optimize(..., kv_cache_dtype="int8")``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch

from arcompile.ir.cached_step import empty_cache, past_inputs, step_inputs
from arcompile.ir.graph import Graph, Node, Value
from arcompile.ir.interpreter import run_graph
from arcompile.ir.opdefs.kv_cache import KV_QMAX
from arcompile.passes.base import Pass, PassResult
from arcompile.passes.match import Match

PACKED = "arc.attention_cached_packed"


class QuantizeKVCache(Pass):
    """See the module docstring."""

    name = "quantize_kv_cache"
    tolerance = float("inf")  # lossy by design: gated by perplexity (compiler/quantization.py)

    def __init__(self, calibration: Sequence[Sequence[int]], margin: float = 1.0,
                 rotary_pairs: bool = True, calibration_text: str | None = None):
        if not calibration:
            raise ValueError("QuantizeKVCache needs at least one calibration sequence")
        if not margin > 0:
            raise ValueError(f"margin must be positive, got {margin}")
        self.calibration = [list(ids) for ids in calibration]
        self.margin, self.rotary_pairs = float(margin), bool(rotary_pairs)
        self.calibration_text = calibration_text

    def settings(self) -> dict:
        return {"kv_cache_dtype": "int8", "kv_quant": "per_channel",
                "calibration_samples": len(self.calibration),
                "calibration_length": len(self.calibration[0]),
                "calibration_text": self.calibration_text, "margin": self.margin,
                "rotary_pairs": self.rotary_pairs}

    def run(self, graph: Graph) -> PassResult:
        result = PassResult()
        found = match_cache(graph)
        if not found:
            result.note(f"{self.name}: refused, graph left as it was: {found.reason}")
            return result
        try:
            amax = self._calibrate(graph, found["attentions"])
        except Exception as e:  # e.g. a step the interpreter cannot run; the graph stays
            result.note(f"{self.name}: refused, graph left as it was: calibration did not "
                        f"run: {type(e).__name__}: {e}")
            return result
        for attn, (key_max, value_max) in zip(found["attentions"], amax):
            _rewrite(graph, attn, _scale(key_max, self.margin), _scale(value_max, self.margin),
                     self.name)
            result.bump("per_channel")
        graph.meta["kv_cache"] = replace(graph.meta["kv_cache"], dtype="int8",
                                         kv_quant="per_channel")
        return result

    def _calibrate(self, graph: Graph, attentions: list[Node]) -> list[tuple[torch.Tensor, ...]]:
        """Per attention, max|key| and max|value| [1, Hkv, 1, D] over the calibration tokens
        (key channels rotated together: their largest pair norm, with ``rotary_pairs``)."""
        where = {id(v): i for i, v in enumerate(graph.outputs)}
        slots = [(where[id(a.outputs[1])], where[id(a.outputs[2])]) for a in attentions]
        keep = 1 if graph.meta["kv_cache"].logits_to_keep is not None else 0
        amax: list[list[torch.Tensor | None]] = [[None, None] for _ in attentions]
        for ids in self.calibration:
            tokens = torch.tensor([ids])
            outs = run_graph(graph, step_inputs(graph, tokens, torch.tensor(0),
                                                empty_cache(graph, 1), torch.tensor(keep)))
            for n, (attn, (k_at, v_at)) in enumerate(zip(attentions, slots)):
                key_BHkvTD, value_BHkvTD = outs[k_at].float(), outs[v_at].float()
                key = _pair_norms(key_BHkvTD, attn.attrs) if self.rotary_pairs else key_BHkvTD
                for j, x in enumerate((key, value_BHkvTD)):
                    m = x.abs().amax(dim=(0, 2), keepdim=True)  # [1, Hkv, 1, D]
                    amax[n][j] = m if amax[n][j] is None else torch.maximum(amax[n][j], m)
        return [tuple(pair) for pair in amax]


def _pair_norms(key_BHkvTD: torch.Tensor, attrs: dict) -> torch.Tensor:
    """``key`` with each rotated channel replaced by the norm of the pair rotary turns it in:
    (i, i + rot/2), or (2i, 2i + 1) interleaved; channels past rotary_dim as they are."""
    rot = int(attrs.get("rotary_dim") or 0)
    if not rot:
        return key_BHkvTD
    out = key_BHkvTD.clone()
    if attrs.get("rotary_interleaved"):
        a, b = key_BHkvTD[..., 0:rot:2], key_BHkvTD[..., 1:rot:2]
        norm = torch.sqrt(a * a + b * b)
        out[..., 0:rot:2], out[..., 1:rot:2] = norm, norm
    else:
        half = rot // 2
        a, b = key_BHkvTD[..., :half], key_BHkvTD[..., half:rot]
        norm = torch.sqrt(a * a + b * b)
        out[..., :half], out[..., half:rot] = norm, norm
    return out


def _scale(amax_1Hkv1D: torch.Tensor, margin: float) -> torch.Tensor:
    """margin * max|x| / 127; a channel never seen away from 0 gets the layer's smallest
    nonzero scale (its values, if any ever come, saturate rather than divide by zero)."""
    scale = amax_1Hkv1D * margin / KV_QMAX
    positive = scale[scale > 0]
    floor = positive.min() if positive.numel() else torch.tensor(1.0)
    return torch.where(scale > 0, scale, floor).to(torch.float32).contiguous()


# -- match ------------------------------------------------------------------------------------
def match_cache(graph: Graph) -> Match:
    """Bindings: ``attentions`` (every packed attention, in graph order) when the whole cache
    can be int8; else the reason it cannot."""
    m = Match()
    step = graph.meta.get("kv_cache")
    if step is None:
        return m.fail("the graph has no KV cache")
    if step.runtime_cache != "inplace":
        return m.fail(f"the cache runtime is {step.runtime_cache!r}; an int8 cache "
                      f"lowers to GroupQueryAttention over in-place buffers only "
                      f"(kv_cache_runtime='inplace')")
    if step.kv_quant:
        return m.fail(f"the cache is already quantized ({step.kv_quant})")
    nodes = graph.nodes()
    unpacked = [n for n in nodes if n.op == "arc.attention_cached"]
    if unpacked:
        return m.fail(f"{len(unpacked)} attention(s) were not packed by pack_attention (e.g. "
                      f"{unpacked[0].where()}); only arc.attention_cached_packed has an int8 "
                      f"cache")
    attentions = [n for n in nodes if n.op == PACKED]
    if not attentions:
        return m.fail(f"no {PACKED} in the graph")
    pasts = {id(v) for v in past_inputs(graph)}
    for attn in attentions:
        if attn.attrs.get("kv_quant"):
            return m.fail(f"{attn.where()} already has kv_quant {attn.attrs['kv_quant']!r}")
        past_key, past_value = _pasts(attn)
        for v in (past_key, past_value):
            if id(v) not in pasts:
                return m.fail(f"%{v.name} of {attn.where()} is not a past input of the cache "
                              f"layout")
            if v.dtype != torch.float32:
                return m.fail(f"%{v.name} is {v.dtype}, not float32")
            if len(v.uses()) != 1:
                return m.fail(f"%{v.name} has {len(v.uses())} users; an int8 past would "
                              f"reach the others as codes")
        for v in attn.outputs[1:]:
            if v not in graph.outputs or len(v.uses()) != 0:
                return m.fail(f"present %{v.name} is read inside the step (or is not a graph "
                              f"output); it would read int8 codes")
    return m.ok(attentions=attentions)


def _pasts(attn: Node) -> tuple[Value, Value]:
    start = 1 if attn.attrs["packed"] else 3  # after qkv, or after q, k, v
    return attn.inputs[start], attn.inputs[start + 1]


# -- rewrite ----------------------------------------------------------------------------------
def _rewrite(graph: Graph, attn: Node, k_scale: torch.Tensor, v_scale: torch.Tensor,
             pass_name: str) -> None:
    origin = f"{pass_name}/per_channel"
    scales = [graph.add_constant(s, name=name, module=attn.module, origin=origin)
              for s, name in ((k_scale, "kv_k_scale"), (v_scale, "kv_v_scale"))]
    for past in _pasts(attn):
        past.dtype = torch.int8  # graph inputs stay (their names are the cache layout's)
    out, old_key, old_value = attn.outputs
    new = graph.add_node(PACKED, [*attn.inputs, *scales], {**attn.attrs, "kv_quant": "per_channel"},
                         outputs=[(out.dtype, out.shape), (torch.int8, old_key.shape),
                                  (torch.int8, old_value.shape)],
                         module=attn.module, origin=origin,
                         names=["attn_BTX", "present_key", "present_value"])
    for old, value in zip(attn.outputs, new.outputs):
        old.replace_all_uses_with(value)
    graph.remove_node(attn)
    for value, old in zip(new.outputs[1:], (old_key, old_value)):  # the layout's names
        value.name = old.name
