"""What the proofs of a cached step share: seeded sample tokens, chunked float64 decoding and
the worst gap over pairs of outputs.

A pass that rewrites the cached step (``insert_kv_cache``: cache against full recomputation;
``pack_attention``: packed against unpacked attention; a batched serving step against each
row decoded alone) cannot lean on the pipeline's numeric check, which runs a cache-free graph
once. It proves itself instead:

1. ``sample_tokens``: random token ids ``[batch, length]`` from the graph's vocabulary, one
   draw per batch size from one generator seeded with ``seed`` (the same seed gives the same
   tokens on every machine);
2. ``chunked`` and ``decode_exact``: the tokens cut into chunks along T (a prefill, single-
   and multi-token steps) and decoded by the reference interpreter in float64, presents fed
   back (``cached_decode``);
3. ``worst_gap``: (max |got - want|, max |got - want| / magnitude) over every (want, got)
   pair, which the caller holds to its tolerance with ``numeric_check.within``.

What is compared with what stays with each pass. Run the decoding within
``interpreter.widened_constants()`` so each weight is widened to float64 once for all runs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence

import torch

from arcompile.ir.analysis import vocabulary
from arcompile.ir.cached_step import cached_decode
from arcompile.ir.graph import Graph
from arcompile.passes.numeric_check import CHECK_DTYPE, gap, relative_gap


def sample_tokens(graph: Graph, seed: int, batches: Sequence[int],
                  length: int) -> Iterator[torch.Tensor]:
    """Seeded random tokens ``[batch, length]`` for each batch size in turn, drawn from the
    vocabulary of the embedding that reads ``graph``'s first input.

    Raises ``ValueError`` at once (not on the first draw) when no embedding reads it.
    """
    vocab = vocabulary(graph)
    if vocab is None:
        raise ValueError(f"no embedding reads %{graph.inputs[0].name}: cannot find the "
                         f"vocabulary to draw sample tokens for the proof")
    return _draws(vocab, torch.Generator().manual_seed(seed), batches, length)


def _draws(vocab: int, gen: torch.Generator, batches: Sequence[int],
           length: int) -> Iterator[torch.Tensor]:
    for batch in batches:
        yield torch.randint(0, vocab, (batch, length), generator=gen)


def chunked(tokens: torch.Tensor, lengths: Sequence[int]) -> list[torch.Tensor]:
    """``tokens [B, T]`` cut along T into chunks of ``lengths`` (summing to T)."""
    return list(torch.split(tokens, list(lengths), dim=1))


def decode_exact(graph: Graph, chunks: list[torch.Tensor], keep: int = 0,
                 every_output: bool = False) -> list[torch.Tensor]:
    """``cached_decode`` in float64: each chunk's logits (or every output of every step)."""
    return cached_decode(graph, chunks, keep=keep, compute_dtype=CHECK_DTYPE,
                         every_output=every_output)


def worst_gap(pairs: Iterable[tuple[object, object]]) -> tuple[float, float]:
    """(max |got - want|, max relative gap) over ``(want, got)`` pairs, read one at a time.

    A NaN in any pair makes both NaN, so ``within`` fails it (Python's ``max`` would drop it).
    """
    worst, worst_relative = 0.0, 0.0
    for want, got in pairs:
        worst = _max(worst, gap(got, want))
        worst_relative = _max(worst_relative, relative_gap(got, want))
    return worst, worst_relative


def _max(a: float, b: float) -> float:
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)
