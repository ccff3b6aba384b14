"""Lowerings of ops that move data without computing on it: views and reshapes, expand,
permutes, (un)squeeze, slicing, concatenation and splitting.

Sizes may mix ints and symint Values (``view(x, [B, T, -1, 64])``); ``LowerContext.sizes``
turns them into one int64 vector. Slices that keep a whole dim lower to nothing.
"""

from __future__ import annotations

from arcompile.errors import UnsupportedOpError
from arcompile.ir.graph import Node, Value
from arcompile.runtimes.onnxruntime.context import LowerContext, rank
from arcompile.runtimes.onnxruntime.registry import lowering

INT64_MAX = 2**63 - 1


@lowering("aten.view", "aten.reshape", "aten._unsafe_view", "aten.view_copy")
def view(ctx: LowerContext, node: Node) -> str:
    size = node.arg("size", node.arg("shape"))
    # allowzero=0 reads a 0 in the shape as "keep this dim", so it is only safe without 0s.
    allowzero = int(any(isinstance(d, int) and d == 0 for d in size))
    return ctx.op("Reshape", [ctx.name(node.arg("self")), ctx.sizes(size)], allowzero=allowzero)


@lowering("aten.flatten.using_ints")
def flatten(ctx: LowerContext, node: Node) -> str:
    x = node.arg("self")
    r = max(rank(x), 1)
    start, end = node.arg("start_dim", 0) % r, node.arg("end_dim", -1) % r
    parts = [ctx.shape_of(x, 0, start)] if start else []
    parts.append(ctx.i64([-1]))
    if end + 1 < r:
        parts.append(ctx.shape_of(x, end + 1))
    shape = parts[0] if len(parts) == 1 else ctx.op("Concat", parts, axis=0)
    return ctx.op("Reshape", [ctx.name(x), shape])


@lowering("aten.expand", "aten.expand_copy", "aten.broadcast_to")
def expand(ctx: LowerContext, node: Node) -> str:
    # torch's -1 keeps a dim; ONNX Expand broadcasts both ways, so a 1 keeps it as well.
    size = [1 if isinstance(d, int) and d == -1 else d for d in node.arg("size")]
    return ctx.op("Expand", [ctx.name(node.arg("self")), ctx.sizes(size)])


@lowering("aten.expand_as")
def expand_as(ctx: LowerContext, node: Node) -> str:
    return ctx.op("Expand", [ctx.name(node.arg("self")), ctx.shape_of(node.arg("other"))])


@lowering("aten.permute", "aten.permute_copy")
def permute(ctx: LowerContext, node: Node) -> str:
    x = node.arg("self")
    perm = [d % rank(x) for d in node.arg("dims")]
    return transpose_to(ctx, ctx.name(x), perm)


def transpose_to(ctx: LowerContext, name: str, perm: list[int]) -> str:
    if perm == sorted(perm):
        return name
    return ctx.op("Transpose", [name], perm=perm)


def swap_perm(r: int, a: int, b: int) -> list[int]:
    perm = list(range(r))
    perm[a % r], perm[b % r] = perm[b % r], perm[a % r]
    return perm


@lowering("aten.transpose.int", "aten.transpose_copy.int")
def transpose(ctx: LowerContext, node: Node) -> str:
    x = node.arg("self")
    if rank(x) < 2:
        return ctx.name(x)
    return transpose_to(ctx, ctx.name(x), swap_perm(rank(x), node.arg("dim0"), node.arg("dim1")))


@lowering("aten.t", "aten.numpy_T")
def t(ctx: LowerContext, node: Node) -> str:
    x = node.arg("self")
    return transpose_to(ctx, ctx.name(x), list(range(rank(x)))[::-1])


@lowering("aten.unsqueeze", "aten.unsqueeze_copy")
def unsqueeze(ctx: LowerContext, node: Node) -> str:
    x = node.arg("self")
    dim = node.arg("dim") % (rank(x) + 1)
    return ctx.op("Unsqueeze", [ctx.name(x), ctx.i64([dim])])


