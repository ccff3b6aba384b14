"""Lowerings of elementwise aten ops: arithmetic, comparisons, logic, unary maths, casts,
``where`` / ``masked_fill``, and the ops that are no-ops at inference (clone, dropout, asserts).

Operands follow torch's type promotion: arithmetic casts every operand to the IR output's
dtype; comparisons cast to the dtype torch would compare in (``LowerContext.promote``).
"""

from __future__ import annotations

import torch

from arcompile.errors import UnsupportedOpError
from arcompile.ir.graph import Node
from arcompile.runtimes.onnxruntime.context import LowerContext
from arcompile.runtimes.onnxruntime.dtypes import is_float
from arcompile.runtimes.onnxruntime.ops_sym import floor_divide, python_mod
from arcompile.runtimes.onnxruntime.registry import lowering


def _binary(ctx: LowerContext, node: Node, onnx_op: str, a: str = "self", b: str = "other",
            **attrs) -> str:
    """``onnx_op(a, b)`` with both operands cast to the output dtype."""
    dtype = node.output.dtype
    operands = [ctx.tensor(node.arg(a), dtype), ctx.tensor(node.arg(b), dtype)]
    return ctx.op(onnx_op, operands, **attrs)


def _scaled(ctx: LowerContext, node: Node, name: str, scale_arg: str = "alpha") -> str:
    """``x * alpha`` for add/sub's alpha argument (alpha = 1 costs nothing)."""
    x, alpha = node.arg(name), node.arg(scale_arg, 1)
    dtype = node.output.dtype
    if alpha == 1:
        return ctx.tensor(x, dtype)
    return ctx.op("Mul", [ctx.tensor(x, dtype), ctx.tensor(alpha, dtype)])


# -- arithmetic ---------------------------------------------------------------------------
@lowering("aten.add.Tensor", "aten.add.Scalar")
def add(ctx: LowerContext, node: Node) -> str:
    if node.output.dtype == torch.bool:  # torch adds booleans as a logical or
        return _binary(ctx, node, "Or")
    self_ = ctx.tensor(node.arg("self"), node.output.dtype)
    return ctx.op("Add", [self_, _scaled(ctx, node, "other")])


@lowering("aten.sub.Tensor", "aten.sub.Scalar")
def sub(ctx: LowerContext, node: Node) -> str:
    self_ = ctx.tensor(node.arg("self"), node.output.dtype)
    return ctx.op("Sub", [self_, _scaled(ctx, node, "other")])


@lowering("aten.rsub.Tensor", "aten.rsub.Scalar")
def rsub(ctx: LowerContext, node: Node) -> str:
    # rsub(self, other, alpha) = other - alpha * self
    other = ctx.tensor(node.arg("other"), node.output.dtype)
    return ctx.op("Sub", [other, _scaled(ctx, node, "self")])


@lowering("aten.mul.Tensor", "aten.mul.Scalar")
def mul(ctx: LowerContext, node: Node) -> str:
    if node.output.dtype == torch.bool:  # torch multiplies booleans as a logical and
        return _binary(ctx, node, "And")
    return _binary(ctx, node, "Mul")


@lowering("aten.div.Tensor", "aten.div.Scalar", "aten.div.Tensor_mode", "aten.div.Scalar_mode",
          "aten.floor_divide", "aten.floor_divide.Scalar")
def div(ctx: LowerContext, node: Node) -> str:
    dtype = node.output.dtype
    mode = "floor" if node.op.startswith("aten.floor_divide") else node.arg("rounding_mode")
    a, b = ctx.tensor(node.arg("self"), dtype), ctx.tensor(node.arg("other"), dtype)
    if mode == "floor":
        return floor_divide(ctx, a, b, dtype)
    q = ctx.op("Div", [a, b])  # integer Div truncates, which is what "trunc" asks
    if mode == "trunc" and is_float(dtype):
        # ONNX has no Trunc: trunc(q) = sign(q) * floor(|q|)
        return ctx.op("Mul", [ctx.op("Sign", [q]), ctx.op("Floor", [ctx.op("Abs", [q])])])
    return q


