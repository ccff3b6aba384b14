"""The accuracy measures the quantization gate, skip_ffn's ranking and the profiler share:
held-out token ids, a graph's logits on them in the reference interpreter, perplexity."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from arcompile import progress
from arcompile.eval import heldtext
from arcompile.eval.calibration import graph_inputs
from arcompile.ir.interpreter import run_graph

HELD_TOKENS = 512  # the gate's held-out text, in tokens


def held_ids(tokenizer: Any, vocab: int, count: int = HELD_TOKENS) -> tuple[list[int], str]:
    """``count`` held-out token ids (never calibration text) and where they came from: the
    gate's text, or seeded random ids for a model without a tokenizer."""
    if tokenizer is not None:
        return heldtext.token_ids(tokenizer, heldtext.HELD, count), "held-out pydoc_data text"
    gen = torch.Generator().manual_seed(7)
    return (torch.randint(0, vocab, (count,), generator=gen).tolist(),
            "seeded random token ids (no tokenizer)")


def graph_logits(graph, ids: list[int]) -> np.ndarray:
    """[T, V] logits of ``ids`` in the reference interpreter (a cached graph: empty cache)."""
    with progress.step(f"perplexity forward on {len(ids)} tokens (interpreter)"):
        return run_graph(graph, graph_inputs(graph, ids))[0][0].float().numpy()


def perplexity(logits: np.ndarray, ids: list[int]) -> float:
    """exp(mean negative log-likelihood) of ``ids[1:]`` under ``logits[:-1]`` ([T, V])."""
    z = logits[:-1].astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    nll = -log_probs[np.arange(len(ids) - 1), ids[1:]]
    return float(np.exp(nll.mean()))
