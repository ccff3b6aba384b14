"""Speculative decoding: draft tokens cheaply, verify them with the full model in one step.

Lossless for greedy decoding: every token emitted is the full model's argmax given everything
before it, so the output is plain greedy's (up to float rounding: the verifying step computes
several rows at once, whose sums may round differently from one row at a time).

One round, with the cache holding the full model's rows for the P tokens before ``last``::

    d_1 .. d_m = draft(context, m)                       # m <= k guesses of what follows
    g_0 .. g_m = argmax(full([last, d_1 .. d_m] at P))   # ONE step, logits_to_keep = m + 1
    a = the longest prefix with d_i == g_{i-1}           # accepted drafts
    emit d_1 .. d_a, g_a;  P += a + 1;  last = g_a

The verifying step wrote the full model's rows at P .. P + m; the rows of the a + 1 tokens
kept are right, and the rows after them (rejected drafts) are never read: the next round
writes over them (the in-place buffers), or they are cut off (the concat runtime, whose
presents are new arrays). So the cache stays the one plain decoding would have built.

Drafters (``draft(context, past_length, cache, m) -> list[int]``):

- ``self`` (self-speculative, as in Draft & Verify and LayerSkip): the same engine with its
  routed feed-forward blocks skipped (``passes/skip_ffn.py``) drafts one token per step from
  ``last``, writing its own rows at P .. P + m - 1, which the verifying step then overwrites.
  Drafting stops early when the draft's top probability falls below ``min_confidence``.
  An engine optimized with ``self_draft`` drafts with its own int4 (or int8) copy instead
  (``compiler/self_draft.py``, stored in the engine folder), the same way, unless ``draft_skip`` asks
  for the skipped-block graph.
- ``draft``: another engine of the same model and cache layout (its int4 build, say) drafts
  the same way, into the same buffers (its rows are overwritten by the verifying step too).
- ``ngram`` (prompt lookup, training-free): the last n tokens of the context (n = 3, 2, 1) are
  looked up earlier in the context, and the tokens that followed the most recent occurrence
  with ``m`` tokens after it (else the one with the most) are the draft. No model runs; it
  helps where the output repeats the prompt or itself.
- ``ngram+self`` / ``ngram+draft``: the n-gram lookup where it finds a continuation, the model
  drafter where it does not.

What pays depends on the costs: a round costs the drafter's steps plus one verifying step
(on SmolLM2 at 2 threads, 5 tokens at once cost ~1.3-1.45 single steps), and returns the
accepted drafts plus one. Skipping feed-forward blocks saves at most their share of a step
(about 60% of it, all 30 blocks), while SmolLM2's predictions move fast as blocks go (73% of
drafts accepted with 3 blocks skipped, 57% with 8, 20% with 15), so the skipped-block drafter
stays below plain greedy there (0.94x, 0.97x at best in its sweep,
bench/results/speculative.json). The self-draft (an int4 copy whose step costs ~0.35 of
fp32's; 1.58x, 99% accepted), the n-gram lookup (free drafts, 2.05x) and both together
(2.25x) are faster than plain greedy, as an int4 build of the same model passed as
``draft`` was in that file's earlier run (1.44x alone, 1.91x after the lookup; the JSON at
commit e1ef838). The two engines' ONNX Runtime sessions take turns, which pays only because their
thread pools stop spinning when a run ends (``runtimes/onnxruntime/session.py``).

Batch 1 and greedy only; ``Engine.generate(..., speculative=...)`` is the entry point.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from arcompile.serve.decoding import stop_set

# "ngram+...": prompt lookup where the context offers a continuation, the model elsewhere
MODES = ("self", "ngram", "draft", "ngram+self", "ngram+draft")
# A model drafter stops once its top probability falls below this. Each skipped-block draft
# costs ~0.9 of a full step, so it must be nearly sure: on SmolLM2 (bench/speculative.py's
# sweep, a busy machine) 3 blocks skipped and 0.8-0.9 came out at 1.01-1.04x plain, 8 blocks
# and any threshold at or below 0.99x, and drafting every slot at 0.7-0.9x. An int4 build
# drafts at ~0.4 of a step; 0.6 keeps its acceptance near 90%. The self-draft (an RTN int4
# copy, ``compiler/self_draft.py``) costs ~0.35 of a step, so a draft pays once it is accepted about a
# third of the time: 0.3 stops only where the copy is unsure. On SmolLM2, which it agrees
# with ~98%, the sweep in bench/results/speculative.json had 4 drafts at 1.37x plain with
# 0.6, 1.48x with 0.3 and 1.53x drafting every slot (6 drafts: 1.50x, 1.64x, 1.62x).
DEFAULT_MIN_CONFIDENCE = {"self": 0.8, "draft": 0.6, "self-draft": 0.3}
# The self drafter's default: this fraction of the feed-forward blocks (the ranking's top)
SELF_DRAFT_SKIP = 0.1

# (tokens [1, T], past_length, cache, keep) -> (logits [1, T or keep, V], cache)
Step = Callable[[np.ndarray, int, list, int], tuple[np.ndarray, list]]
Draft = Callable[[list[int], int, list, int], list[int]]


@dataclass
class SpeculationStats:
    """What a speculative decode did; ``Engine.speculation`` holds the last one's."""

    mode: str
    draft_tokens: int
    rounds: int = 0  # verifying steps after the prefill
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # of which the full model agreed with
    tokens: int = 0  # tokens emitted
    draft_steps: int = 0  # model steps the drafter ran (self mode)
    extra: dict = field(default_factory=dict)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_round(self) -> float:
        """Tokens emitted per verifying step (the prefill's first token not counted)."""
        return (self.tokens - 1) / self.rounds if self.rounds else 0.0

    def as_dict(self) -> dict:
        return {"mode": self.mode, "draft_tokens": self.draft_tokens, "rounds": self.rounds,
                "drafted": self.drafted, "accepted": self.accepted, "tokens": self.tokens,
                "draft_steps": self.draft_steps,
                "acceptance_rate": self.acceptance_rate,
                "tokens_per_round": self.tokens_per_round, **self.extra}