@lowering("aten.remainder.Tensor", "aten.remainder.Scalar")
def remainder(ctx: LowerContext, node: Node) -> str:
    dtype = node.output.dtype
    a, b = ctx.tensor(node.arg("self"), dtype), ctx.tensor(node.arg("other"), dtype)
    return python_mod(ctx, a, b, dtype)


@lowering("aten.fmod.Tensor", "aten.fmod.Scalar")
def fmod(ctx: LowerContext, node: Node) -> str:
    return _binary(ctx, node, "Mod", fmod=1)  # C's fmod: the result takes the dividend's sign


@lowering("aten.pow.Tensor_Scalar", "aten.pow.Tensor_Tensor", "aten.pow.Scalar")
def pow_(ctx: LowerContext, node: Node) -> str:
    return _binary(ctx, node, "Pow", "self", "exponent")


@lowering("aten.maximum", "aten.minimum")
def max_min(ctx: LowerContext, node: Node) -> str:
    return _binary(ctx, node, "Max" if node.op == "aten.maximum" else "Min")


@lowering("aten.clamp", "aten.clamp.Tensor", "aten.clamp_min", "aten.clamp_max",
          "aten.clamp_min.Tensor", "aten.clamp_max.Tensor")
def clamp(ctx: LowerContext, node: Node) -> str:
    dtype = node.output.dtype
    out = ctx.tensor(node.arg("self"), dtype)
    lo = node.arg("min") if not node.op.startswith("aten.clamp_max") else None
    hi = node.arg("max") if not node.op.startswith("aten.clamp_min") else None
    # Max/Min rather than Clip: they broadcast tensor bounds and take every dtype Clip does.
    if lo is not None:
        out = ctx.op("Max", [out, ctx.tensor(lo, dtype)])
    if hi is not None:
        out = ctx.op("Min", [out, ctx.tensor(hi, dtype)])
    return out


# -- unary --------------------------------------------------------------------------------
_UNARY = {
    "aten.neg": "Neg", "aten.abs": "Abs", "aten.exp": "Exp", "aten.log": "Log",
    "aten.sqrt": "Sqrt", "aten.sin": "Sin", "aten.cos": "Cos", "aten.tanh": "Tanh",
    "aten.sigmoid": "Sigmoid", "aten.relu": "Relu", "aten.erf": "Erf", "aten.floor": "Floor",
    "aten.ceil": "Ceil", "aten.reciprocal": "Reciprocal", "aten.sign": "Sign",
    "aten.round": "Round",
}


@lowering(*_UNARY)
def unary(ctx: LowerContext, node: Node) -> str:
    # Float-only maths on an integer tensor yields float in torch: cast to the output first.
    return ctx.op(_UNARY[node.op], [ctx.tensor(node.arg("self"), node.output.dtype)])


@lowering("aten.rsqrt")
def rsqrt(ctx: LowerContext, node: Node) -> str:
    x = ctx.tensor(node.arg("self"), node.output.dtype)
    return ctx.op("Reciprocal", [ctx.op("Sqrt", [x])])


@lowering("aten.square")
def square(ctx: LowerContext, node: Node) -> str:
    x = ctx.tensor(node.arg("self"), node.output.dtype)
    return ctx.op("Mul", [x, x])


@lowering("aten.isnan")
def isnan(ctx: LowerContext, node: Node) -> str:
    return ctx.op("IsNaN", [ctx.tensor(node.arg("self"))])


# -- comparisons and logic ----------------------------------------------------------------
_COMPARE = {"eq": "Equal", "lt": "Less", "le": "LessOrEqual", "gt": "Greater",
            "ge": "GreaterOrEqual"}


@lowering(*[f"aten.{k}.{o}" for k in (*_COMPARE, "ne") for o in ("Tensor", "Scalar")])
def compare(ctx: LowerContext, node: Node) -> str:
    a, b = node.arg("self"), node.arg("other")
    dtype = ctx.promote(a, b)
    kind = node.op.split(".")[1]
    pair = [ctx.tensor(a, dtype), ctx.tensor(b, dtype)]
    if kind == "ne":
        return ctx.op("Not", [ctx.op("Equal", pair)])
    return ctx.op(_COMPARE[kind], pair)


