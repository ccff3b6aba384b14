"""Reference implementations of the arc.* norm ops (made by ``passes/fuse_norms.py``).

All normalize over the last dim. Inputs are tensors; ``weight`` / ``bias`` may be absent only
where noted (the pass passes a ones weight then, so the inputs stay uniform).

    arc.rms_norm(x, weight; eps, compute_dtype=None)
        h = x.to(compute_dtype)                      # no cast when compute_dtype is None
        y = weight * (h * rsqrt(mean(h^2, -1) + eps)).to(x.dtype)
    arc.layer_norm(x, weight, bias; eps)
        y = (x - mean(x, -1)) / sqrt(var(x, -1, unbiased=False) + eps) * weight + bias
    arc.skip_rms_norm(x, skip, weight; eps, compute_dtype=None)     -> (y, s)
    arc.skip_layer_norm(x, skip, weight, bias; eps)                 -> (y, s)
        s = x + skip; y = norm(s). ``s`` is an output because it is the residual stream the
        next block adds to.
"""

from __future__ import annotations

import torch

from arcompile.ir.ops import register


@register("arc.rms_norm")
def rms_norm(x: torch.Tensor, weight: torch.Tensor, *, eps: float,
             compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    h = x.to(compute_dtype) if compute_dtype is not None else x
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


@register("arc.layer_norm")
def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
               eps: float) -> torch.Tensor:
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps)


@register("arc.skip_rms_norm")
def skip_rms_norm(x: torch.Tensor, skip: torch.Tensor, weight: torch.Tensor, *, eps: float,
                  compute_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    s = x + skip
    return [rms_norm(s, weight, eps=eps, compute_dtype=compute_dtype), s]


@register("arc.skip_layer_norm")
def skip_layer_norm(x: torch.Tensor, skip: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None = None, *, eps: float) -> list[torch.Tensor]:
    s = x + skip
    return [layer_norm(s, weight, bias, eps=eps), s]
