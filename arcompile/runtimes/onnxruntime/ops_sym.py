"""Lowerings of symbolic sizes: ``aten.sym_size.int`` and arithmetic on sizes (``sym.*``).

Convention (see dtypes.py): a symint is an int64 tensor of shape [1], a symfloat a double [1],
a symbool a bool [1]. Python's semantics are kept where they differ from ONNX's: ``//`` and
``%`` floor rather than truncate.
"""

from __future__ import annotations

from typing import Any

import torch

from arcompile.ir.graph import SYM_DTYPES, Node, Value
from arcompile.runtimes.onnxruntime.context import LowerContext, rank
from arcompile.runtimes.onnxruntime.dtypes import is_float, torch_dtype
from arcompile.runtimes.onnxruntime.registry import lowering


def sym_operand(ctx: LowerContext, x: Any, dtype: torch.dtype) -> str:
    """A symbolic scalar or a Python number as a [1] tensor of ``dtype``."""
    if isinstance(x, Value):
        name = ctx.name(x)
        if x.dtype not in SYM_DTYPES:  # a rank-0 tensor standing in for a number
            name = ctx.op("Reshape", [name, ctx.i64([1])])
        return ctx.cast(name, x.dtype, dtype)
    return ctx.const([x], dtype)


def _kind(x: Any) -> torch.dtype:
    if isinstance(x, Value):
        return torch_dtype(x.dtype)
    return torch.float64 if isinstance(x, float) else torch.int64


def _operands(ctx: LowerContext, node: Node, dtype: torch.dtype | None = None) -> list[str]:
    args = [node.arg(f"a{i}") for i in range(len(node.attrs))]
    if dtype is None:  # comparisons: compare in float when either side is one
        dtype = torch.float64 if any(_kind(a).is_floating_point for a in args) else torch.int64
    return [sym_operand(ctx, a, dtype) for a in args]


@lowering("aten.sym_size.int")
def sym_size(ctx: LowerContext, node: Node) -> str:
    x = node.arg("self")
    dim = node.arg("dim") % rank(x)
    return ctx.shape_of(x, dim, dim + 1)


@lowering("aten.sym_numel")
def sym_numel(ctx: LowerContext, node: Node) -> str:
    return ctx.op("ReduceProd", [ctx.shape_of(node.arg("self"))], keepdims=1)


@lowering("aten._local_scalar_dense", "aten.item")
def local_scalar(ctx: LowerContext, node: Node) -> str:
    return sym_operand(ctx, node.arg("self"), torch_dtype(node.output.dtype))


_SAME_TYPE = {"sym.add": "Add", "sym.sub": "Sub", "sym.mul": "Mul", "sym.max": "Max",
              "sym.min": "Min", "sym.pow": "Pow"}


@lowering(*_SAME_TYPE)
def sym_arith(ctx: LowerContext, node: Node) -> str:
    return ctx.op(_SAME_TYPE[node.op], _operands(ctx, node, torch_dtype(node.output.dtype)))


_COMPARE = {"sym.eq": "Equal", "sym.lt": "Less", "sym.le": "LessOrEqual", "sym.gt": "Greater",
            "sym.ge": "GreaterOrEqual"}


@lowering(*_COMPARE)
def sym_compare(ctx: LowerContext, node: Node) -> str:
    return ctx.op(_COMPARE[node.op], _operands(ctx, node))


@lowering("sym.ne")
def sym_ne(ctx: LowerContext, node: Node) -> str:
    return ctx.op("Not", [ctx.op("Equal", _operands(ctx, node))])


@lowering("sym.truediv")
def sym_truediv(ctx: LowerContext, node: Node) -> str:
    return ctx.op("Div", _operands(ctx, node, torch.float64))


@lowering("sym.floordiv")
def sym_floordiv(ctx: LowerContext, node: Node) -> str:
    a, b = _operands(ctx, node, torch_dtype(node.output.dtype))
    return floor_divide(ctx, a, b, node.output.dtype)


@lowering("sym.mod")
def sym_mod(ctx: LowerContext, node: Node) -> str:
    a, b = _operands(ctx, node, torch_dtype(node.output.dtype))
    return python_mod(ctx, a, b, node.output.dtype)


def floor_divide(ctx: LowerContext, a: str, b: str, dtype: Any) -> str:
    """Python's ``a // b``: ONNX Div truncates integers toward zero, Python floors."""
    if is_float(dtype):
        return ctx.op("Floor", [ctx.op("Div", [a, b])])
    # (a - a mod b) is an exact multiple of b when mod takes the divisor's sign (fmod=0).
    return ctx.op("Div", [ctx.op("Sub", [a, ctx.op("Mod", [a, b], fmod=0)]), b])


def python_mod(ctx: LowerContext, a: str, b: str, dtype: Any) -> str:
    """Python's ``a % b`` (the result takes the divisor's sign)."""
    if is_float(dtype):
        return ctx.op("Sub", [a, ctx.op("Mul", [floor_divide(ctx, a, b, dtype), b])])
    return ctx.op("Mod", [a, b], fmod=0)


@lowering("sym.neg")
def sym_neg(ctx: LowerContext, node: Node) -> str:
    return ctx.op("Neg", _operands(ctx, node, torch_dtype(node.output.dtype)))


@lowering("sym.not")
def sym_not(ctx: LowerContext, node: Node) -> str:
    return ctx.op("Not", _operands(ctx, node, torch.bool))


@lowering("sym.float", "sym.int")
def sym_convert(ctx: LowerContext, node: Node) -> str:
    # Cast from float to int truncates toward zero, as Python's int() does.
    x = node.arg("a0")
    return sym_operand(ctx, x, torch_dtype(node.output.dtype))
