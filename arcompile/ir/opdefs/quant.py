"""Reference implementation of the weight-quantized linear ``arc.matmul_nbits``.

``arc.matmul_nbits(x, packed_weight, scales[, zero_points][, bias], K, N, bits, block_size,
has_zero_points, has_bias, accuracy_level)``::

    y[..., N] = x[..., K] @ dequant(W)^T (+ bias)
    dequant(W)[n, k] = (code[n, k] - zero[n, k // block_size]) * scale[n, k // block_size]

The weight is stored as ONNX Runtime's MatMulNBits stores it (``arcompile.passes.quant_math``):
``packed_weight`` uint8 ``[N, n_blocks, block_size * bits / 8]`` with
``n_blocks = ceil(K / block_size)`` (K zero-padded), ``scales`` float ``[N * n_blocks]``,
``zero_points`` (when ``has_zero_points``) uint8 ``[N, ceil(n_blocks * bits / 8)]`` packed like
the codes; without them the zero point is ``2^(bits - 1)`` (symmetric). ``bias`` ``[N]``.

``accuracy_level`` says what the backend may do to ``x``: ``0`` computes with ``x`` as it is;
``4`` quantizes ``x`` to int8 per block of ``block_size`` along K (symmetric, max|x| / 127),
which is how ORT's CPU kernel reaches integer speed. The reference does the same rounding
(``quant_math.quantize_activations_int8``), so the interpreter and ORT agree at either level.
"""

from __future__ import annotations

import torch

from arcompile.ir.ops import register

ACCURACY_LEVELS = (0, 4)  # 0: float activations; 4: activations rounded to int8 per block


@register("arc.matmul_nbits")
def matmul_nbits(x, packed_weight, scales, *rest, K: int, N: int, bits: int, block_size: int,
                 has_zero_points: bool = False, has_bias: bool = False,
                 accuracy_level: int = 0):
    # imported here: arcompile.passes imports the whole pipeline, which must not run while
    # the op definitions are still loading
    from arcompile.passes.quant_math import dequantize, quantize_activations_int8

    it = iter(rest)
    zero_points = next(it) if has_zero_points else None
    bias = next(it) if has_bias else None
    weight_NK = dequantize(packed_weight, scales, zero_points, K, bits, block_size, x.dtype)
    if accuracy_level == 4:
        x = quantize_activations_int8(x, block_size)
    elif accuracy_level != 0:
        raise ValueError(f"accuracy_level must be one of {ACCURACY_LEVELS}, got {accuracy_level}")
    return torch.nn.functional.linear(x, weight_NK, bias)
