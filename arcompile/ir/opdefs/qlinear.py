"""Reference implementation of the statically quantized linear ``arc.qlinear`` (W8A8, made
by ``passes/quantize_w8a8.py``).

``arc.qlinear(x, weight_q_KN, weight_scale_N[, outlier_channels_C, outlier_weight_CN][, bias_N];
x_scale, x_zero_point, has_outliers, has_bias)``::

    x_q = clamp(round(x / x_scale) + x_zero_point, -128, 127)     # int8, ties to even
    y   = ((x_q - x_zero_point) * x_scale) @ (weight_q_KN * weight_scale_N[None, :])
          (+ x[..., outlier_channels_C] @ outlier_weight_CN)     # has_outliers
          (+ bias)

With ``has_outliers`` a few input channels, fixed at calibration (``outlier_channels_C``
int64 ``[C]``), skip the int8 product (their rows of ``weight_q_KN`` are zero, so whatever
their clipped codes are adds nothing) and run in float against ``outlier_weight_CN``: the
channels whose calibrated range is far beyond the rest (LLaMA-style "massive activations"
at a sequence's first token) would otherwise set ``x_scale`` for every channel.

``x_scale`` and ``x_zero_point`` are attributes, fixed when the graph was calibrated: no
statistic of ``x`` is taken at run time. ``weight_q_KN`` is int8 ``[K, N]`` (the layout
ONNX MatMul reads, so the backend dequantizes it per column ``n``), symmetric (no zero
point; ``quantize_w8a8`` writes codes -63..63, which any int8 code range here allows),
``weight_scale_N`` float ``[N]``, ``bias`` ``[N]``. This is
exactly what QuantizeLinear / DequantizeLinear / MatMul compute in ONNX (the lowering,
``runtimes/onnxruntime/ops_arc_qdq.py``); a backend that runs the product in integers gets
the same numbers up to float rounding of the final scaling.
"""

from __future__ import annotations

import torch

from arcompile.ir.ops import register


def fake_quantize(x: torch.Tensor, scale: float, zero_point: int = 0) -> torch.Tensor:
    """``(clamp(round(x / scale) + zero_point, -128, 127) - zero_point) * scale`` in x's
    dtype: ONNX QuantizeLinear to int8 then DequantizeLinear."""
    s = torch.tensor(scale, dtype=x.dtype)
    q = torch.clamp(torch.round(x / s) + zero_point, -128, 127)
    return (q - zero_point) * s


@register("arc.qlinear")
def qlinear(x, weight_q_KN, weight_scale_N, *rest, x_scale: float, x_zero_point: int = 0,
            has_outliers: bool = False, has_bias: bool = False):
    weight = weight_q_KN.to(x.dtype) * weight_scale_N.to(x.dtype)
    y = fake_quantize(x, x_scale, x_zero_point) @ weight
    it = iter(rest)
    if has_outliers:
        channels_C, weight_CN = next(it), next(it)
        y = y + x.index_select(-1, channels_C) @ weight_CN.to(x.dtype)
    return y + next(it) if has_bias else y
