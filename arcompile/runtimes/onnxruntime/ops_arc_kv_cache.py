"""Lowering of ``arc.attention_cached`` to ONNX Runtime, two forms.

``graph.meta["kv_cache"].runtime_cache`` (a ``CachedStep``, ``ir/cached_step.py``) picks one
(set by ``compiler/optimize.py``):

- ``"concat"`` (default), standard opset-21 ONNX:

    present_key = Concat(past_key, key, axis=2); present_value likewise     # [B, Hkv, P+L, D]
    out = softmax(where(causal, q * scale @ present_key^T, -inf)) @ present_value

  with key j visible to query i iff ``j <= i + (S - L)`` (S = P + L), the KV heads repeated
  with Expand for grouped-query attention. It copies the whole cache every step.

- ``"inplace"``: com.microsoft ``GroupQueryAttention`` on BSNH-packed [B, L, H*D] tensors with
  past_key/past_value of capacity MAX ([B, Hkv, MAX, D]; rows >= P unused) and
  ``seqlens_k = P + L - 1`` per row, ``total_sequence_length = P + L`` (P = the graph's
  ``past_length`` input). The runtime binds past and present to the same preallocated buffers
  (I/O binding), so ORT writes the L new rows at P..P+L-1 in place; the presents are those
  buffers. ``bench/probe_gqa_shared_buffer.py`` proves the mechanism.

``arc.attention_cached_packed`` (``passes/pack_attention.py``, in-place runtime only) is the
same attention on the [B, L, n*D] tensors the projections produce, so it lowers to exactly one
node, as ONNX Runtime GenAI's models run it::

    out_BLX, present_key, present_value = GroupQueryAttention(
        qkv, "", "", past_key, past_value, seqlens_k, total_sequence_length
        [, cos_cache, sin_cache; do_rotary=1, rotary_interleaved])      (packed q|k|v)
    ... GroupQueryAttention(q, k, v, past_key, ...)                     (separate)

With ``kv_quant="per_channel"`` (``passes/quantize_kv_cache.py``) the buffers are int8 and
the op's last two inputs, k_scale / v_scale [1, Hkv, 1, D], go to GroupQueryAttention's
k_scale / v_scale (inputs 12 and 13, after the five optional cos_cache, sin_cache,
position_ids, attention_bias, head_sink slots) with ``k_quant_type = v_quant_type =
"PER_CHANNEL"`` and ``kv_cache_bit_width = 8``.

GroupQueryAttention's rotary rotates q and k at positions ``seqlens_k + 1 - L + i`` =
``P + i``, the positions the pass proved the rope used. ORT 1.32's CPU kernel takes a partial
rotary when ``cos_cache`` is [rows, rot/2] with rot/2 a multiple of 8 (the pass checks).

``ir/opdefs/kv_cache.py`` is the yardstick for all of them.
"""

from __future__ import annotations

import torch

from arcompile.errors import UnsupportedOpError
from arcompile.ir.cached_step import input_named
from arcompile.ir.graph import Node
from arcompile.runtimes.onnxruntime.context import LowerContext
from arcompile.runtimes.onnxruntime.ops_arc_attention import attend
from arcompile.runtimes.onnxruntime.registry import lowering

RUNTIME_CACHES = ("concat", "inplace")


@lowering("arc.attention_cached")
def arc_attention_cached(ctx: LowerContext, node: Node) -> list[str]:
    step = ctx.graph.meta.get("kv_cache")
    if step is not None and step.runtime_cache == "inplace":
        return _inplace(ctx, node, step.past_length)
    query, key, value, past_key, past_value = node.inputs
    present_key = ctx.op("Concat", [ctx.name(past_key), ctx.name(key)], axis=2)
    present_value = ctx.op("Concat", [ctx.name(past_value), ctx.name(value)], axis=2)
    out = attend(ctx, ctx.name(query), present_key, present_value, node.attrs, query.dtype)
    return [out, present_key, present_value]


