"""Reference implementations of the weight-quantized linear ``arc.matmul_nbits`` and of the
embedding lookup in such a table, ``arc.gather_nbits``.

``arc.matmul_nbits(x, packed_weight, scales[, zero_points][, block_offsets][, bias], K, N, bits,
block_size, has_zero_points, has_block_offsets, has_bias, accuracy_level)``::

    y[..., N] = x[..., K] @ dequant(W)^T (+ bias)
    dequant(W)[n, k] = (code[n, k] - zero[n, k // block_size]) * scale[n, k // block_size]
                       (+ block_offsets[k // block_size, n])

With ``has_block_offsets`` (the float-minimum form, llama.cpp's Q4_1: code * d + m per block)
the offsets are applied as their own product, which is how the backend runs them::

    y = x @ ((code - zero) * scale)^T + bias + block_sums(x) @ block_offsets
    block_sums(x)[..., b] = sum of x[..., b * block_size : (b + 1) * block_size] (zero-padded)

The weight is stored as ONNX Runtime's MatMulNBits stores it (``arcompile.ir.quant_math``):
``packed_weight`` uint8 ``[N, n_blocks, block_size * bits / 8]`` with
``n_blocks = ceil(K / block_size)`` (K zero-padded), ``scales`` float ``[N * n_blocks]``,
``zero_points`` (when ``has_zero_points``) uint8 ``[N, ceil(n_blocks * bits / 8)]`` packed like
the codes; without them the zero point is ``2^(bits - 1)`` (symmetric). ``bias`` ``[N]``.

``accuracy_level`` says what the backend may do to ``x``: ``0`` computes with ``x`` as it is;
``4`` quantizes ``x`` to int8 per block of ``block_size`` along K (symmetric, max|x| / 127),
which is how ORT's CPU kernel reaches integer speed. The reference does the same rounding
(``quant_math.quantize_activations_int8``), so the interpreter and ORT agree at either level.
The block-offset product reads ``x`` unrounded at either level (it is a float MatMul there).

``arc.gather_nbits(indices, packed_weight, scales[, zero_points], K, N, bits, block_size,
has_zero_points)`` is ``dequant(W)[indices]`` ([*indices.shape, K]) for a table stored the
same way: the token embedding reading its tied LM head's quantized weights.
"""

from __future__ import annotations

import torch

from arcompile.ir.ops import register
from arcompile.ir.quant_math import block_sums, dequantize, quantize_activations_int8

ACCURACY_LEVELS = (0, 4)  # 0: float activations; 4: activations rounded to int8 per block


@register("arc.matmul_nbits")
def matmul_nbits(x, packed_weight, scales, *rest, K: int, N: int, bits: int, block_size: int,
                 has_zero_points: bool = False, has_block_offsets: bool = False,
                 has_bias: bool = False, accuracy_level: int = 0):
    it = iter(rest)
    zero_points = next(it) if has_zero_points else None
    offsets_bN = next(it) if has_block_offsets else None
    bias = next(it) if has_bias else None
    weight_NK = dequantize(packed_weight, scales, zero_points, K, bits, block_size, x.dtype)
    if accuracy_level == 4:
        x_rounded = quantize_activations_int8(x, block_size)
    elif accuracy_level == 0:
        x_rounded = x
    else:
        raise ValueError(f"accuracy_level must be one of {ACCURACY_LEVELS}, got {accuracy_level}")
    y = torch.nn.functional.linear(x_rounded, weight_NK, bias)
    if offsets_bN is not None:
        y = y + block_sums(x, block_size) @ offsets_bN.to(x.dtype)
    return y


@register("arc.gather_nbits")
def gather_nbits(indices, packed_weight, scales, *rest, K: int, N: int, bits: int,
                 block_size: int, has_zero_points: bool = False):

    zero_points = rest[0] if has_zero_points else None
    rows = indices.reshape(-1).long()
    n_blocks = packed_weight.shape[1]
    table = dequantize(packed_weight[rows], scales.reshape(N, n_blocks)[rows].reshape(-1),
                       None if zero_points is None else zero_points[rows], K, bits, block_size,
                       scales.dtype)
    return table.reshape(*indices.shape, K)
