"""Lowering of ``arc.attention`` (causal, grouped-query) to ONNX Runtime.

Three forms, chosen by the module-level ``IMPLEMENTATION`` (set it before lowering):
- ``"attention"`` (default): the standard opset-23 ``Attention`` on the (B, H, T, D) tensors
  as they are, ``is_causal=1``, ``q_num_heads`` / ``kv_num_heads`` for GQA. The model is
  written at opset 23 when it holds one (see ``lower.NEWER_OPS``). Fastest measured on
  SmolLM2's shapes (9 query / 3 KV heads, D 64, T 128, 2 threads): ~1.3 ms per layer against
  ~1.6 ms for GroupQueryAttention (+ transposes) and ~2.0 ms for the plain form.
- ``"gqa"``: com.microsoft ``GroupQueryAttention`` on BSNH-packed [B, T, H*D] tensors, with
  ``seqlens_k = S - 1`` per row and ``total_sequence_length = S`` (always causal, bottom-right
  aligned).
- ``"plain"``: MatMul / Softmax in standard opset-21 ONNX, the KV heads repeated with
  Expand; for runtimes without either kernel (TensorRT's parser, older ORT).

Every form computes ``softmax(q @ k^T * scale + causal) @ v`` with key j visible to query i
iff ``j <= i + (S - L)``; ``arc.attention``'s reference (``ir/opdefs/attention.py``) is the
yardstick.
"""

from __future__ import annotations

import math

import torch

from arcompile.errors import UnsupportedOpError
from arcompile.ir.graph import Node
from arcompile.runtimes.onnxruntime.context import LowerContext
from arcompile.runtimes.onnxruntime.dtypes import onnx_type
from arcompile.runtimes.onnxruntime.registry import lowering

IMPLEMENTATIONS = ("attention", "gqa", "plain")
IMPLEMENTATION = "attention"


@lowering("arc.attention")
def arc_attention(ctx: LowerContext, node: Node) -> str:
    if IMPLEMENTATION not in IMPLEMENTATIONS:
        raise UnsupportedOpError(f"arc.attention lowering {IMPLEMENTATION!r} is not one of "
                                 f"{', '.join(IMPLEMENTATIONS)}")
    if not node.attrs.get("causal", True) and IMPLEMENTATION == "gqa":
        return _plain(ctx, node)
    return {"attention": _opset23, "gqa": _gqa, "plain": _plain}[IMPLEMENTATION](ctx, node)


def _opset23(ctx: LowerContext, node: Node) -> str:
    """Attention-23 takes (B, H, T, D) directly; is_causal is top-left aligned, which is the
    bottom-right causal of arc.attention whenever L == S (no cache)."""
    query, key, value = node.inputs
    a = node.attrs
    if query.shape[-2] != key.shape[-2]:
        return _plain(ctx, node)  # L < S (a cache): Attention-23's causal would be top-left
    return ctx.op("Attention", [ctx.name(query), ctx.name(key), ctx.name(value)],
                  is_causal=int(bool(a["causal"])), q_num_heads=a["num_heads"],
                  kv_num_heads=a["num_kv_heads"], scale=float(a["scale"]))


def _gqa(ctx: LowerContext, node: Node) -> str:
    """(B, H, T, D) -> BSNH-packed [B, T, H*D], GroupQueryAttention, and back."""
    query, key, value = node.inputs
    a = node.attrs
    heads, kv_heads, dim = a["num_heads"], a["num_kv_heads"], a["head_dim"]

    def packed(v, n):  # (B, n, T, D) -> (B, T, n*D)
        t = ctx.op("Transpose", [ctx.name(v)], perm=[0, 2, 1, 3])
        return ctx.op("Reshape", [t, ctx.i64([0, 0, n * dim])])

    q_BTHD, k_BTHD, v_BTHD = packed(query, heads), packed(key, kv_heads), packed(value, kv_heads)
    source = ctx.cast(ctx.shape_of(key, 2, 3), torch.int64, torch.int32)  # [1] = S
    total = ctx.op("Reshape", [source, ctx.i64([])])
    last = ctx.op("Sub", [source, ctx.const([1], torch.int32)])
    seqlens_k = ctx.op("Expand", [last, ctx.shape_of(query, 0, 1)])  # [B], S - 1 each row
    out = ctx.op("GroupQueryAttention", [q_BTHD, k_BTHD, v_BTHD, "", "", seqlens_k, total],
                 domain="com.microsoft", num_heads=heads, kv_num_heads=kv_heads,
                 scale=float(a["scale"]))
    out = ctx.op("Reshape", [out, ctx.i64([0, 0, heads, dim])])
    return ctx.op("Transpose", [out], perm=[0, 2, 1, 3])


def _plain(ctx: LowerContext, node: Node) -> str:
    """softmax(where(causal, q*scale @ k^T, -inf)) @ v with MatMul / Softmax."""
    query, key, value = node.inputs
    return attend(ctx, ctx.name(query), ctx.name(key), ctx.name(value), node.attrs, query.dtype)


def attend(ctx: LowerContext, query: str, key: str, value: str, a: dict, dtype) -> str:
    """The plain attention of ONNX names query (B, Hq, L, D) over key/value (B, Hkv, S, D),
    causal bottom-right aligned; shared by the cached lowering (ops_arc_kv_cache.py)."""
    heads, kv_heads = a["num_heads"], a["num_kv_heads"]
    key_all, value_all = key, value
    if heads != kv_heads:
        key_all, value_all = (_repeat_kv(ctx, n, heads // kv_heads, heads, a["head_dim"])
                              for n in (key, value))
    q = ctx.op("Mul", [query, ctx.const(float(a["scale"]), dtype)])
    scores = ctx.op("MatMul", [q, ctx.op("Transpose", [key_all], perm=[0, 1, 3, 2])])
    if a.get("causal", True):
        scores = ctx.op("Where", [_causal(ctx, query, key), scores, ctx.const(-math.inf, dtype)])
    work = getattr(torch, a.get("softmax_dtype", "float32"))
    if work != dtype:
        scores = ctx.op("Cast", [scores], to=onnx_type(work))
    probs = ctx.op("Softmax", [scores], axis=-1)
    if work != dtype:
        probs = ctx.op("Cast", [probs], to=onnx_type(dtype))
    return ctx.op("MatMul", [probs, value_all])


def _repeat_kv(ctx: LowerContext, name: str, groups: int, heads: int, dim: int) -> str:
    """(B, Hkv, S, D) -> (B, Hq, S, D), each KV head repeated ``groups`` times in place."""
    wide = ctx.op("Unsqueeze", [name, ctx.i64([2])])  # (B, Hkv, 1, S, D)
    wide = ctx.op("Expand", [wide, ctx.i64([1, 1, groups, 1, 1])])
    return ctx.op("Reshape", [wide, ctx.i64([0, heads, -1, dim])])


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