def _inplace(ctx: LowerContext, node: Node, past_length_name: str) -> list[str]:
    """(B, H, L, D) -> [B, L, H*D], GroupQueryAttention over the shared buffers, and back."""
    query, key, value, past_key, past_value = node.inputs
    a = node.attrs
    if not a.get("causal", True):
        raise UnsupportedOpError("the in-place KV cache (GroupQueryAttention) is causal only; "
                                 "use kv_cache_runtime='concat'")
    heads, kv_heads, dim = a["num_heads"], a["num_kv_heads"], a["head_dim"]
    past_length = input_named(ctx.graph, past_length_name)

    def packed(v, n):  # (B, n, L, D) -> (B, L, n*D)
        t = ctx.op("Transpose", [ctx.name(v)], perm=[0, 2, 1, 3])
        return ctx.op("Reshape", [t, ctx.i64([0, 0, n * dim])])

    q_BLHD, k_BLHD, v_BLHD = packed(query, heads), packed(key, kv_heads), packed(value, kv_heads)
    seqlens_k, total = ctx.once(("gqa_lengths",), lambda: _lengths(ctx, past_length))
    out, present_key, present_value = ctx.op(
        "GroupQueryAttention",
        [q_BLHD, k_BLHD, v_BLHD, ctx.name(past_key), ctx.name(past_value), seqlens_k, total],
        outputs=3, domain="com.microsoft", num_heads=heads, kv_num_heads=kv_heads,
        scale=float(a["scale"]))
    out = ctx.op("Reshape", [out, ctx.i64([0, 0, heads, dim])])
    return [ctx.op("Transpose", [out], perm=[0, 2, 1, 3]), present_key, present_value]


def _lengths(ctx: LowerContext, past_length) -> tuple[str, str]:
    """seqlens_k [B] (P + L - 1 each row) and total_sequence_length (P + L), the same in
    every layer: L is the step's new tokens (the tokens input [B, L])."""
    tokens = ctx.graph.inputs[0]
    new = ctx.cast(ctx.shape_of(tokens, 1, 2), torch.int64, torch.int32)  # [1] = L
    past = ctx.cast(ctx.op("Reshape", [ctx.name(past_length), ctx.i64([1])]),
                    torch.int64, torch.int32)  # [1] = P
    source = ctx.op("Add", [past, new])  # [1] = P + L
    total = ctx.op("Reshape", [source, ctx.i64([])])
    last = ctx.op("Sub", [source, ctx.const([1], torch.int32)])
    return ctx.op("Expand", [last, ctx.shape_of(tokens, 0, 1)]), total


@lowering("arc.attention_cached_packed")
def arc_attention_cached_packed(ctx: LowerContext, node: Node) -> list[str]:
    step = ctx.graph.meta.get("kv_cache")
    if step is None or step.runtime_cache != "inplace":
        raise UnsupportedOpError("arc.attention_cached_packed lowers to GroupQueryAttention "
                                 "over in-place cache buffers only (runtime_cache 'inplace')")
    a = node.attrs
    operands = list(node.inputs)
    scales = operands[-2:] if a.get("kv_quant") else []
    if scales:
        del operands[-2:]
        if a["kv_quant"] != "per_channel":
            raise UnsupportedOpError(f"kv_quant {a['kv_quant']!r}: only 'per_channel' lowers")
    if a["packed"]:  # q|k|v in one tensor: GQA's packed query, key and value left empty
        qkv, past_key, past_value, *rotary = operands
        qkv_names = [ctx.name(qkv), "", ""]
    else:
        q, k, v, past_key, past_value, *rotary = operands
        qkv_names = [ctx.name(q), ctx.name(k), ctx.name(v)]
    past_length = input_named(ctx.graph, step.past_length)
    seqlens_k, total = ctx.once(("gqa_lengths",), lambda: _lengths(ctx, past_length))
    inputs = [*qkv_names, ctx.name(past_key), ctx.name(past_value), seqlens_k, total]
    attrs = {"num_heads": a["num_heads"], "kv_num_heads": a["num_kv_heads"],
             "scale": float(a["scale"])}
    if a.get("rotary_dim"):
        _past_length, cos_cache, sin_cache = rotary  # positions: P + i, from seqlens_k
        inputs += [ctx.name(cos_cache), ctx.name(sin_cache)]
        attrs.update(do_rotary=1, rotary_interleaved=int(a["rotary_interleaved"]))
    if scales:  # slots 7..11: cos/sin (when rotary), position_ids, attention_bias, head_sink
        inputs += [""] * (12 - len(inputs)) + [ctx.name(s) for s in scales]
        attrs.update(k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL",
                     kv_cache_bit_width=8)
    return ctx.op("GroupQueryAttention", inputs, outputs=3, domain="com.microsoft", **attrs)
