"""Lowering of ``arc.rope``: ORT's com.microsoft ``RotaryEmbedding`` where the node proves
how cos/sin came from positions, otherwise one compact plain-ONNX subgraph.

Kernel (``position_source`` is ``inv_freq`` or ``table``, fp32, no extra scaling, a layout
the kernel reads): ``RotaryEmbedding(x, position_ids [B, S], cos_cache, sin_cache)`` with
caches ``[max_pos, rot/2]``: the model's own table rows (``table``), or
``cos/sin(Range(0, max(pos) + 1) * inv_freq)`` built in the graph (``inv_freq``) — the same
product and trig the model traced, per position. The cos/sin inputs are then not read.

Plain (anything else)::

    r   = Slice(x, 0:rot, last axis)                 # skipped when rot covers the whole dim
    rot = Concat(Neg(Slice(r, h:rot)), Slice(r, 0:h))                       rotate-half
        | Reshape(Concat(Unsqueeze(Neg(r[..., 1::2])), Unsqueeze(r[..., ::2])), Shape(r))
                                                                            interleaved
    out = Concat(r * cos + rot * sin, Slice(x, rot:end))
"""

from __future__ import annotations

import torch

from arcompile.ir.graph import Node
from arcompile.runtimes.onnxruntime.context import LowerContext
from arcompile.runtimes.onnxruntime.registry import lowering

_END = 2**62


@lowering("arc.rope")
def rope(ctx: LowerContext, node: Node) -> str:
    kernel = _ort_rotary_embedding(ctx, node)
    return kernel if kernel is not None else plain_rope(ctx, node)


def plain_rope(ctx: LowerContext, node: Node) -> str:
    x, cos, sin = node.inputs[:3]  # arc.rope(x, cos, sin, *position_inputs)
    rot, interleaved = node.attrs["rotary_dim"], node.attrs["interleaved"]
    d = x.shape[-1]
    last = ctx.i64([-1])

    def cut(name: str, start: int, end: int, step: int = 1) -> str:
        return ctx.op("Slice", [name, ctx.i64([start]), ctx.i64([end]), last, ctx.i64([step])])

    x_name = ctx.name(x)
    x_rot = x_name if rot == d else cut(x_name, 0, rot)
    if interleaved:
        odd = ctx.op("Unsqueeze", [ctx.op("Neg", [cut(x_rot, 1, _END, 2)]), last])
        even = ctx.op("Unsqueeze", [cut(x_rot, 0, _END, 2), last])
        pairs = ctx.op("Concat", [odd, even], axis=-1)  # (..., rot/2, 2)
        rotated = ctx.op("Reshape", [pairs, ctx.op("Shape", [x_rot])])
    else:
        h = rot // 2
        rotated = ctx.op("Concat", [ctx.op("Neg", [cut(x_rot, h, rot)]), cut(x_rot, 0, h)],
                         axis=-1)
    out = ctx.op("Add", [ctx.op("Mul", [x_rot, ctx.name(cos)]),
                         ctx.op("Mul", [rotated, ctx.name(sin)])])
    if rot < d:
        out = ctx.op("Concat", [out, cut(x_name, rot, _END)], axis=-1)
    return out


def _ort_rotary_embedding(ctx: LowerContext, node: Node) -> str | None:
    """com.microsoft RotaryEmbedding(x, position_ids [B, S], cos_cache, sin_cache), or None
    where the node does not prove what the kernel needs (then the plain form is used).

    Needs: cos/sin provably ``cos(pos * inv_freq)`` or rows ``table[pos]`` (position_source),
    no extra scaling, fp32, and a layout the kernel reads: x ``[B, N, S, H]`` with cos
    ``[1, 1, S, rot]``, or x ``[B, S, N, H]`` with cos ``[1, S, 1, rot]`` (run as 3-D
    ``[B, S, N*H]``), where S is the positions' own length.
    """
    source = node.attrs.get("position_source")
    if source not in ("inv_freq", "table") or node.attrs.get("attention_scaling", 1.0) != 1.0:
        return None
    x, cos, sin, pos = node.inputs[:4]
    rot, d = node.attrs["rotary_dim"], x.shape[-1] if x.shape else None
    if x.dtype != torch.float32 or not x.shape or len(x.shape) != 4 or not isinstance(d, int):
        return None
    if not pos.shape or len(pos.shape) not in (1, 2) or (len(pos.shape) == 2 and pos.shape[0] != 1):
        return None
    seq = pos.shape[-1]
    if tuple(cos.shape) != tuple(sin.shape):
        return None
    if x.shape[2] == seq and tuple(cos.shape) == (1, 1, seq, rot):
        layout = "BNSH"
    elif x.shape[1] == seq and tuple(cos.shape) == (1, seq, 1, rot) and isinstance(x.shape[2], int):
        layout = "BSNH"
    else:
        return None

    x_name = ctx.name(x)
    # the same ids and caches serve every layer's q and k: built once per graph
    ids_BS, cos_cache, sin_cache = ctx.once(
        ("rope_inputs", source, pos, *node.inputs[4:6], x.shape[0]),
        lambda: _ids_and_caches(ctx, node, source, x))

    attrs = {"interleaved": int(node.attrs["interleaved"]), "domain": "com.microsoft"}
    if rot < d:
        attrs["rotary_embedding_dim"] = rot
    if layout == "BNSH":
        attrs["num_heads"] = int(x.shape[1]) if isinstance(x.shape[1], int) else 0
        return ctx.op("RotaryEmbedding", [x_name, ids_BS, cos_cache, sin_cache], **attrs)
    heads = int(x.shape[2])
    attrs["num_heads"] = heads
    flat = ctx.op("Reshape", [x_name, ctx.i64([0, 0, heads * d])])  # (B, S, N*H)
    out = ctx.op("RotaryEmbedding", [flat, ids_BS, cos_cache, sin_cache], **attrs)
    return ctx.op("Reshape", [out, ctx.op("Shape", [x_name])])


def _ids_and_caches(ctx: LowerContext, node: Node, source: str, x) -> tuple[str, str, str]:
    """position_ids [B, S] and the cos/sin caches RotaryEmbedding reads."""
    pos = node.inputs[3]
    ids = ctx.cast(ctx.name(pos), pos.dtype, torch.int64)
    if source == "inv_freq":
        inv_freq = node.inputs[4]
        # cache rows 0..max(pos): the very product and cos/sin the model computed per position
        count = ctx.op("Add", [ctx.op("ReduceMax", [ids], keepdims=0), ctx.const(1, torch.int64)])
        rows = ctx.op("Range", [ctx.const(0, torch.int64), count, ctx.const(1, torch.int64)])
        angles = ctx.op("Mul", [ctx.op("Unsqueeze", [ctx.cast(rows, torch.int64, torch.float32),
                                                     ctx.i64([1])]),
                                ctx.name(inv_freq)])  # (P, rot/2)
        cos_cache, sin_cache = ctx.op("Cos", [angles]), ctx.op("Sin", [angles])
    else:
        cos_cache, sin_cache = ctx.name(node.inputs[4]), ctx.name(node.inputs[5])
    ids_1S = ctx.op("Reshape", [ids, ctx.i64([1, -1])])
    batch = ctx.shape_of(x, 0, 1)
    ids_BS = ctx.op("Expand", [ids_1S, ctx.op("Concat", [batch, ctx.i64([1])], axis=0)])
    return ids_BS, cos_cache, sin_cache
