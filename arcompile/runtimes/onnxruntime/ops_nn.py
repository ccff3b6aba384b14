"""Lowerings of network layers: matmuls (linear/addmm/mm/bmm/matmul), layer and RMS norms,
activations (gelu, silu), softmax and triangular masks (tril/triu).

``linear`` becomes MatMul against Transpose(weight) rather than a pre-transposed copy: the
weight is written to the data file once even when the embedding shares it (tied weights), and
ORT's constant folding removes the Transpose when graph optimizations are on.
"""

from __future__ import annotations

import torch

from arcompile.ir.graph import Node
from arcompile.runtimes.onnxruntime.context import LowerContext, rank
from arcompile.runtimes.onnxruntime.registry import lowering


@lowering("aten.linear")
def linear(ctx: LowerContext, node: Node) -> str:
    x, weight, bias = node.arg("input"), node.arg("weight"), node.arg("bias")
    weight_t = ctx.name(weight)  # (out, in) -> (in, out); a 1-D weight is a dot product
    if rank(weight) == 2:
        weight_t = ctx.op("Transpose", [weight_t], perm=[1, 0])
    out = ctx.op("MatMul", [ctx.name(x), weight_t])
    return ctx.op("Add", [out, ctx.name(bias)]) if bias is not None else out


@lowering("aten.addmm")
def addmm(ctx: LowerContext, node: Node) -> str:
    # addmm(self, mat1, mat2, beta, alpha) = beta * self + alpha * (mat1 @ mat2), Gemm exactly
    operands = [ctx.name(node.arg("mat1")), ctx.name(node.arg("mat2")), ctx.name(node.arg("self"))]
    return ctx.op("Gemm", operands, alpha=float(node.arg("alpha", 1)),
                  beta=float(node.arg("beta", 1)))


@lowering("aten.mm", "aten.bmm", "aten.matmul")
def matmul(ctx: LowerContext, node: Node) -> str:
    other = node.arg("mat2", node.arg("other"))
    return ctx.op("MatMul", [ctx.name(node.arg("self")), ctx.name(other)])


def _norm_params(ctx: LowerContext, node: Node, shape: list, with_bias: bool) -> list[str]:
    """Scale (and bias) inputs; LayerNormalization requires a scale, so None becomes ones."""
    dtype = node.outputs[0].dtype
    weight = node.arg("weight")
    names = [ctx.name(weight) if weight is not None else ctx.const(torch.ones(shape), dtype)]
    if with_bias and node.arg("bias") is not None:
        names.append(ctx.name(node.arg("bias")))
    return names


@lowering("aten.layer_norm", "aten.native_layer_norm")
def layer_norm(ctx: LowerContext, node: Node):
    x = node.arg("input")
    shape = list(node.arg("normalized_shape"))
    eps = float(node.arg("eps", 1e-5))
    inputs = [ctx.name(x)] + _norm_params(ctx, node, shape, with_bias=True)
    axis = rank(x) - len(shape)
    if node.op == "aten.layer_norm":
        return ctx.op("LayerNormalization", inputs, axis=axis, epsilon=eps)
    # native_layer_norm also returns the mean and 1/std, with the normalized dims kept as 1s,
    # which is the shape LayerNormalization gives them too; ask for them only when used.
    if not any(ctx.graph.has_uses(v) for v in node.outputs[1:]):
        return [ctx.op("LayerNormalization", inputs, axis=axis, epsilon=eps), None, None]
    return ctx.op("LayerNormalization", inputs, outputs=3, axis=axis, epsilon=eps)


@lowering("aten.rms_norm")
def rms_norm(ctx: LowerContext, node: Node) -> str:
    # y = x / sqrt(mean(x^2 over the normalized dims) + eps) * weight
    x = node.arg("input")
    dtype = node.output.dtype
    shape = list(node.arg("normalized_shape"))
    eps = node.arg("eps")
    eps = torch.finfo(dtype).eps if eps is None else eps
    name = ctx.name(x)
    axes = ctx.i64(range(rank(x) - len(shape), rank(x)))
    mean_sq = ctx.op("ReduceMean", [ctx.op("Mul", [name, name]), axes], keepdims=1)
    inv = ctx.op("Reciprocal", [ctx.op("Sqrt", [ctx.op("Add", [mean_sq, ctx.const(eps, dtype)])])])
    out = ctx.op("Mul", [name, inv])
    weight = node.arg("weight")
    return ctx.op("Mul", [out, ctx.name(weight)]) if weight is not None else out


@lowering("aten.softmax.int", "aten._softmax", "aten.log_softmax.int", "aten._log_softmax",
          "aten._safe_softmax")
def softmax(ctx: LowerContext, node: Node) -> str:
    x = node.arg("self")
    # softmax(x, dim, dtype) computes in dtype; _softmax's half_to_float gives the output's
    name = ctx.tensor(x, node.output.dtype)
    axis = node.arg("dim") % max(rank(x), 1)
    onnx_op = "LogSoftmax" if "log_softmax" in node.op else "Softmax"
    out = ctx.op(onnx_op, [name], axis=axis)
    if node.op == "aten._safe_softmax":  # rows masked entirely give 0, not NaN
        dead = ctx.op("IsNaN", [out])
        out = ctx.op("Where", [dead, ctx.const(0.0, node.output.dtype), out])
    return out


@lowering("aten.gelu")
def gelu(ctx: LowerContext, node: Node) -> str:
    # opset 20 Gelu has both forms: exact (erf) and torch's tanh approximation
    approximate = node.arg("approximate", "none")
    return ctx.op("Gelu", [ctx.name(node.arg("self"))], approximate=approximate)


@lowering("aten.silu")
def silu(ctx: LowerContext, node: Node) -> str:
    x = ctx.name(node.arg("self"))
    return ctx.op("Mul", [x, ctx.op("Sigmoid", [x])])


@lowering("aten.tril", "aten.triu")
def tril(ctx: LowerContext, node: Node) -> str:
    x = node.arg("self")
    k = ctx.const(int(node.arg("diagonal", 0)), torch.int64)
    upper = int(node.op == "aten.triu")
    if x.dtype == torch.bool:  # ORT's Trilu takes no bools
        as_int = ctx.cast(ctx.name(x), torch.bool, torch.int64)
        return ctx.cast(ctx.op("Trilu", [as_int, k], upper=upper), torch.int64, torch.bool)
    return ctx.op("Trilu", [ctx.name(x), k], upper=upper)
