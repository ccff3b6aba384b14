"""The numeric check: how arcompile tells a wrong rewrite from float rounding, on any CPU.

Every pass is held to a tolerance on the logits, and so are the passes that prove themselves
(``insert_kv_cache`` and ``pack_attention``: cached step against full recomputation;
``skip_ffn``: the routed graph with every flag off; ``smooth_quant``: the rescaled graph).
The lowering is checked once more in ONNX Runtime. This module is the one place that says
how those comparisons are made and why (``step_proof.py`` holds what the cached-step proofs
share: sample tokens, chunked float64 decoding, the worst gap over pairs of outputs).

The problem. In float32 a correct rewrite still moves SmolLM2's logits (up to ~35) by
5e-5 .. 1.1e-4, and where in that range depends on the kernels torch picks: the KV-cache proof
measured 1.02e-4 (AVX-512), 1.09e-4 (``ATEN_CPU_CAPABILITY=avx2``) and 7.8e-5 (``default``) on
one Intel machine, and 7.1e-5 on an AMD one, against an absolute tolerance of 1e-4. So the
same correct engine was cached on one machine and uncached on the next.

The design.

1. Graph-against-graph checks run in float64. ``run_exact`` runs the reference interpreter
   with every floating-point op widened to float64 (``run_graph(compute_dtype=float64)``:
   inputs, weights and the dtypes ops name). A rewrite that is exact in real arithmetic then
   differs only by float64 rounding, ~1e-13 of the logits on SmolLM2 (a ~10^9 times smaller
   unit than float32's), whichever kernels the CPU has. A wrong rewrite differs by what it
   gets wrong: positions off by one or a causal mask one column wide move the logits by
   0.1 .. 10 (``tests/test_numeric_check.py`` measures both on every run).
2. Gaps are relative: ``relative_gap = max|got - want| / max(1, max|want|)``, so the same
   tolerance holds for a tiny model's logits near 1 and SmolLM2's near 35.
3. Tolerances are relative and few: ``EXACT`` (1e-9) for every rewrite that is exact in real
   arithmetic; ``ROUNDED`` (1e-6) for a rewrite that stores values it computed as new float32
   constants (smooth_quant's rescaled weights: each rounds at 6e-8), since the float64 check
   sees that rounding; 0.0 where the maths is untouched (layer-skip routing with its flags
   off). Both sit orders of magnitude from either side: correct rewrites measure below 1e-12
   (exact) or ~1e-8 (rounded constants), wrong ones above 1e-3.
4. The per-pass hook (``NumericCheckHook``) compares each pass with the graph it got, not with
   the graph as traced plus a summed budget: one pass's allowance cannot hide another's error.
5. ONNX Runtime runs float32 kernels, so the lowering check (``check_lowering``) compares
   ORT's float32 logits with the float64 reference and allows ``LOWERING`` (1e-4) of the
   logits' magnitude: float32 rounding through a deep model measures ~2e-6 of it (SmolLM2:
   6.4e-5 of 34), a wrong lowering is off by whole units.

Float64 costs a second or two per whole-model run on SmolLM2; the checks run a few short
sequences, so ``optimize`` takes seconds longer, not minutes.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from arcompile.ir.graph import Graph
from arcompile.ir.interpreter import run_graph

CHECK_DTYPE = torch.float64
EXACT = 1e-9      # a rewrite exact in real arithmetic: float64 rounding only
ROUNDED = 1e-6    # a rewrite that rounds new constants to float32 (smooth_quant's weights)
LOWERING = 1e-4   # ONNX Runtime's float32 kernels against the float64 reference


def run_exact(graph: Graph, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The graph's outputs computed in float64 by the reference interpreter."""
    return run_graph(graph, inputs, compute_dtype=CHECK_DTYPE)


def scale(want) -> float:
    """The magnitude gaps are measured against: the largest |logit|, at least 1."""
    return max(1.0, float(np.abs(_array(want)).max(initial=0.0)))


def gap(got, want) -> float:
    """max |got - want| in float64 (NaN when either has a NaN)."""
    a, b = _array(got), _array(want)
    if a.shape != b.shape:
        raise ValueError(f"numeric check: shapes differ, {a.shape} against {b.shape}")
    return float(np.abs(a - b).max(initial=0.0)) if a.size else 0.0


def relative_gap(got, want) -> float:
    return gap(got, want) / scale(want)


def within(relative: float, tolerance: float) -> bool:
    """``relative <= tolerance``; NaN fails."""
    return bool(relative <= tolerance)


def _array(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)
