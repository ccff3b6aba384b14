"""How a cached graph is called (what ``passes/insert_kv_cache.py`` makes of a model):

    inputs:  tokens [B, T], past_length [], past_key_0, past_value_0, ... [B, Hkv, P, D],
             [logits_to_keep []], [skip_ffn flags [blocks]]
    outputs: logits, present_key_0, present_value_0, ... [B, Hkv, P + T, D]

``graph.meta["kv_cache"]`` is its ``CachedStep``: the names of those inputs and outputs and how
the runtime keeps the cache. The passes that prove a rewrite, calibration and the lowering
check all drive a cached graph through these helpers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from arcompile.ir.graph import Graph, Value
from arcompile.ir.interpreter import run_graph


@dataclass(frozen=True)
class CachedStep:
    """How to call a cached graph: written by ``passes/insert_kv_cache.py``; frozen, so a
    change is a ``dataclasses.replace`` stored back in ``graph.meta``. The lowering
    reads it to pick the cache's ops; ``compiler/write_engine.py`` turns it, with the lowered
    I/O, into the manifest's ``kv_cache`` entry."""

    past_length: str  # input [] int64: how many positions the cache holds (P)
    past: tuple[tuple[str, str], ...]  # inputs per layer: (past_key_i, past_value_i)
    present: tuple[tuple[str, str], ...]  # outputs per layer: (present_key_i, present_value_i)
    logits_to_keep: str | None = None  # input []: logits of the last rows only; None: all rows
    # "concat": presents are new arrays fed back as pasts; "inplace": one buffer per cache
    # tensor bound as both past and present (``runtimes/onnxruntime/ops_arc_kv_cache.py``)
    runtime_cache: str = "concat"
    max_context: int | None = None  # the most positions an engine decodes; None: not set
    dtype: str | None = None  # "int8" once ``passes/quantize_kv_cache.py`` ran; None: as traced
    kv_quant: str | None = None  # that pass's scales: "per_channel"; None: not quantized
    layout: str = "BHSD"  # every cache tensor is [B, Hkv, P, D]
    concat_dim: int = 2  # the axis new rows join


def input_named(graph: Graph, name: str) -> Value:
    """The graph input called ``name`` (the cached step's past_length, say)."""
    return next(v for v in graph.inputs if v.name == name)


def past_inputs(graph: Graph) -> list[Value]:
    """The cached graph's past_key/past_value inputs, in layer order (key, value per layer)."""
    by_name = {v.name: v for v in graph.inputs}
    return [by_name[n] for pair in graph.meta["kv_cache"].past for n in pair]


def step_inputs(graph: Graph, tokens, past_length, pasts: list, keep=0, skip=None) -> list:
    """The cached graph's inputs in order: tokens, past_length, pasts, [logits_to_keep],
    [skip_ffn: the layer-skip flags (``passes/skip_ffn.py``); ``skip`` or none set]."""
    extra = [keep] if graph.meta["kv_cache"].logits_to_keep is not None else []
    if graph.meta.get("skip_ffn") is not None:  # none set: numpy for ORT, torch for the IR
        count = len(graph.meta["skip_ffn"]["blocks"])
        extra.append(skip if skip is not None else np.zeros(count, dtype=bool)
                     if isinstance(tokens, np.ndarray) else torch.zeros(count, dtype=torch.bool))
    return [tokens, past_length, *pasts, *extra]


def cached_decode(graph: Graph, chunks: list[torch.Tensor], keep: int = 0,
                  compute_dtype: torch.dtype | None = None,
                  every_output: bool = False) -> list[torch.Tensor]:
    """Run a cached graph over token chunks, feeding presents back; the logits of each chunk
    (its last ``keep`` rows; 0: all), or with ``every_output`` every output of every step.
    The proofs (this pass's, ``pack_attention``'s) run it with ``compute_dtype=float64``."""
    pasts = past_inputs(graph)
    state = empty_cache(graph, chunks[0].shape[0])
    done, outs = 0, []
    for chunk in chunks:
        results = run_graph(graph, step_inputs(graph, chunk, torch.tensor(done, dtype=torch.int64),
                                               state, torch.tensor(keep, dtype=torch.int64)),
                            compute_dtype=compute_dtype)
        outs += results if every_output else results[:1]
        state = results[len(results) - len(pasts):]
        done += chunk.shape[1]
    return outs


def empty_cache(graph: Graph, batch: int) -> list[torch.Tensor]:
    """The past keys and values of a cached graph before its first step: P = 0 rows."""
    return [torch.zeros((batch, v.shape[1], 0, *v.shape[3:]), dtype=v.dtype)
            for v in past_inputs(graph)]