_LOGICAL = {"and": "And", "or": "Or", "xor": "Xor"}


@lowering(*[f"aten.logical_{k}" for k in _LOGICAL])
def logical(ctx: LowerContext, node: Node) -> str:
    a = _as_bool(ctx, node.arg("self"))
    b = _as_bool(ctx, node.arg("other"))
    return ctx.op(_LOGICAL[node.op.split("_")[1]], [a, b])


def _as_bool(ctx: LowerContext, x) -> str:
    # Cast to bool is "nonzero", as torch's logical ops read numbers.
    return ctx.tensor(x, torch.bool)


@lowering("aten.logical_not", "aten.bitwise_not")
def logical_not(ctx: LowerContext, node: Node) -> str:
    if node.op == "aten.bitwise_not" and node.output.dtype != torch.bool:
        return ctx.op("BitwiseNot", [ctx.tensor(node.arg("self"))])
    return ctx.op("Not", [_as_bool(ctx, node.arg("self"))])


@lowering(*[f"aten.{name}.{overload}" for k in _LOGICAL for name in (f"bitwise_{k}", f"__{k}__")
            for overload in ("Tensor", "Scalar")])
def bitwise(ctx: LowerContext, node: Node) -> str:
    kind = node.op.split(".")[1].removeprefix("bitwise_").strip("_")
    if node.output.dtype == torch.bool:  # on booleans the bitwise ops are the logical ones
        return _binary(ctx, node, _LOGICAL[kind])
    return _binary(ctx, node, "Bitwise" + _LOGICAL[kind])


@lowering("aten.where.self", "aten.where.ScalarSelf", "aten.where.ScalarOther", "aten.where.Scalar")
def where(ctx: LowerContext, node: Node) -> str:
    dtype = node.output.dtype
    cond = _as_bool(ctx, node.arg("condition"))
    branches = [ctx.tensor(node.arg("self"), dtype), ctx.tensor(node.arg("other"), dtype)]
    return ctx.op("Where", [cond, *branches])


@lowering("aten.masked_fill.Scalar", "aten.masked_fill.Tensor")
def masked_fill(ctx: LowerContext, node: Node) -> str:
    dtype = node.output.dtype
    mask = _as_bool(ctx, node.arg("mask"))
    branches = [ctx.tensor(node.arg("value"), dtype), ctx.tensor(node.arg("self"), dtype)]
    return ctx.op("Where", [mask, *branches])


# -- casts and no-ops ---------------------------------------------------------------------
@lowering("aten.to.dtype", "aten.to.device", "aten.to.dtype_layout", "aten.to.other",
          "aten._to_copy", "aten.type_as", "aten._to_dim_order_copy")
def to(ctx: LowerContext, node: Node) -> str:
    # Devices and layouts mean nothing to the ONNX graph; only the dtype survives.
    x = node.arg("self")
    return ctx.cast(ctx.name(x), x.dtype, node.output.dtype)


@lowering("aten.clone", "aten.contiguous", "aten.alias", "aten.detach", "aten.lift_fresh_copy",
          "aten.lift_fresh")
def identity(ctx: LowerContext, node: Node) -> str:
    return ctx.name(node.arg("self"))


@lowering("aten.dropout", "aten.feature_dropout", "aten.alpha_dropout")
def dropout(ctx: LowerContext, node: Node) -> str:
    if node.arg("train") and node.arg("p", 0) > 0:
        raise UnsupportedOpError(f"{node.where()} is a training-mode dropout; export the model "
                                 "in eval mode")
    return ctx.name(node.arg("input"))


@lowering("aten._assert_tensor_metadata", "aten._assert_scalar", "aten.sym_constrain_range",
          "aten.sym_constrain_range_for_size", "aten._assert_async", "aten._assert_async.msg")
def assertion(ctx: LowerContext, node: Node) -> None:
    # Export-time checks of facts the traced graph already relies on; nothing to run.
    return None

