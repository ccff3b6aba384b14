"""Lowering of ``arc.attention_cached`` to ONNX Runtime, plain Concat-based form.

    present_key = Concat(past_key, key, axis=2); present_value likewise     # [B, Hkv, P+L, D]
    out = softmax(where(causal, q * scale @ present_key^T, -inf)) @ present_value

with key j visible to query i iff ``j <= i + (S - L)`` (S = P + L), the KV heads repeated
with Expand for grouped-query attention. Standard opset-21 ONNX only. This is the reference
form: it copies the whole cache every step; the in-place buffer (GroupQueryAttention with a
shared past/present buffer) is a later lowering. ``ir/opdefs/kv_cache.py`` is the yardstick.
"""

from __future__ import annotations

import math

import torch

from arcompile.ir.graph import Node
from arcompile.runtimes.onnxruntime.context import LowerContext
from arcompile.runtimes.onnxruntime.dtypes import onnx_type
from arcompile.runtimes.onnxruntime.ops_arc_attention import _repeat_kv
from arcompile.runtimes.onnxruntime.registry import lowering


@lowering("arc.attention_cached")
def arc_attention_cached(ctx: LowerContext, node: Node) -> list[str]:
    query, key, value, past_key, past_value = node.inputs
    a = node.attrs
    heads, kv_heads, dtype = a["num_heads"], a["num_kv_heads"], query.dtype
    present_key = ctx.op("Concat", [ctx.name(past_key), ctx.name(key)], axis=2)
    present_value = ctx.op("Concat", [ctx.name(past_value), ctx.name(value)], axis=2)
    key_all, value_all = present_key, present_value
    if heads != kv_heads:
        key_all, value_all = (_repeat_kv(ctx, n, heads // kv_heads, heads, a["head_dim"])
                              for n in (present_key, present_value))
    q = ctx.op("Mul", [ctx.name(query), ctx.const(float(a["scale"]), dtype)])
    scores = ctx.op("MatMul", [q, ctx.op("Transpose", [key_all], perm=[0, 1, 3, 2])])
    if a.get("causal", True):
        scores = ctx.op("Where", [_causal(ctx, ctx.name(query), present_key), scores,
                                  ctx.const(-math.inf, dtype)])
    work = getattr(torch, a.get("softmax_dtype", "float32"))
    if work != dtype:
        scores = ctx.op("Cast", [scores], to=onnx_type(work))
    probs = ctx.op("Softmax", [scores], axis=-1)
    if work != dtype:
        probs = ctx.op("Cast", [probs], to=onnx_type(dtype))
    return [ctx.op("MatMul", [probs, value_all]), present_key, present_value]


def _causal(ctx: LowerContext, query: str, key: str) -> str:
    """[L, S] bool: key j visible to query i iff j <= i + (S - L)."""
    length = ctx.op("Reshape", [ctx.op("Shape", [query], start=2, end=3), ctx.i64([])])
    source = ctx.op("Reshape", [ctx.op("Shape", [key], start=2, end=3), ctx.i64([])])
    zero, one = ctx.const(0, torch.int64), ctx.const(1, torch.int64)
    offset = ctx.op("Sub", [source, length])
    rows = ctx.op("Range", [offset, ctx.op("Add", [length, offset]), one])
    rows = ctx.op("Unsqueeze", [rows, ctx.i64([1])])  # [L, 1]
    cols = ctx.op("Range", [zero, source, one])  # [S]
    return ctx.op("LessOrEqual", [cols, rows])
