"""Reference implementation of ``arc.rope``, the rotary position embedding.

    arc.rope(x, cos, sin, *position_inputs; rotary_dim, interleaved, position_source, ...)

    r   = x[..., :rotary_dim]                                     # the rotated part
    rot = cat(-r[..., d/2:], r[..., :d/2])          (rotate-half: LLaMA, NeoX)   or
          stack(-r[..., 1::2], r[..., ::2], -1).flatten(-2)  (interleaved: GPT-J)
    out = cat(r * cos + rot * sin, x[..., rotary_dim:])       # pass-through part unchanged

``cos`` and ``sin`` are the tensors the model multiplied with, already broadcastable to
``r`` (head dim unsqueezed; halves duplicated for rotate-half, repeat_interleave'd for
interleaved). The inputs after them (``position_ids`` and ``inv_freq``, or ``position_ids``
and the ``cos_table``/``sin_table`` caches) only record how cos/sin were computed, as
``position_source`` says; they do not enter the formula. The arithmetic is in the model's
own order, so the fused op gives the very same numbers as the traced ops.
"""

from __future__ import annotations

import torch

from arcompile.ir.ops import register


def rotate(x_rot: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """The rotated partner of each pair: (x0, x1) -> (-x1, x0)."""
    if interleaved:
        return torch.stack((-x_rot[..., 1::2], x_rot[..., ::2]), dim=-1).flatten(-2)
    half = x_rot.shape[-1] // 2
    return torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)


@register("arc.rope")
def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *position_inputs: torch.Tensor,
         rotary_dim: int, interleaved: bool = False, position_source: str = "unproven",
         attention_scaling: float = 1.0) -> torch.Tensor:
    del position_inputs, position_source, attention_scaling  # provenance only
    x_rot = x[..., :rotary_dim]
    out = x_rot * cos + rotate(x_rot, interleaved) * sin
    if rotary_dim < x.shape[-1]:
        out = torch.cat((out, x[..., rotary_dim:]), dim=-1)
    return out
