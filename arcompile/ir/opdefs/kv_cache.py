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
"""

from __future__ import annotations

import torch

from arcompile.ir.opdefs.attention import attention
from arcompile.ir.ops import register


@register("arc.attention_cached")
def attention_cached(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     past_key: torch.Tensor, past_value: torch.Tensor, **attrs) -> list[torch.Tensor]:
    present_key = torch.cat((past_key, key), dim=2)
    present_value = torch.cat((past_value, value), dim=2)
    out = attention(query, present_key, present_value, **attrs)
    return [out, present_key, present_value]
