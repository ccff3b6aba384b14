"""Reference implementation of ``arc.attention_cached``, attention against a KV cache.

``arc.attention_cached(query_BHqLD, key_BHkvLD, value_BHkvLD, past_key_BHkvPD,
past_value_BHkvPD) -> (out_BHqLD, present_key_BHkvSD, present_value_BHkvSD)``

    present_key   = cat(past_key, key, dim=2)          # S = P + L
    present_value = cat(past_value, value, dim=2)
    out = arc.attention(query, present_key, present_value)   # causal bottom-right: query i
                                                              # sees keys j <= i + P

Attributes are those of ``arc.attention`` (made by ``passes/insert_kv_cache.py`` from it).
The concatenation is the reference semantics only; a runtime may keep a preallocated buffer
and write the new rows in place.

``arc.attention_cached_packed`` (``passes/pack_attention.py``) is the same attention taken
on the [B, L, n*D] projections, rotary folded in; see the comment above it below. With
``kv_quant`` (``passes/quantize_kv_cache.py``) its cache is int8.
"""

from __future__ import annotations

import torch

from arcompile.ir.opdefs.attention import attention
from arcompile.ir.opdefs.rope import rope
from arcompile.ir.ops import register


@register("arc.attention_cached")
def attention_cached(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     past_key: torch.Tensor, past_value: torch.Tensor, **attrs) -> list[torch.Tensor]:
    present_key = torch.cat((past_key, key), dim=2)
    present_value = torch.cat((past_value, value), dim=2)
    out = attention(query, present_key, present_value, **attrs)
    return [out, present_key, present_value]


# arc.attention_cached_packed: the same attention, on the [B, T, n*D] tensors the projections
# produce (``passes/pack_attention.py``), rotary folded in:
#
#   inputs  packed:    (qkv_BTX, past_key, past_value[, past_length, cos_cache, sin_cache])
#           separate:  (q_BTX, k_BTX, v_BTX, past_key, past_value[, ...the same])
#           X = (H + 2 Hkv) * D packed in q, k, v order; the rotary inputs when rotary_dim > 0
#   q, k, v = split(qkv, [H*D, Hkv*D, Hkv*D], -1)                         (packed)
#   q_BHqTD = q.view(B, T, H, D).transpose(1, 2); k, v likewise with Hkv
#   pos     = past_length + arange(T)                   # the new tokens' absolute positions
#   cos     = cos_cache[pos] (T, rot/2), halves duplicated (rotate-half) or each repeated
#             twice (interleaved); sin likewise
#   q, k    = arc.rope(q, cos, sin; rotary_dim, interleaved)    (when rotary_dim > 0)
#   out, present_key, present_value = arc.attention_cached(q, k, v, past_key, past_value)
#   out_BTX = out.transpose(1, 2).reshape(B, T, H*D)
#
# With kv_quant="per_channel" (``passes/quantize_kv_cache.py``) two more inputs come last,
# k_scale and v_scale, float [1, Hkv, 1, D], and past_key/past_value and the presents are int8
# codes. What ONNX Runtime 1.32's CPU GroupQueryAttention computes (k_quant_type PER_CHANNEL,
# kv_cache_bit_width 8; tests/test_quantize_kv_cache.py holds the op to it on random tensors:
# codes bit-exact, ties to even, -128 kept):
#   key_q   = clamp(round_half_even(key / k_scale), -128, 127).to(int8)   # key after rotary
#   present_key = cat(past_key, key_q, dim=2); present_value likewise with v_scale
#   out = arc.attention(query, present_key * k_scale, present_value * v_scale)
# i.e. the new tokens attend to their own keys and values dequantized too, so a prompt run
# at once and the same tokens decoded one by one see the same cache.
KV_QUANTS = ("per_channel",)
KV_QMIN, KV_QMAX = -128, 127


def quantize_kv(x_BHkvTD: torch.Tensor, scale_1Hkv1D: torch.Tensor) -> torch.Tensor:
    """int8 codes of ``x`` as the cache stores them (round half to even, saturating)."""
    return torch.round(x_BHkvTD / scale_1Hkv1D).clamp(KV_QMIN, KV_QMAX).to(torch.int8)


@register("arc.attention_cached_packed")
def attention_cached_packed(*inputs: torch.Tensor, num_heads: int, num_kv_heads: int,
                            head_dim: int, packed: bool, rotary_dim: int = 0,
                            rotary_interleaved: bool = False, kv_quant: str | None = None,
                            **attrs) -> list[torch.Tensor]:
    scales = None
    if kv_quant is not None:
        if kv_quant not in KV_QUANTS:
            raise ValueError(f"kv_quant {kv_quant!r} is not one of {', '.join(KV_QUANTS)}")
        *inputs, k_scale, v_scale = inputs
        scales = (k_scale.float(), v_scale.float())
    if packed:
        qkv, *rest = inputs
        q, k, v = torch.split(qkv, [num_heads * head_dim, num_kv_heads * head_dim,
                                    num_kv_heads * head_dim], dim=-1)
    else:
        q, k, v, *rest = inputs
    past_key, past_value, *rotary = rest
    batch, length = q.shape[0], q.shape[1]

    def heads(x: torch.Tensor, n: int) -> torch.Tensor:  # (B, T, n*D) -> (B, n, T, D)
        return x.reshape(batch, length, n, head_dim).transpose(1, 2)

    query, key, value = heads(q, num_heads), heads(k, num_kv_heads), heads(v, num_kv_heads)
    if rotary_dim:
        past_length, cos_cache, sin_cache = rotary
        pos = past_length.reshape(()).to(torch.int64) + torch.arange(length)
        cos, sin = (_rotary_rows(c[pos], rotary_interleaved) for c in (cos_cache, sin_cache))
        query, key = (rope(x, cos.to(x.dtype), sin.to(x.dtype), rotary_dim=rotary_dim,
                           interleaved=rotary_interleaved) for x in (query, key))
    if scales is not None:  # int8 cache: store codes, attend to them dequantized
        k_scale, v_scale = scales
        present_key = torch.cat((past_key, quantize_kv(key, k_scale)), dim=2)
        present_value = torch.cat((past_value, quantize_kv(value, v_scale)), dim=2)
        out = attention(query, present_key.to(query.dtype) * k_scale,
                        present_value.to(query.dtype) * v_scale, num_heads=num_heads,
                        num_kv_heads=num_kv_heads, head_dim=head_dim, **attrs)
    else:
        out, present_key, present_value = attention_cached(
            query, key, value, past_key, past_value, num_heads=num_heads,
            num_kv_heads=num_kv_heads, head_dim=head_dim, **attrs)
    return [out.transpose(1, 2).reshape(batch, length, num_heads * head_dim),
            present_key, present_value]


def _rotary_rows(half: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """(T, rot/2) cache rows -> (1, 1, T, rot), as the model multiplied them."""
    full = half.repeat_interleave(2, dim=-1) if interleaved else torch.cat((half, half), dim=-1)
    return full[None, None]