@lowering("aten.squeeze", "aten.squeeze.dim", "aten.squeeze.dims", "aten.squeeze_copy.dim")
def squeeze(ctx: LowerContext, node: Node) -> str:
    x = node.arg("self")
    dims = node.arg("dim", node.arg("dims"))
    dims = [dims] if isinstance(dims, int) else dims
    if dims is None:  # every static 1 (the IR shape says which; symbols are not squeezed)
        dims = [i for i, d in enumerate(x.shape) if d == 1]
    # torch ignores dims that are not 1; ONNX would fail on them, so keep only the 1s.
    dims = [d % max(rank(x), 1) for d in dims if rank(x) and x.shape[d] == 1]
    if not dims:
        return ctx.name(x)
    return ctx.op("Squeeze", [ctx.name(x), ctx.i64(dims)])


@lowering("aten.slice.Tensor", "aten.slice_copy.Tensor")
def slice_(ctx: LowerContext, node: Node) -> str:
    x = node.arg("self")
    dim = node.arg("dim", 0) % rank(x)
    start, end, step = node.arg("start"), node.arg("end"), node.arg("step", 1)
    start = 0 if start is None else start
    end = INT64_MAX if end is None else end
    return slice_dim(ctx, x, dim, start, end, step)


def slice_dim(ctx: LowerContext, x: Value, dim: int, start, end, step: int = 1) -> str:
    """``x[..., start:end:step, ...]`` along ``dim``; a slice keeping the whole dim is free."""
    size = x.shape[dim]
    whole_end = isinstance(end, int) and (end >= INT64_MAX
                                          or (isinstance(size, int) and end >= size))
    if isinstance(start, int) and start == 0 and whole_end and step == 1:
        return ctx.name(x)
    return ctx.op("Slice", [ctx.name(x), ctx.sizes([start]), ctx.sizes([end]), ctx.i64([dim]),
                            ctx.i64([step])])


@lowering("aten.narrow")
def narrow(ctx: LowerContext, node: Node) -> str:
    x, start, length = node.arg("self"), node.arg("start"), node.arg("length")
    dim = node.arg("dim") % rank(x)
    if isinstance(start, int) and isinstance(length, int):
        return slice_dim(ctx, x, dim, start, start + length)
    begin = ctx.sizes([start])
    end = ctx.op("Add", [begin, ctx.sizes([length])])
    return ctx.op("Slice", [ctx.name(x), begin, end, ctx.i64([dim])])


@lowering("aten.select.int", "aten.select_copy.int")
def select(ctx: LowerContext, node: Node) -> str:
    # Gather with a rank-0 index drops the dim, as select does; negative indices count back.
    x = node.arg("self")
    index = ctx.tensor(node.arg("index"), "symint")
    return ctx.op("Gather", [ctx.name(x), index], axis=node.arg("dim") % rank(x))


@lowering("aten.cat", "aten.concat")
def cat(ctx: LowerContext, node: Node) -> str:
    out = node.output
    dim = node.arg("dim", 0) % rank(out)
    # torch still accepts legacy empty 1-D tensors in cat and ignores them
    parts = [v for v in node.arg("tensors") if not (v.shape == (0,) and rank(out) != 1)]
    names = [ctx.tensor(v, out.dtype) for v in parts]
    return names[0] if len(names) == 1 else ctx.op("Concat", names, axis=dim)


@lowering("aten.stack")
def stack(ctx: LowerContext, node: Node) -> str:
    out = node.output
    dim = node.arg("dim", 0) % rank(out)
    names = [ctx.op("Unsqueeze", [ctx.tensor(v, out.dtype), ctx.i64([dim])])
             for v in node.arg("tensors")]
    return names[0] if len(names) == 1 else ctx.op("Concat", names, axis=dim)


@lowering("aten.split.Tensor", "aten.split_with_sizes", "aten.split_with_sizes_copy",
          "aten.split_copy.Tensor", "aten.chunk", "aten.unsafe_split.Tensor")
