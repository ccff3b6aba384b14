"""Opening a lowered model with ONNX Runtime on the CPU."""

from __future__ import annotations

import os
from pathlib import Path

import onnxruntime as ort


def default_threads() -> int:
    """All cores this process may run on (the affinity mask, which containers narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def make_session(model_path: str | Path, threads: int | None = None,
                 optimize: bool = True) -> ort.InferenceSession:
    """An InferenceSession on CPUExecutionProvider.

    ``threads``: intra-op threads, all cores by default. ``optimize=False`` switches ORT's
    graph optimizations off (ORT_DISABLE_ALL), which tests use to check the lowering itself
    rather than what ORT rewrote it into.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or default_threads()
    options.inter_op_num_threads = 1  # decoding graphs are a chain; parallelism is intra-op
    # The pool's threads spin while a run lasts, not after it: two sessions taking turns
    # (speculative decoding with a draft engine) otherwise fight, each pool spinning after
    # its run while the other's work waits. SmolLM2 int4, 2 threads, two sessions
    # alternating: 8.5 ms per run without this, 4.3 with it (one session alone: 3.9 both)
    options.add_session_config_entry("session.force_spinning_stop", "1")
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.log_severity_level = 3  # errors only; ORT's warnings about initializers are noise
    return ort.InferenceSession(str(model_path), sess_options=options,
                                providers=["CPUExecutionProvider"])
