"""Cached decoding: prefill the prompts, then one token per step, the cache fed back.

Drives a cached engine (``optimize``'s default): a step maps the new tokens ``[B, T]``,
``past_length`` (the P tokens already cached) and the per-layer pasts ``[B, Hkv, P, D]`` to
the logits of the new tokens (the prefill asks for the last row only: ``keep=1``) and the
presents ``[B, Hkv, P + T, D]``, which become the next step's pasts (numpy arrays with the
Concat-based lowering, which copies the cache every step; with ``runtime_cache: "inplace"``
the pasts are [B, Hkv, capacity, D] buffers the step writes into and returns as they are, see
``runtimes/onnxruntime/inplace_step.py``).

All rows of a batch share one ``past_length``, so the prompts here have equal length; the
engine runs one such group per prompt length. A row that stops (EOS) is dropped from the
batch and its cache; with ``drop_stopped=False`` (the in-place buffers, which cannot be
sliced without a copy) it keeps decoding, fed its own tokens, and its outputs are ignored (yielded as None).
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np

from arcompile.serve.decoding import Sampler, check_context, stop_set

# (tokens [B, T], past_length, pasts, keep) -> (logits [B, T or keep, V], presents)
Step = Callable[[np.ndarray, int, list[np.ndarray], int], tuple[np.ndarray, list[np.ndarray]]]


def cached_decode_steps(step: Step, empty_cache: Callable[[int, int], list[np.ndarray]],
                        rows: list[list[int]], max_new_tokens: int, sampler: Sampler,
                        eos_token_id: int | Sequence[int] | None = None,
                        max_context: int | None = None,
                        drop_stopped: bool = True) -> Iterator[list[int | None]]:
    """Yield, per step, the new token of every row (None for rows that already stopped).
    ``rows`` must all have the same length."""
    check_context(rows, max_new_tokens, max_context)
    if len({len(r) for r in rows}) != 1:
        raise ValueError("cached decoding needs prompts of equal length")
    stops = stop_set(eos_token_id)
    live = list(range(len(rows)))  # original row index of each batch row still decoding
    new = np.array(rows, dtype=np.int64)
    done, cache = 0, empty_cache(len(rows), len(rows[0]) + max_new_tokens)
    stopped: set[int] = set()  # original indices of rows past their EOS
    for _ in range(max_new_tokens):
        logits, cache = step(new, done, cache, 1)
        done += new.shape[1]
        out: list[int | None] = [None] * len(rows)
        tokens, keep = [], []
        for j, i in enumerate(live):
            if i in stopped:  # decoded on, ignored (drop_stopped=False)
                tokens.append(int(new[j, -1]))
                continue
            token = sampler(logits[j, -1])
            out[i] = token
            if token not in stops:
                keep.append(j)
            else:
                stopped.add(i)
            tokens.append(token)
        yield out
        if not keep:
            return
        if drop_stopped and len(keep) != len(live):  # drop stopped rows: batch and cache
            live = [live[j] for j in keep]
            cache = [c[keep] for c in cache]
            tokens = [tokens[j] for j in keep]
        new = np.array(tokens, dtype=np.int64)[:, None]