def speculative_steps(step: Step, cache: list, prompt: list[int], max_new_tokens: int,
                      draft: Draft, draft_tokens: int, stats: SpeculationStats,
                      eos_token_id: int | Sequence[int] | None = None,
                      trim: Callable[[list, int], list] | None = None,
                      start: int = 0) -> Iterator[int]:
    """Yield the greedy continuation of ``prompt`` token by token (see the module docstring).

    ``cache``: empty, with room for the prompt plus ``max_new_tokens``; or, with ``start``,
    already holding the rows of ``prompt[:start]`` (a chat's earlier turns), so only the rest
    is prefilled. ``trim(cache, n)`` keeps the first n rows (the concat runtime); None: rows
    past P are simply not read."""
    stops = stop_set(eos_token_id)
    if max_new_tokens <= 0:
        return
    logits, cache = step(np.array([prompt[start:]], dtype=np.int64), start, cache, 1)
    last = int(np.argmax(logits[0, -1]))
    context = list(prompt) + [last]
    stats.tokens = 1
    yield last
    while stats.tokens < max_new_tokens and last not in stops:
        past = len(context) - 1  # every token but ``last`` is cached
        # at most what is left after the bonus token, so the rows stay within the buffers
        room = min(draft_tokens, max_new_tokens - stats.tokens - 1)
        drafts = draft(context, past, cache, room) if room > 0 else []
        drafts = [int(t) for t in drafts[:room]]
        logits, cache = step(np.array([[last, *drafts]], dtype=np.int64), past, cache,
                             len(drafts) + 1)
        targets = np.argmax(logits[0, -(len(drafts) + 1):], axis=-1)
        accepted = 0
        while accepted < len(drafts) and drafts[accepted] == int(targets[accepted]):
            accepted += 1
        stats.rounds += 1
        stats.drafted += len(drafts)
        stats.accepted += accepted
        if trim is not None:
            cache = trim(cache, past + accepted + 1)
        for token in drafts[:accepted] + [int(targets[accepted])]:
            context.append(token)
            last = token
            stats.tokens += 1
            yield token
            if token in stops or stats.tokens >= max_new_tokens:
                return


def ngram_drafter(max_ngram: int = 3, min_ngram: int = 1) -> Draft:
    """Prompt lookup: the tokens that followed an earlier occurrence of the context's last n
    tokens (n from ``max_ngram`` down to ``min_ngram``; see ``ngram_lookup``)."""
    def draft(context: list[int], past_length: int, cache: list, count: int) -> list[int]:
        return ngram_lookup(context, count, max_ngram, min_ngram)
    return draft


def first_of(drafters: list[Draft]) -> Draft:
    """The first of ``drafters`` that proposes anything (n-gram lookup, then a model)."""
    def draft(context: list[int], past_length: int, cache: list, count: int) -> list[int]:
        for d in drafters:
            tokens = d(context, past_length, cache, count)
            if tokens:
                return tokens
        return []
    return draft


def ngram_lookup(context: Sequence[int], count: int, max_ngram: int = 3,
                 min_ngram: int = 1) -> list[int]:
    """See ``ngram_drafter``; [] when no n-gram recurs."""
    size = len(context)
    for n in range(max_ngram, min_ngram - 1, -1):
        if size <= n:
            continue
        suffix = list(context[-n:])
        best: list[int] = []
        for start in range(size - n - 1, -1, -1):  # most recent first, not the suffix itself
            if list(context[start:start + n]) == suffix:
                follow = list(context[start + n:start + n + count])
                if len(follow) > len(best):  # a recent match near the end follows with few
                    best = follow
                if len(best) == count:
                    break
        if best:
            return best
    return []


def self_drafter(step: Callable[..., tuple[np.ndarray, list]], skip_flags: np.ndarray | None,
                 stats: SpeculationStats, min_confidence: float = 0.0) -> Draft:
    """Draft greedily with ``step`` (the engine's own, ``skip_flags`` set: its routed
    feed-forward blocks skipped; or a draft engine's), one token per step; stop early once
    the draft's top probability is below ``min_confidence`` (0: always ``count`` tokens)."""
    def draft(context: list[int], past_length: int, cache: list, count: int) -> list[int]:
        tokens: list[int] = []
        last = context[-1]
        for j in range(count):
            logits, cache = step(np.array([[last]], dtype=np.int64), past_length + j, cache,
                                 1, skip=skip_flags)
            stats.draft_steps += 1
            row = logits[0, -1]
            last = int(np.argmax(row))
            tokens.append(last)
            if min_confidence > 0 and j + 1 < count:
                z = row.astype(np.float64) - row[last]
                if 1.0 / np.exp(z).sum() < min_confidence:
                    break
        return tokens
    return draft
