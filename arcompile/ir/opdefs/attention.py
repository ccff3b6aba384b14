"""Reference implementations of the arc.* attention ops.

``arc.attention(query_BHqLD, key_BHkvSD, value_BHkvSD) -> out_BHqLD``

    out = softmax(query @ key^T * scale + causal_bias) @ value

with each of the ``num_kv_heads`` key/value heads shared by ``num_heads / num_kv_heads``
consecutive query heads (grouped-query attention: the KV heads are taken as they are, never
repeated in the graph). ``causal`` is aligned bottom-right: query row i (of L) sees keys
``j <= i + (S - L)``, which is torch's top-left causal when L == S (no cache) and what a KV
cache needs when L < S. ``mask_kind`` only records the form the mask was written in
(``is_causal``, ``bool``, ``additive``); ``softmax_dtype`` the dtype the model ran softmax in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from arcompile.ir.ops import register


@register("arc.attention")
def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, num_heads: int,
              num_kv_heads: int, head_dim: int, scale: float, causal: bool = True,
              mask_kind: str = "is_causal", softmax_dtype: str = "float32") -> torch.Tensor:
    out_dtype = query.dtype
    work = getattr(torch, softmax_dtype)
    q, k, v = (t.to(work) for t in (query, key, value))
    mask = None
    if causal:
        length, source = q.shape[-2], k.shape[-2]
        mask = torch.ones(length, source, dtype=torch.bool).tril(source - length)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                         enable_gqa=num_heads != num_kv_heads)
    return out.to(out_dtype)
