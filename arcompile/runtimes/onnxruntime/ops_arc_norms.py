"""Lowerings of the arc.* norms (``passes/fuse_norms.py``) to ONNX Runtime's fused kernels.

Three forms, chosen per graph with ``graph.meta["onnxruntime.norm_lowering"]``:

- ``"fused"`` (default):
      arc.rms_norm        -> SimplifiedLayerNormalization (ORT's contrib op, default domain)
      arc.layer_norm      -> LayerNormalization (opset 17)
      arc.skip_rms_norm   -> com.microsoft SkipSimplifiedLayerNormalization when float32
                             throughout with x and skip of one shape (outputs as below), else
                             Add, then SimplifiedLayerNormalization
      arc.skip_layer_norm -> Add, then LayerNormalization; outputs (y, the Add)
- ``"skip_kernels"``: arc.skip_rms_norm -> com.microsoft SkipSimplifiedLayerNormalization and
  arc.skip_layer_norm -> com.microsoft SkipLayerNormalization, outputs (y, -, -, s): output 3
  is ``input_skip_bias_sum``, the residual sum the next block reads; mean and inv_std_var are
  left unproduced. Measured with ORT 1.32 on this CPU (2 threads, 30 chained norms of width
  576): SkipSimplifiedLayerNormalization costs the same as Add + SimplifiedLayerNormalization
  for one token (36 us per 30) and ~40% more for 128 (1.5 against 1.1 ms), so the default
  takes it for float32: a decode step runs one kernel fewer per residual norm, a prefill loses
  well under a millisecond. SkipLayerNormalization took 30-80 ms against 1.0-1.5 ms for
  Add + LayerNormalization ([1, 128, 576]), so only this form uses it. CUDA's Skip kernels
  are another matter.
- ``"plain"``: standard ONNX only (Mul, ReduceMean, Sqrt, Reciprocal; LayerNormalization is
  standard), for runtimes without ORT's contrib ops and to compare against.

The fused kernels compute in float32 for float16 inputs (``stash_type`` 1), which is what
``compute_dtype=float32`` asks. Inputs of another dtype (bfloat16, float64), mixed dtypes or
another compute dtype fall back to the plain form.
"""

from __future__ import annotations

import torch

from arcompile.errors import UnsupportedOpError
from arcompile.ir.graph import Node
from arcompile.runtimes.onnxruntime.context import LowerContext
from arcompile.runtimes.onnxruntime.registry import lowering

FUSED_DTYPES = (torch.float32, torch.float16)
META_KEY = "onnxruntime.norm_lowering"
FORMS = ("fused", "skip_kernels", "plain")


def _form(ctx: LowerContext, node: Node) -> str:
    form = ctx.graph.meta.get(META_KEY, "fused")
    if form not in FORMS:
        raise UnsupportedOpError(f"graph.meta['{META_KEY}'] is {form!r}; expected one of {FORMS}")
    x = node.inputs[0]
    kernel_ok = (x.dtype in FUSED_DTYPES and all(v.dtype == x.dtype for v in node.inputs)
                 and node.attrs.get("compute_dtype") in (None, torch.float32))
    return form if kernel_ok else "plain"


@lowering("arc.rms_norm")
def rms_norm(ctx: LowerContext, node: Node) -> str:
    x, weight = node.inputs
    if _form(ctx, node) == "plain":
        return _plain_rms(ctx, node, ctx.name(x))
    return _simplified(ctx, node, ctx.name(x))


@lowering("arc.layer_norm")
def layer_norm(ctx: LowerContext, node: Node) -> str:
    # LayerNormalization is standard ONNX (opset 17) and ORT's fused kernel: one form serves
    return _layer_norm(ctx, node, ctx.name(node.inputs[0]), node.inputs[1:])


@lowering("arc.skip_rms_norm")
def skip_rms_norm(ctx: LowerContext, node: Node) -> list[str]:
    x, skip, weight = node.inputs
    form = _form(ctx, node)
    if form == "skip_kernels" or (form == "fused" and _one_skip_kernel(node)):
        return _skip_kernel(ctx, node, "SkipSimplifiedLayerNormalization")
    s = ctx.op("Add", [ctx.name(x), ctx.name(skip)])
    return [_plain_rms(ctx, node, s) if form == "plain" else _simplified(ctx, node, s), s]


@lowering("arc.skip_layer_norm")
def skip_layer_norm(ctx: LowerContext, node: Node) -> list[str]:
    x, skip, *params = node.inputs
    if _form(ctx, node) == "skip_kernels":
        return _skip_kernel(ctx, node, "SkipLayerNormalization")
    s = ctx.op("Add", [ctx.name(x), ctx.name(skip)])
    return [_layer_norm(ctx, node, s, params), s]


def _one_skip_kernel(node: Node) -> bool:
    """The fused form's SkipSimplifiedLayerNormalization: float32 throughout, the residual
    and the block output of one shape (the kernel broadcasts no skip of another rank)."""
    x, skip, weight = node.inputs
    return (all(v.dtype == torch.float32 for v in node.inputs) and x.shape is not None
            and tuple(x.shape) == tuple(skip.shape or ()))


def _simplified(ctx: LowerContext, node: Node, x: str) -> str:
    weight = node.inputs[-1]
    return ctx.op("SimplifiedLayerNormalization", [x, ctx.name(weight)], axis=-1,
                  epsilon=float(node.attrs["eps"]), stash_type=1)


def _layer_norm(ctx: LowerContext, node: Node, x: str, params) -> str:
    return ctx.op("LayerNormalization", [x] + [ctx.name(v) for v in params], axis=-1,
                  epsilon=float(node.attrs["eps"]))


def _skip_kernel(ctx: LowerContext, node: Node, op_type: str) -> list[str]:
    # inputs: input, skip, gamma[, beta]; outputs: output, mean, inv_std_var,
    # input_skip_bias_sum. An empty name leaves mean and inv_std_var unproduced.
    y, _mean, _inv, s = ctx.op(op_type, [ctx.name(v) for v in node.inputs], outputs=4,
                               domain="com.microsoft", epsilon=float(node.attrs["eps"]))
    proto = ctx.nodes[-1]
    proto.output[1] = proto.output[2] = ""
    return [y, s]


def _plain_rms(ctx: LowerContext, node: Node, x: str) -> str:
    """weight * (h / sqrt(mean(h^2, -1) + eps)).to(x.dtype), h = x.to(compute_dtype)."""
    x_value, weight = node.inputs[0], node.inputs[-1]
    compute = node.attrs.get("compute_dtype") or x_value.dtype
    h = ctx.cast(x, x_value.dtype, compute)
    mean_sq = ctx.op("ReduceMean", [ctx.op("Mul", [h, h]), ctx.i64([-1])], keepdims=1)
    eps = ctx.const(float(node.attrs["eps"]), compute)
    inv = ctx.op("Reciprocal", [ctx.op("Sqrt", [ctx.op("Add", [mean_sq, eps])])])
    normed = ctx.cast(ctx.op("Mul", [h, inv]), compute, x_value.dtype)
    out_dtype = node.outputs[0].dtype
    return ctx.op("Mul", [ctx.cast(ctx.name(weight), weight.dtype, out_dtype),
                          ctx.cast(normed, x_value.dtype, out_dtype)])
