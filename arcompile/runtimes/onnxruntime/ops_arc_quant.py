"""Lowering of the weight-quantized linear (arc.matmul_nbits, ``passes/quantize_weights.py``)
to ONNX Runtime's com.microsoft MatMulNBits, and of the lookup in such a table
(arc.gather_nbits: a token embedding tied to the quantized LM head) to GatherBlockQuantized.

    arc.matmul_nbits(x, packed, scales[, zero_points][, block_offsets][, bias])
        -> MatMulNBits(A=x, B=packed, scales, zero_points or "", g_idx "", bias)
           K, N, bits, block_size, accuracy_level as the IR op has them
           (+ MatMul(block_sums(x), block_offsets) with block offsets, see below)

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

Block offsets (the float-minimum form, Q4_1): float zero points would say it in one node but
take the slow path above (1.5-3.4 ms against 11-106 us per call at int4 g32), so the codes run
symmetric at MatMulNBits' fast path and the offsets as a float product of x's block sums:
``Add(MatMulNBits(x, ...), MatMul(ReduceSum(Reshape(x, [..., n_blocks, B]), -1), offsets_bN))``
with a ``Pad`` of x first when the blocks do not divide K. Measured on SmolLM2 (decode, 2
threads, idle machine): int4 g32 8.5 ms/token against 7.4 symmetric and 7.5 with integer zero
points (fp32 16.9), the extra ~1 ms about half the offsets' bytes (float [n_blocks, N], as big
as the scales) and half three more small nodes per linear. Block sums as ``MatMul(x, ones_KB)``
(a 0/1 [K, n_blocks] constant) were no faster in the engine and 0.4 ms slower over a chain of
SmolLM2's 120 linears; block sums from extra rows of the MatMulNBits itself (codes of 1) the
same as the Reshape/ReduceSum form, and they would round x at level 4.

GatherBlockQuantized reads the same bytes (probed on ORT 1.32, K=576, N=97, int4 g32 / g64,
symmetric and integer zero point: equal to the reference's rows): uint8 data ``[N, n_blocks *
blob]`` (the MatMulNBits codes reshaped), scales ``[N, n_blocks]``, zero points as MatMulNBits
packs them per row, ``gather_axis=0``, ``quantize_axis=1``. Its rows come back padded to whole
blocks (640 wide for K=576 in blocks of 128), so a Slice cuts them to K. The reshapes of the
shared initializers are constant-folded by ORT; the data file holds the table once.

Two forms of arc.matmul_nbits, chosen per graph with ``graph.meta[META_KEY]``:
``"matmul_nbits"`` (default, above) and ``"qdq"``: standard DequantizeLinear -> MatMul, the
form TensorRT reads (``ops_arc_quant_qdq``). arc.gather_nbits has no QDQ form.
"""

from __future__ import annotations

from arcompile.errors import UnsupportedOpError
from arcompile.ir.graph import Node
from arcompile.ir.quant_math import blocks_of
from arcompile.runtimes.onnxruntime.context import LowerContext
from arcompile.runtimes.onnxruntime.ops_arc_quant_qdq import (
    matmul_nbits_qdq,
    plus_block_offsets,
)
from arcompile.runtimes.onnxruntime.registry import lowering

META_KEY = "onnxruntime.weight_lowering"
FORMS = ("matmul_nbits", "qdq")


def weight_form(ctx: LowerContext) -> str:
    form = ctx.graph.meta.get(META_KEY, "matmul_nbits")
    if form not in FORMS:
        raise UnsupportedOpError(f"graph.meta['{META_KEY}'] is {form!r}; expected one of {FORMS}")
    return form


@lowering("arc.matmul_nbits")
def matmul_nbits(ctx: LowerContext, node: Node) -> str:
    # y = x @ ((code - zero) * scale)^T + bias, blocks of block_size along K
    if weight_form(ctx) == "qdq":
        return matmul_nbits_qdq(ctx, node)
    x, packed, scales, *rest = node.inputs
    it = iter(rest)
    zero_points = next(it) if node.attrs.get("has_zero_points") else None
    offsets_bN = next(it) if node.attrs.get("has_block_offsets") else None
    bias = next(it) if node.attrs.get("has_bias") else None
    inputs = [ctx.name(x), ctx.name(packed), ctx.name(scales)]
    if zero_points is not None or bias is not None:
        inputs.append(ctx.name(zero_points) if zero_points is not None else "")
    if bias is not None:
        inputs += ["", ctx.name(bias)]  # input 4 is the deprecated g_idx
    y = ctx.op("MatMulNBits", inputs, domain="com.microsoft", K=node.attrs["K"],
               N=node.attrs["N"], bits=node.attrs["bits"], block_size=node.attrs["block_size"],
               accuracy_level=node.attrs.get("accuracy_level", 0))
    return y if offsets_bN is None else plus_block_offsets(ctx, node, x, y, offsets_bN)


@lowering("arc.gather_nbits")
def gather_nbits(ctx: LowerContext, node: Node) -> str:
    # rows of ((code - zero) * scale), the table stored as for MatMulNBits

    if weight_form(ctx) == "qdq":
        raise UnsupportedOpError(
            f"{node.op} (from module '{node.module or '<top>'}'): a lookup in a quantized table "
            "has no QDQ form (GatherBlockQuantized is ONNX Runtime's own op); keep the "
            "embedding in float (--embedding fp32) for --weight-format qdq")
    indices, packed, scales, *rest = node.inputs
    K, N, block_size = node.attrs["K"], node.attrs["N"], node.attrs["block_size"]
    n_blocks = blocks_of(K, block_size)
    inputs = [ctx.op("Reshape", [ctx.name(packed), ctx.i64([N, -1])]), ctx.name(indices),
              ctx.op("Reshape", [ctx.name(scales), ctx.i64([N, n_blocks])])]
    if node.attrs.get("has_zero_points"):
        inputs.append(ctx.name(rest[0]))
    rows = ctx.op("GatherBlockQuantized", inputs, domain="com.microsoft", gather_axis=0,
                  quantize_axis=1, block_size=block_size, bits=node.attrs["bits"])
    if n_blocks * block_size == K:
        return rows
    return ctx.op("Slice", [rows, ctx.i64([0]), ctx.i64([K]), ctx.i64([-1])])
