"""Opening a lowered model with ONNX Runtime on the CPU."""

from __future__ import annotations

import os
from pathlib import Path

import onnxruntime as ort

from arcompile.errors import ArcompileError

# threads per core a session may ask for: ORT starts every intra-op thread at once, so
# --threads 100000 spent minutes creating threads (issue 22); more than a few per core only
# oversubscribes
THREADS_PER_CORE = 4


def default_threads() -> int:
    """All cores this process may run on (the affinity mask, which containers narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check_threads(threads) -> int | None:
    """``threads`` (None: all cores) as an int in [1, THREADS_PER_CORE x the machine's
    cores], else ArcompileError naming the range."""
    if threads is None:
        return None
    most = THREADS_PER_CORE * max(os.cpu_count() or 1, default_threads())
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= most:
        raise ArcompileError(f"threads (--threads) must be an integer in [1, {most}] "
                             f"({THREADS_PER_CORE} per core of this machine's "
                             f"{most // THREADS_PER_CORE}), or left out for all cores; got "
                             f"{threads!r}")
    return threads


def make_session(model_path: str | Path, threads: int | None = None,
                 optimize: bool = True) -> ort.InferenceSession:
    """An InferenceSession on CPUExecutionProvider.

    ``threads``: intra-op threads, all cores by default. ``optimize=False`` switches ORT's
    graph optimizations off (ORT_DISABLE_ALL), which tests use to check the lowering itself
    rather than what ORT rewrote it into.
    """
    threads = check_threads(threads)
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
