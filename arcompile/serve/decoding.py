"""Token-by-token decoding against any engine that maps tokens [B, T] to logits [B, T, V].

Batches of prompts with different lengths are right-padded: a causal model's logits at a
position never depend on the tokens after it, so each row reads its logits at its own last
position and the padding is never seen. Every step here recomputes the whole prefix; engines
optimized with ``kv_cache=True`` decode batches of equal-length prompts with the cache
(``kv_decoding.py``) and fall back to this loop for prompts of different lengths.

Sampling follows the usual order: temperature, then top-k, then top-p (nucleus) over what
is left, then a draw from a seeded numpy Generator (the same seed gives the same tokens).
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np

from arcompile.errors import DecodeError
from arcompile.serve import checks

Forward = Callable[[np.ndarray], np.ndarray]
PAD_ID = 0  # any id works: right padding is never attended to by real tokens


def as_batch(input_ids) -> tuple[list[list[int]], bool]:
    """Normalize list[int] / list[list[int]] / arrays to rows; also says if it was one row."""
    if isinstance(input_ids, np.ndarray) or hasattr(input_ids, "tolist"):
        input_ids = input_ids.tolist()
    if not isinstance(input_ids, (list, tuple)) or len(input_ids) == 0:
        raise DecodeError("input_ids must be a non-empty list of token ids or a list of such lists")
    single = not isinstance(input_ids[0], (list, tuple, np.ndarray))
    if not single and not all(isinstance(r, (list, tuple, np.ndarray)) for r in input_ids):
        raise DecodeError("input_ids must be a list of token ids or a list of such lists, "
                          "not a mix of both")
    rows = [list(input_ids)] if single else [list(r) for r in input_ids]
    for r in rows:
        if not r:
            raise DecodeError("every prompt needs at least one token")
        if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in r):
            raise DecodeError("token ids must be integers")
    return [[int(t) for t in r] for r in rows], single


def pad_right(rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.array([len(r) for r in rows])
    ids = np.full((len(rows), lengths.max()), PAD_ID, dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
    return ids, lengths


class Sampler:
    """Chooses the next token from a row of logits."""

    def __init__(self, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None):
        do_sample, temperature, top_k, top_p, seed = checks.sampling(do_sample, temperature,
                                                                     top_k, top_p, seed)
        self.do_sample, self.temperature, self.top_k, self.top_p = do_sample, temperature, top_k, top_p
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits: np.ndarray) -> int:
        if not self.do_sample:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / self.temperature
        if self.top_k and self.top_k < z.size:
            kth = np.partition(z, -self.top_k)[-self.top_k]
            z = np.where(z < kth, -np.inf, z)
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        if self.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cum = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cum, self.top_p) + 1)]
            mask = np.zeros_like(probs)
            mask[keep] = probs[keep]
            probs = mask / mask.sum()
        return int(self.rng.choice(probs.size, p=probs))


def check_context(rows: Sequence[Sequence[int]], max_new_tokens: int,
                  max_context: int | None) -> None:
    """DecodeError unless ``max_new_tokens`` is an int >= 0 and the longest prompt plus it
    fits the maximum context."""
    checks.new_tokens(max_new_tokens, rows, max_context)


def stop_set(eos_token_id: int | Sequence[int] | None) -> set[int]:
    return set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))


def decode_steps(forward: Forward, rows: list[list[int]], max_new_tokens: int, sampler: Sampler,
                 eos_token_id: int | Sequence[int] | None = None,
                 max_context: int | None = None) -> Iterator[list[int | None]]:
    """Yield, per step, the new token of every row (None for rows that already stopped)."""
    check_context(rows, max_new_tokens, max_context)
    stops = stop_set(eos_token_id)
    seqs = [list(r) for r in rows]
    done = [False] * len(rows)
    for _ in range(max_new_tokens):
        live = [i for i, d in enumerate(done) if not d]
        if not live:
            return
        ids, lengths = pad_right([seqs[i] for i in live])
        logits = forward(ids)
        step: list[int | None] = [None] * len(rows)
        for j, i in enumerate(live):
            token = sampler(logits[j, lengths[j] - 1])
            seqs[i].append(token)
            step[i] = token
            done[i] = token in stops
        yield step
