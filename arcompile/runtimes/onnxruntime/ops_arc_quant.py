"""Lowering of the weight-quantized linear (arc.matmul_nbits, ``passes/quantize_weights.py``)
to ONNX Runtime's com.microsoft MatMulNBits.

    arc.matmul_nbits(x, packed, scales[, zero_points][, bias])
        -> MatMulNBits(A=x, B=packed, scales, zero_points or "", g_idx "", bias)
           K, N, bits, block_size, accuracy_level as the IR op has them

The packed codes, scales and zero points are IR constants (uint8 / float tensors), written to
the data file like every other weight. The IR stores them exactly as the kernel reads them.

What ORT 1.32's CPU MatMulNBits accepts, probed here with one-node models (K=576, N=96/97,
optimizations off and on, against numpy):
- bits 2, 4 and 8 (2-bit only with block_size <= 256);
- block_size a power of two >= 16 only (16 ... 1024 tried): 576, 96 or 48 are refused at
  session creation. So per-channel int8 is block_size >= K (K zero-padded to the block),
  exact as the IR op defines it; K itself is never a block size unless it is a power of two;
- scales as [N * n_blocks] or [N, n_blocks] (same numbers);
- zero points as uint8 packed per row, [N, ceil(n_blocks * bits / 8)]: accepted for 4 and 8
  bits. The flat packing [ceil(N * n_blocks * bits / 8)] is refused for 4 bits when n_blocks
  is odd (it only coincides with the per-row form otherwise). Float zero points [N, n_blocks]
  work for 4 bits but take a slow path (dequantizing per call: 1 ms against 41 us for
  576 -> 3072, 20x fp32) and are refused for 8 bits. Without zero points: 2^(bits - 1);
- A of any rank (1-D, [B, T, K], 4-D), so no reshape around it; bias at input 5 works;
- accuracy_level 0-3: float activations, exact to 5e-7 relative. 4: A is quantized to int8
  per block (max|a| / 127, ties to even) — ~7e-3 relative off the float product, matched by
  the reference within 5e-7. Speed (decode, M=1, 2 threads; fp32 MatMul in brackets):
  [576 -> 3072] int4 g64: 67 us at level 0, 22 us at level 4 (fp32 71 us); int8 g128:
  2,800 us at level 0 (the CPU kernel dequantizes per call), 26 us at level 4. LM head
  [576 -> 49152]: int4 g64 1.35 ms / 0.57 ms, int8 g128 123 ms / 0.96 ms (fp32 7.4 ms).
"""

from __future__ import annotations

from arcompile.ir.graph import Node
from arcompile.runtimes.onnxruntime.context import LowerContext
from arcompile.runtimes.onnxruntime.registry import lowering


@lowering("arc.matmul_nbits")
def matmul_nbits(ctx: LowerContext, node: Node) -> str:
    # y = x @ ((code - zero) * scale)^T + bias, blocks of block_size along K
    x, packed, scales, *rest = node.inputs
    it = iter(rest)
    zero_points = next(it) if node.attrs.get("has_zero_points") else None
    bias = next(it) if node.attrs.get("has_bias") else None
    inputs = [ctx.name(x), ctx.name(packed), ctx.name(scales)]
    if zero_points is not None or bias is not None:
        inputs.append(ctx.name(zero_points) if zero_points is not None else "")
    if bias is not None:
        inputs += ["", ctx.name(bias)]  # input 4 is the deprecated g_idx
    return ctx.op("MatMulNBits", inputs, domain="com.microsoft", K=node.attrs["K"],
                  N=node.attrs["N"], bits=node.attrs["bits"],
                  block_size=node.attrs["block_size"],
                  accuracy_level=node.attrs.get("accuracy_level", 0))
