"""Lowering of ``aten.scaled_dot_product_attention`` to plain ONNX ops.

    scores = (q * scale) @ k^T                      # (..., Hq, L, S)
    scores = where(mask, scores, -inf) | scores + mask | causal: keep col <= row
    probs  = softmax(scores, -1), rows masked entirely -> 0   (torch's _safe_softmax)
    out    = probs @ v                              # (..., Hq, L, Ev)

``enable_gqa`` repeats each KV head Hq / Hkv times, as ``repeat_interleave`` on dim -3.
Fusing this into com.microsoft attention kernels is a later pass's job; this form is the
reference lowering every fusion is checked against.
"""

from __future__ import annotations

import math

import torch

from arcompile.errors import UnsupportedOpError
from arcompile.ir.graph import Node, Value
from arcompile.runtimes.onnxruntime.context import LowerContext, rank
from arcompile.runtimes.onnxruntime.ops_shape import swap_perm
from arcompile.runtimes.onnxruntime.registry import lowering


@lowering("aten.scaled_dot_product_attention")
def scaled_dot_product_attention(ctx: LowerContext, node: Node) -> str:
    query, key, value = node.arg("query"), node.arg("key"), node.arg("value")
    mask, is_causal = node.arg("attn_mask"), node.arg("is_causal", False)
    if node.arg("dropout_p", 0.0):
        raise UnsupportedOpError(f"{node.where()} has attention dropout; export in eval mode")
    dtype, r = query.dtype, rank(query)

    key_name, value_name = ctx.name(key), ctx.name(value)
    if node.arg("enable_gqa", False) and query.shape[-3] != key.shape[-3]:
        key_name = repeat_kv(ctx, key, key_name, query.shape[-3])
        value_name = repeat_kv(ctx, value, value_name, query.shape[-3])

    q_scaled = ctx.op("Mul", [ctx.name(query), _scale(ctx, query, node.arg("scale"))])
    key_t = ctx.op("Transpose", [key_name], perm=swap_perm(r, -1, -2))
    scores = ctx.op("MatMul", [q_scaled, key_t])  # (..., Hq, L, S)

    neg_inf = ctx.const(-math.inf, dtype)
    if is_causal:
        scores = ctx.op("Where", [_causal(ctx, query, key), scores, neg_inf])
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = ctx.op("Where", [ctx.name(mask), scores, neg_inf])
        else:
            scores = ctx.op("Add", [scores, ctx.tensor(mask, dtype)])

    probs = ctx.op("Softmax", [scores], axis=-1)
    if mask is not None or is_causal:
        # A row with every key masked is NaN after softmax; torch gives 0 there, and a NaN
        # would reach other rows through 0 * NaN in the next layer's probs @ v.
        probs = ctx.op("Where", [ctx.op("IsNaN", [probs]), ctx.const(0.0, dtype), probs])
    return ctx.op("MatMul", [probs, value_name])


def _scale(ctx: LowerContext, query: Value, scale) -> str:
    if scale is not None:
        return ctx.tensor(scale, query.dtype)
    head_dim = query.shape[-1]
    if isinstance(head_dim, int):
        return ctx.const(1.0 / math.sqrt(head_dim), query.dtype)
    r = rank(query)
    size = ctx.cast(ctx.shape_of(query, r - 1, r), torch.int64, query.dtype)
    return ctx.op("Reciprocal", [ctx.op("Sqrt", [size])])


def _causal(ctx: LowerContext, query: Value, key: Value) -> str:
    """[L, S] bool, true where key position <= query position (top-left aligned, as torch)."""
    length = _dim_scalar(ctx, query, -2)
    source = _dim_scalar(ctx, key, -2)
    zero, one = ctx.const(0, torch.int64), ctx.const(1, torch.int64)
    rows = ctx.op("Unsqueeze", [ctx.op("Range", [zero, length, one]), ctx.i64([1])])  # [L, 1]
    cols = ctx.op("Range", [zero, source, one])  # [S]
    return ctx.op("LessOrEqual", [cols, rows])


def _dim_scalar(ctx: LowerContext, value: Value, dim: int) -> str:
    d = dim % rank(value)
    if isinstance(value.shape[d], int):
        return ctx.const(value.shape[d], torch.int64)
    return ctx.op("Reshape", [ctx.shape_of(value, d, d + 1), ctx.i64([])])


def repeat_kv(ctx: LowerContext, kv: Value, name: str, q_heads: int) -> str:
    """(..., Hkv, S, D) -> (..., Hq, S, D), each KV head repeated Hq / Hkv times in place."""
    r, kv_heads = rank(kv), kv.shape[-3]
    if not (isinstance(q_heads, int) and isinstance(kv_heads, int)) or q_heads % kv_heads:
        raise UnsupportedOpError(f"enable_gqa needs static head counts with Hq a multiple of "
                                 f"Hkv, got Hq={q_heads}, Hkv={kv_heads}")
    groups = q_heads // kv_heads
    wide = ctx.op("Unsqueeze", [name, ctx.i64([r - 2])])  # (..., Hkv, 1, S, D)
    wide = ctx.op("Expand", [wide, ctx.i64([1] * (r - 2) + [groups, 1, 1])])
    dims = [ctx.shape_of(kv, 0, r - 3), ctx.i64([q_heads]), ctx.shape_of(kv, r - 2)]
    shape = ctx.op("Concat", dims, axis=0)
    return ctx.op("Reshape", [wide, shape])