def split(ctx: LowerContext, node: Node) -> list[str]:
    """split/chunk: by the output shapes when they are static, else by slices of runtime size."""
    x = node.arg("self")
    dim = node.arg("dim", 0) % rank(x)
    sizes = [v.shape[dim] for v in node.outputs]
    if len(sizes) == 1:
        return [ctx.name(x)]
    if all(isinstance(s, int) for s in sizes):
        return ctx.op("Split", [ctx.name(x), ctx.i64(sizes)], outputs=len(sizes), axis=dim)
    if node.op.startswith("aten.split_with_sizes"):
        return _split_by_offsets(ctx, x, dim, node.arg("split_sizes"))
    return _split_even(ctx, node, x, dim)


def _split_by_offsets(ctx: LowerContext, x: Value, dim: int, sizes: list) -> list[str]:
    outs, begin = [], ctx.i64([0])
    for s in sizes:
        end = ctx.op("Add", [begin, ctx.sizes([s])])
        outs.append(ctx.op("Slice", [ctx.name(x), begin, end, ctx.i64([dim])]))
        begin = end
    return outs


def _split_even(ctx: LowerContext, node: Node, x: Value, dim: int) -> list[str]:
    """Pieces of one size along a symbolic dim: ``split_size``, or for chunk ceil(D / chunks)."""
    if node.op == "aten.chunk":
        d = ctx.shape_of(x, dim, dim + 1)
        n = ctx.i64([node.arg("chunks")])
        piece = ctx.op("Div", [ctx.op("Add", [d, ctx.op("Sub", [n, ctx.i64([1])])]), n])
    else:
        split_size = node.arg("split_size")
        if not isinstance(split_size, (int, Value)):
            raise UnsupportedOpError(f"{node.where()}: split size {split_size!r} is not a size")
        piece = ctx.sizes([split_size])
    outs = []
    for i in range(len(node.outputs)):
        begin = ctx.op("Mul", [piece, ctx.i64([i])])
        end = ctx.op("Mul", [piece, ctx.i64([i + 1])])  # the last slice clamps at the dim's end
        outs.append(ctx.op("Slice", [ctx.name(x), begin, end, ctx.i64([dim])]))
    return outs


@lowering("aten.unbind.int", "aten.unbind_copy.int")
def unbind(ctx: LowerContext, node: Node) -> list[str]:
    x = node.arg("self")
    dim = node.arg("dim", 0) % rank(x)
    return [ctx.op("Gather", [ctx.name(x), ctx.const(i, "symint")], axis=dim)
            for i in range(len(node.outputs))]


@lowering("aten.flip")
def flip(ctx: LowerContext, node: Node) -> str:
    # a Slice with step -1 from the last element to before the first, for each dim
    x = node.arg("self")
    dims = [d % rank(x) for d in node.arg("dims")]
    if not dims:
        return ctx.name(x)
    n = len(dims)
    return ctx.op("Slice", [ctx.name(x), ctx.i64([-1] * n), ctx.i64([-INT64_MAX - 1] * n),
                            ctx.i64(dims), ctx.i64([-1] * n)])


@lowering("aten.repeat_interleave.self_int")
def repeat_interleave(ctx: LowerContext, node: Node) -> str:
    # x[..., i, ...] repeated r times in place along dim: unsqueeze after dim, expand that new
    # dim to r, and merge it back into dim.
    x, repeats, dim = node.arg("self"), node.arg("repeats"), node.arg("dim")
    if dim is None or not isinstance(repeats, int):
        raise UnsupportedOpError(f"{node.where()}: only a fixed repeat count along a given dim "
                                 "is lowered")
    r = rank(x)
    dim %= r
    grown = ctx.op("Unsqueeze", [ctx.name(x), ctx.i64([dim + 1])])
    spread = ctx.op("Expand", [grown, ctx.i64([1] * (dim + 1) + [repeats] + [1] * (r - dim - 1))])
    parts = ([ctx.shape_of(x, 0, dim)] if dim else []) + [ctx.i64([-1])]
    if dim + 1 < r:
        parts.append(ctx.shape_of(x, dim + 1))
    shape = parts[0] if len(parts) == 1 else ctx.op("Concat", parts, axis=0)
    return ctx.op("Reshape", [spread, shape])
