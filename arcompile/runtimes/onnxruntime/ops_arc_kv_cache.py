"""Lowering of ``arc.attention_cached`` to ONNX Runtime, plain Concat-based form.

    present_key = Concat(past_key, key, axis=2); present_value likewise     # [B, Hkv, P+L, D]
    out = softmax(where(causal, q * scale @ present_key^T, -inf)) @ present_value

with key j visible to query i iff ``j <= i + (S - L)`` (S = P + L), the KV heads repeated
with Expand for grouped-query attention. Standard opset-21 ONNX only. This is the reference
form: it copies the whole cache every step; the in-place buffer (GroupQueryAttention with a
shared past/present buffer) is a later lowering. ``ir/opdefs/kv_cache.py`` is the yardstick.
"""

from __future__ import annotations

from arcompile.ir.graph import Node
from arcompile.runtimes.onnxruntime.context import LowerContext
from arcompile.runtimes.onnxruntime.ops_arc_attention import attend
from arcompile.runtimes.onnxruntime.registry import lowering


@lowering("arc.attention_cached")
def arc_attention_cached(ctx: LowerContext, node: Node) -> list[str]:
    query, key, value, past_key, past_value = node.inputs
    present_key = ctx.op("Concat", [ctx.name(past_key), ctx.name(key)], axis=2)
    present_value = ctx.op("Concat", [ctx.name(past_value), ctx.name(value)], axis=2)
    out = attend(ctx, ctx.name(query), present_key, present_value, node.attrs, query.dtype)
    return [out, present_key, present_value]
