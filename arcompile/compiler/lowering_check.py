"""optimize's last check: the ONNX model it wrote, run by ONNX Runtime with its
optimizations off, against the reference interpreter in float64 (``numeric_check.LOWERING``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from arcompile.errors import ArcompileError
from arcompile.ir.cached_step import empty_cache, past_inputs, step_inputs
from arcompile.passes.numeric_check import LOWERING, gap, run_exact, scale
from arcompile.passes.step_proof import worst_gap
from arcompile.runtimes.onnxruntime.inplace_step import InplaceStep
from arcompile.runtimes.onnxruntime.session import make_session


def check_lowering(graph, folder: Path, sample: torch.Tensor) -> float:
    """ONNX Runtime (its optimizations off) against the reference interpreter in float64 on
    ``sample``; max |Δlogit|, or ArcompileError beyond ``numeric_check.LOWERING`` of the
    logits' magnitude."""
    session = make_session(folder / "model.onnx", optimize=False)
    names = [i.name for i in session.get_inputs()]
    if graph.meta.get("kv_cache") is None:
        want = run_exact(graph, [sample])[0].numpy()
        got = session.run(None, {names[0]: sample.numpy()})[0]
        diff = gap(got, want)
    elif graph.meta["kv_cache"].runtime_cache == "inplace":
        diff, want = _check_inplace(graph, session, sample)
    else:  # cached step: the IR with an empty cache (P = 0) against ORT, all at once and
        # in two steps with the presents fed back (the cache path itself)
        empty = [x.numpy() for x in empty_cache(graph, sample.shape[0])]
        zero, all_rows = np.array(0, dtype=np.int64), np.array(0, dtype=np.int64)
        ids = sample.numpy()
        want = run_exact(graph, step_inputs(graph, sample, torch.tensor(0), [
            torch.from_numpy(e) for e in empty], torch.tensor(0)))[0].numpy()

        def run(tokens, past, pasts):
            return session.run(None, dict(zip(names, step_inputs(graph, tokens, past, pasts,
                                                                  all_rows))))
        whole = run(ids, zero, empty)
        split = sample.shape[1] // 2
        first = run(ids[:, :split], zero, empty)
        second = run(ids[:, split:], np.array(split, dtype=np.int64), first[1:])
        stepped = np.concatenate([first[0], second[0]], axis=1)
        diff, _ = worst_gap([(want, whole[0]), (want, stepped)])
    tolerance = LOWERING * scale(want)
    if not diff <= tolerance:  # NaN fails too
        raise ArcompileError(f"the lowered ONNX model differs from the IR by max|Δlogit| {diff:.3g} "
                             f"(tolerance {tolerance:.3g}: {LOWERING:g} of the logits' "
                             f"magnitude); this is a lowering bug")
    return diff


def _check_inplace(graph, session, sample: torch.Tensor) -> tuple[float, np.ndarray]:
    """The in-place step as the engine drives it (buffers bound as past and present): the
    IR with an empty cache against ORT all at once and split in two steps."""
    cached = graph.meta["kv_cache"]
    zero = torch.tensor(0, dtype=torch.int64)
    want = run_exact(graph, step_inputs(graph, sample, zero, empty_cache(graph, sample.shape[0]),
                                        zero))[0].numpy()
    pasts = past_inputs(graph)
    step = InplaceStep(session, graph.inputs[0].name, cached.past_length,
                       session.get_outputs()[0].name, [v.name for v in pasts],
                       [n for pair in cached.present for n in pair],
                       cached.max_context, cached.logits_to_keep,
                       # layer-skip routing's flags: none set (``passes/skip_ffn.py``)
                       {skip["input"]: np.zeros(len(skip["blocks"]), dtype=bool)}
                       if (skip := graph.meta.get("skip_ffn")) else None)
    shapes = [v.shape for v in pasts]
    dtypes = [np.dtype(str(v.dtype).removeprefix("torch.")) for v in pasts]
    ids = sample.numpy()
    capacity = ids.shape[1] + 1  # a little more than the tokens: the engine's buffers vary
    whole, _ = step(ids, 0, step.buffers(ids.shape[0], capacity, shapes, dtypes))
    split = ids.shape[1] // 2
    buffers = step.buffers(ids.shape[0], capacity, shapes, dtypes)
    first, buffers = step(ids[:, :split], 0, buffers)
    second, _ = step(ids[:, split:], split, buffers)
    stepped = np.concatenate([first, second], axis=1)
    pairs = [(want, whole), (want, stepped)]
    if cached.logits_to_keep is not None:  # a prefill that keeps the last row only
        last, _ = step(ids, 0, step.buffers(ids.shape[0], capacity, shapes, dtypes), keep=1)
        pairs.append((want[:, -1:], last))
    diff, _ = worst_gap(pairs)
    return diff, want
