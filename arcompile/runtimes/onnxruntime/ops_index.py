"""Lowerings of ops that read by index: ``embedding``, ``index_select``, ``gather`` and
advanced indexing (``aten.index.Tensor``, i.e. ``x[idx0, None, idx2]``).

Advanced indexing follows numpy/torch rules: the index tensors broadcast together to a shape
S; when they index adjacent dims the S dims replace those dims in place, otherwise S goes
first. One index tensor is a Gather; several are a GatherND over the indexed dims moved to
the front, then a transpose back where torch keeps S in place.
"""

from __future__ import annotations

import torch

from arcompile.errors import UnsupportedOpError
from arcompile.ir.graph import Node, Value
from arcompile.runtimes.onnxruntime.context import LowerContext, rank
from arcompile.runtimes.onnxruntime.ops_shape import transpose_to
from arcompile.runtimes.onnxruntime.registry import lowering


@lowering("aten.embedding")
def embedding(ctx: LowerContext, node: Node) -> str:
    # padding_idx and scale_grad_by_freq only change gradients
    indices = ctx.tensor(node.arg("indices"), torch.int64)
    return ctx.op("Gather", [ctx.name(node.arg("weight")), indices], axis=0)


@lowering("aten.index_select")
def index_select(ctx: LowerContext, node: Node) -> str:
    x = node.arg("self")
    return ctx.op("Gather", [ctx.name(x), ctx.tensor(node.arg("index"), torch.int64)],
                  axis=node.arg("dim") % rank(x))


@lowering("aten.gather")
def gather(ctx: LowerContext, node: Node) -> str:
    x = node.arg("self")
    return ctx.op("GatherElements", [ctx.name(x), ctx.tensor(node.arg("index"), torch.int64)],
                  axis=node.arg("dim") % rank(x))


@lowering("aten.index.Tensor")
def index(ctx: LowerContext, node: Node) -> str:
    x = node.arg("self")
    indices: list[Value | None] = list(node.arg("indices"))
    dims = [d for d, idx in enumerate(indices) if idx is not None]
    for d in dims:
        if indices[d].dtype == torch.bool:
            raise UnsupportedOpError(f"{node.where()}: indexing with a boolean mask has a "
                                     "data-dependent shape, which this backend cannot lower")
    if len(dims) == 1:
        d = dims[0]
        return ctx.op("Gather", [ctx.name(x), ctx.tensor(indices[d], torch.int64)], axis=d)

    # Several index tensors: broadcast them to S, stack to [S..., k], GatherND on x with the
    # indexed dims moved to the front.
    idx = [ctx.tensor(indices[d], torch.int64) for d in dims]
    shape = ctx.op("Shape", [idx[0]])
    for name in idx[1:]:
        shape = ctx.op("Shape", [ctx.op("Expand", [name, shape])])
    columns = [ctx.op("Unsqueeze", [ctx.op("Expand", [name, shape]), ctx.i64([-1])])
               for name in idx]
    stacked = ctx.op("Concat", columns, axis=-1)  # (S..., k)
    r = rank(x)
    rest = [d for d in range(r) if d not in dims]
    gathered = ctx.op("GatherND", [transpose_to(ctx, ctx.name(x), dims + rest), stacked])

    adjacent = dims == list(range(dims[0], dims[-1] + 1))
    if not adjacent or dims[0] == 0:
        return gathered  # already [S..., rest...]
    # torch keeps S where the indexed dims were: [before..., S..., after...]
    s_rank = max(rank(indices[d]) for d in dims)
    before = dims[0]
    out_rank = rank(node.output)
    perm = (list(range(s_rank, s_rank + before)) + list(range(s_rank))
            + list(range(s_rank + before, out_rank)))
    return transpose_to(ctx, gathered, perm)
