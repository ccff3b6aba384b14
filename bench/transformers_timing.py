"""Timing transformers' own ``generate`` step by step, for bench/suite.py and
bench/torch_compile_decode.py.

``generate`` hands each new token to its streamer as soon as it is chosen (on the CPU there
is no deferred stop check), so a streamer that stamps the clock sees the same events as the
other systems' token iterators: the first stamp ends the prefill, the gaps after it are the
decode steps. ``min_new_tokens`` keeps an end-of-text token from cutting a run short.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from peer_protocol import summarize
from transformers.generation.streamers import BaseStreamer


class StampStreamer(BaseStreamer):
    """Records when each new token arrives; the first ``put`` is the prompt, not a token."""

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self.tokens: list[int] = []
        self._seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        now = time.perf_counter()
        if not self._seen_prompt:
            self._seen_prompt = True
            return
        self.stamps.append(now)
        self.tokens.append(int(value.reshape(-1)[0]))

    def end(self) -> None:
        pass


def time_generate(model, ids: list[int], new: int, **options: Any) -> dict[str, Any]:
    """Greedy ``generate`` of ``new`` tokens after ``ids``, timed per token (see summarize)."""
    x = torch.tensor([ids])
    streamer = StampStreamer()
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new,
                       min_new_tokens=new, do_sample=False, pad_token_id=0, streamer=streamer,
                       **options)
    return summarize(t0, streamer.stamps, streamer.tokens)
