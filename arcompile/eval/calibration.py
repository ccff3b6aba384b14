"""Calibration data and activation statistics for the passes that need them (AWQ-style
scaling, SmoothQuant, static activation scales).

Text: ``heldtext.CALIBRATION`` (pydoc_data characters 100,000..250,000), never the held-out
text the accuracy gate measures; ``samples`` sequences of ``length`` tokens cut one after
another. A model without a tokenizer is calibrated on seeded random ids (and says so).

Statistics: ``observe_inputs`` runs the graph in the reference interpreter on those sequences
and hands the chosen nodes' input values to a callback, one sequence at a time, so a caller
can keep running per-channel maxima or an accumulated ``X^T X`` without holding every
activation.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from arcompile import progress
from arcompile.eval import heldtext
from arcompile.ir.cached_step import empty_cache, step_inputs
from arcompile.ir.graph import Graph, Node
from arcompile.ir.interpreter import run_graph

DEFAULT_SAMPLES = 16
DEFAULT_LENGTH = 128


def calibration_ids(tokenizer: Any, vocab: int, samples: int = DEFAULT_SAMPLES,
                    length: int = DEFAULT_LENGTH) -> tuple[list[list[int]], str]:
    """``samples`` token sequences of ``length`` and a description of where they came from."""
    if samples < 1 or length < 2:
        raise ValueError(f"calibration needs at least 1 sample of 2 tokens (got {samples} of "
                         f"{length})")
    if tokenizer is None:
        gen = torch.Generator().manual_seed(11)
        ids = torch.randint(0, vocab, (samples, length), generator=gen).tolist()
        return ids, "seeded random token ids (no tokenizer)"
    flat = heldtext.token_ids(tokenizer, heldtext.CALIBRATION, samples * length)
    return ([flat[i * length:(i + 1) * length] for i in range(samples)],
            f"{samples} x {length} tokens of pydoc_data text (calibration region)")


def graph_inputs(graph: Graph, ids: list[int]) -> list[torch.Tensor]:
    """The inputs that run ``ids`` through ``graph`` as one prompt (a cached graph: an
    empty cache, all logits kept)."""
    tokens = torch.tensor([ids])
    if graph.meta.get("kv_cache") is None:
        return [tokens]
    return step_inputs(graph, tokens, torch.tensor(0), empty_cache(graph, 1), torch.tensor(0))


def observe_inputs(graph: Graph, sequences: Iterable[list[int]], nodes: Iterable[Node],
                   visit: Callable[[Node, list[Any]], None]) -> None:
    """Run every sequence through ``graph`` in the interpreter; ``visit(node, args)`` gets the
    input values of each node in ``nodes`` every time it runs."""
    wanted = set(nodes)

    def observe(node: Node, args: list[Any]) -> None:
        if node in wanted:
            visit(node, args)

    for ids in progress.track(sequences, "calibration forwards (interpreter)", unit="seq"):
        run_graph(graph, graph_inputs(graph, ids), observe=observe)
