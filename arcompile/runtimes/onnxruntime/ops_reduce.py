"""Lowerings of reductions and scans along dims: mean/sum/amax/amin/any/all, max.dim,
argmax, ``cumsum`` and ``diff``.

Opset 18 takes reduction axes as an input tensor. An empty or missing dim list reduces every
dim, as torch does.
"""

from __future__ import annotations

import torch

from arcompile.ir.graph import Node, Value
from arcompile.runtimes.onnxruntime.context import LowerContext, rank
from arcompile.runtimes.onnxruntime.ops_shape import INT64_MAX
from arcompile.runtimes.onnxruntime.registry import lowering


def _dims(node: Node, x: Value) -> list[int]:
    dim = node.arg("dim")
    dim = [dim] if isinstance(dim, int) else dim
    r = max(rank(x), 1)
    return list(range(rank(x))) if not dim else [d % r for d in dim]


def reduce(ctx: LowerContext, onnx_op: str, x: str, dims: list[int], keepdim: bool) -> str:
    return ctx.op(onnx_op, [x, ctx.i64(dims)], keepdims=int(bool(keepdim)))


_REDUCE = {"aten.mean.dim": "ReduceMean", "aten.mean": "ReduceMean",
           "aten.sum.dim_IntList": "ReduceSum", "aten.sum": "ReduceSum",
           "aten.amax": "ReduceMax", "aten.amin": "ReduceMin", "aten.prod": "ReduceProd",
           "aten.prod.dim_int": "ReduceProd"}


@lowering(*_REDUCE)
def reduce_op(ctx: LowerContext, node: Node) -> str:
    x = node.arg("self")
    # sum of bools/ints is int64 and mean takes a dtype: reduce in the output's dtype
    name = ctx.tensor(x, node.output.dtype)
    return reduce(ctx, _REDUCE[node.op], name, _dims(node, x), node.arg("keepdim", False))


@lowering("aten.any.dim", "aten.any.dims", "aten.any", "aten.all.dim", "aten.all.dims", "aten.all")
def any_all(ctx: LowerContext, node: Node) -> str:
    # ORT's ReduceMax/Min take no bools: reduce 0/1 as int32 and cast back.
    x = node.arg("self")
    as_int = ctx.op("Cast", [ctx.tensor(x, torch.bool)], to=6)  # INT32
    onnx_op = "ReduceMax" if node.op.startswith("aten.any") else "ReduceMin"
    out = reduce(ctx, onnx_op, as_int, _dims(node, x), node.arg("keepdim", False))
    return ctx.cast(out, torch.int32, torch.bool)


@lowering("aten.max.dim", "aten.min.dim")
def max_dim(ctx: LowerContext, node: Node) -> list[str]:
    x = node.arg("self")
    dim, keep = node.arg("dim") % max(rank(x), 1), node.arg("keepdim", False)
    is_max = node.op == "aten.max.dim"
    values_op, index_op = ("ReduceMax", "ArgMax") if is_max else ("ReduceMin", "ArgMin")
    name = ctx.name(x)
    values = reduce(ctx, values_op, name, [dim], keep)
    # select_last_index=0 returns the first extreme, as torch does
    indices = ctx.op(index_op, [name], axis=dim, keepdims=int(bool(keep)))
    return [values, indices]


@lowering("aten.argmax", "aten.argmin")
def argmax(ctx: LowerContext, node: Node) -> str:
    x, dim = node.arg("self"), node.arg("dim")
    name = ctx.name(x)
    onnx_op = "ArgMax" if node.op == "aten.argmax" else "ArgMin"
    if dim is None:  # over the flattened tensor
        flat = ctx.op("Reshape", [name, ctx.i64([-1])])
        out = ctx.op(onnx_op, [flat], axis=0, keepdims=0)
        if node.arg("keepdim", False):
            out = ctx.op("Reshape", [out, ctx.i64([1] * rank(x))])
        return out
    keep = int(bool(node.arg("keepdim", False)))
    return ctx.op(onnx_op, [name], axis=dim % max(rank(x), 1), keepdims=keep)


@lowering("aten.cumsum")
def cumsum(ctx: LowerContext, node: Node) -> str:
    # cumsum of bools counts them in int64; the output dtype says so
    x = node.arg("self")
    axis = ctx.const(node.arg("dim") % max(rank(x), 1), torch.int64)
    return ctx.op("CumSum", [ctx.tensor(x, node.output.dtype), axis])


@lowering("aten.diff")
def diff(ctx: LowerContext, node: Node) -> str:
    """diff(x, n, dim, prepend, append): n times ``x[1:] - x[:-1]`` along dim, on x with
    prepend and append concatenated (bools take ``!=``, which is xor)."""
    x = node.arg("self")
    dtype = node.output.dtype
    dim = node.arg("dim", -1) % rank(x)
    parts = [node.arg("prepend"), x, node.arg("append")]
    names = [ctx.tensor(p, dtype) for p in parts if p is not None]
    cur = names[0] if len(names) == 1 else ctx.op("Concat", names, axis=dim)
    axis = ctx.i64([dim])
    for _ in range(node.arg("n", 1)):
        hi = ctx.op("Slice", [cur, ctx.i64([1]), ctx.i64([INT64_MAX]), axis])
        lo = ctx.op("Slice", [cur, ctx.i64([0]), ctx.i64([-1]), axis])
        cur = ctx.op("Xor" if dtype == torch.bool else "Sub", [hi, lo])
    return cur
