"""Lowerings of ops that create tensors: ``arange``, ``full`` and its ``ones``/``zeros``/
``new_*``/``*_like`` relatives, ``scalar_tensor`` and ``fill``.

The dtype always comes from the IR output (torch already resolved defaults and promotion).
Sizes may hold symint Values; a constant fill becomes ConstantOfShape, a symbolic one Expand.
"""

from __future__ import annotations

from typing import Any

import torch
from onnx import helper

from arcompile.ir.graph import Node, Value
from arcompile.runtimes.onnxruntime.context import LowerContext
from arcompile.runtimes.onnxruntime.dtypes import onnx_type
from arcompile.runtimes.onnxruntime.registry import lowering


def fill(ctx: LowerContext, shape: str | None, value: Any, dtype: Any) -> str:
    """A tensor of ``dtype`` and the runtime ``shape`` (int64 1-D name; None: rank 0)."""
    if isinstance(value, Value):
        scalar = ctx.tensor(value, dtype)
        return scalar if shape is None else ctx.op("Expand", [scalar, shape])
    if shape is None:
        return ctx.const(value, dtype)
    t = torch.tensor([value]).to(dtype)
    raw = t.view(torch.uint8).numpy().tobytes()
    return ctx.op("ConstantOfShape", [shape],
                  value=helper.make_tensor("value", onnx_type(dtype), [1], raw, raw=True))


def _shape(ctx: LowerContext, size: list) -> str | None:
    return ctx.sizes(size) if len(size) else None


@lowering("aten.full", "aten.ones", "aten.zeros", "aten.empty.memory_format", "aten.empty")
def full(ctx: LowerContext, node: Node) -> str:
    # empty's contents are unspecified; zeros are a valid choice and keep runs reproducible.
    value = {"aten.ones": 1}.get(node.op, node.arg("fill_value", 0))
    return fill(ctx, _shape(ctx, node.arg("size")), value, node.output.dtype)


@lowering("aten.new_full", "aten.new_ones", "aten.new_zeros", "aten.new_empty")
def new_full(ctx: LowerContext, node: Node) -> str:
    value = {"aten.new_ones": 1}.get(node.op, node.arg("fill_value", 0))
    return fill(ctx, _shape(ctx, node.arg("size")), value, node.output.dtype)


@lowering("aten.full_like", "aten.ones_like", "aten.zeros_like", "aten.empty_like",
          "aten.fill.Scalar", "aten.fill.Tensor")
def full_like(ctx: LowerContext, node: Node) -> str:
    like = node.arg("self")
    value = {"aten.ones_like": 1}.get(node.op, node.arg("fill_value", node.arg("value", 0)))
    shape = ctx.shape_of(like) if like.shape else None
    return fill(ctx, shape, value, node.output.dtype)


@lowering("aten.scalar_tensor")
def scalar_tensor(ctx: LowerContext, node: Node) -> str:
    return fill(ctx, None, node.arg("s"), node.output.dtype)


@lowering("aten.arange", "aten.arange.start", "aten.arange.start_step")
def arange(ctx: LowerContext, node: Node) -> str:
    # Range's element count, max(ceil((end - start) / step), 0), is torch's too.
    dtype = node.output.dtype
    bounds = [node.arg("start", 0), node.arg("end"), node.arg("step", 1)]
    return ctx.op("Range", [ctx.tensor(b, dtype) for b in bounds])
