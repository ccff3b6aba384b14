"""Lowering of the statically quantized linear (arc.qlinear, ``passes/quantize_w8a8.py``) to
standard ONNX Q/DQ, the form TensorRT reads and ONNX Runtime fuses into integer kernels:

    arc.qlinear(x, weight_q_KN, weight_scale_N[, channels_C, weight_CN][, bias]; x_scale, ...)
        x_q = QuantizeLinear(x, x_scale, x_zero_point)        # int8, scale a constant scalar
        y   = MatMul(DequantizeLinear(x_q, x_scale, x_zero_point),
                     DequantizeLinear(weight_q_KN, weight_scale_N, axis=1))
              (+ MatMul(Gather(x, channels_C, axis=-1), weight_CN))    # float outlier channels
              (+ Add bias)

Activations are int8 with zero point 0 and weights int8 symmetric per output channel (no
zero-point input), which is TensorRT's explicit-quantization form. With its graph
optimizations on, ORT 1.32 on CPU (x86, AVX-512 VNNI) replaces the
DQ -> MatMul of a float-output linear by ``MatMulIntegerToFloat`` (int8 x int8, the scales
applied to the int32 sums), after a static ``QuantizeLinear``: no DynamicQuantizeLinear runs.
Where a linear's output feeds another QuantizeLinear directly (a chain of linears), ORT makes
it a ``QLinearMatMul``. Measured on this machine with one-node chains (576 x 576, 2 threads):
4.5 us per linear for one token against 15.9 us for the fp32 MatMul; int8 and uint8
activations ran alike, so the TensorRT-ready int8 form costs nothing here (ORT converts
the int8 activation pairs to uint8 itself, ``qdq_s8_to_u8``). One exception seen: a linear
whose output goes through Relu into the next QuantizeLinear stays DQ -> MatMul in float
(a Sigmoid, Tanh or anything else there does not), so a ReLU MLP (OPT's fc1) is not run in
integers by ORT's CPU fusions.

The weight codes stay within -63..63 (``quantize_w8a8.WEIGHT_QMAX``): without VNNI (AVX2,
AVX-512F alone) ORT's u8 x s8 kernel adds product pairs in int16 and saturates on full-range
int8 weights; seen on an AVX2 EPYC as a 24% error on a 576-wide layer, which
``optimize``'s own lowering check, run with ORT's optimizations off, did not see.
"""

from __future__ import annotations

import torch

from arcompile.ir.graph import Node
from arcompile.runtimes.onnxruntime.context import LowerContext
from arcompile.runtimes.onnxruntime.registry import lowering


@lowering("arc.qlinear")
def qlinear(ctx: LowerContext, node: Node) -> str:
    # y = DQ(Q(x)) @ DQ(W_q) (+ b)
    x, weight_q, weight_scale, *rest = node.inputs
    scale = ctx.const(float(node.attrs["x_scale"]), torch.float32)
    zero = ctx.const(int(node.attrs.get("x_zero_point", 0)), torch.int8)
    x_q = ctx.op("QuantizeLinear", [ctx.name(x), scale, zero])
    x_dq = ctx.op("DequantizeLinear", [x_q, scale, zero])
    w_dq = ctx.op("DequantizeLinear", [ctx.name(weight_q), ctx.name(weight_scale)], axis=1)
    y = ctx.op("MatMul", [x_dq, w_dq])
    it = iter(rest)
    if node.attrs.get("has_outliers"):  # + x[..., C] @ W_CN, in float
        channels, weight_CN = next(it), next(it)
        picked = ctx.op("Gather", [ctx.name(x), ctx.name(channels)], axis=-1)
        y = ctx.op("Add", [y, ctx.op("MatMul", [picked, ctx.name(weight_CN)])])
    return ctx.op("Add", [y, ctx.name(next(it))]) if node.attrs.get("has_bias") else y
