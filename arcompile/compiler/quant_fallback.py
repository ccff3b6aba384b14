"""The perplexity gate's fallback (``optimize(..., gate_fallback=...)``, ``--gate-fallback``):
when int8 / int4 weights raise the held-out perplexity beyond the bound, keep the modules
that quantize worst in a wider format, as few as it takes, instead of failing. ``"int8"``
(int4's default): their weights become int8 (``QuantizeWeights.keep_int8``: blocks of 32,
integer zero point, round-to-nearest), which keeps most of the speed; modules already 8-bit
go to float. ``"fp32"`` (int8's only choice): float.

The ranking is the quantizer's own (``QuantizeWeights.errors``, per module: the relative
error of its quantized weights on the calibration activations with GPTQ, in the weights with
round-to-nearest), except that a quantized LM head comes first: its error lands on the logits
with no norm after it, so a small relative error costs perplexity most directly (SmolLM2 int4
GPTQ g128: the head ranked 78th of 91 by its error, 0.08% against 0.46% for the worst, yet
the tries jumped from +2.80% to +1.03% when it joined the float ones). So the held-out text
only decides how many: the first count that passes
among 1, 2, 4, ... modules kept, then the smallest between it and the last that
failed (bisection). The tries aim ``margin(limit)`` below the bound: they measure in the
reference interpreter, and the engine's own figure, checked against the bound after lowering
as always, differs from it by ONNX Runtime's rounding of activations (accuracy level 4):
SmolLM2 int4 GPTQ g128 with a 3% bound, 72 modules in float: 13.144 (+2.79%) in the
interpreter, 13.261 (+3.71%) in ONNX Runtime; round-to-nearest g128 with 59: 13.472 against
13.424. Each try quantizes a copy of the float graph with the same pass, which
reuses the weights it quantized before (no second calibration), and measures the held-out
perplexity in the reference interpreter: a few seconds per try on SmolLM2. When even every
module but one in float does not pass, optimize fails with the figures as without the
fallback.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from arcompile.eval.metrics import graph_logits, perplexity
from arcompile.passes import PassManager, VerifyHook
from arcompile.passes.dce import DeadCodeElimination

# the tries' aim below the bound: a quarter of it, at most a point of relative perplexity
MARGIN_SHARE, MARGIN_MAX = 0.25, 0.01


def margin(limit: float) -> float:
    return min(limit * MARGIN_SHARE, MARGIN_MAX) if limit > 0 else 0.0


def fall_back(graph, float_graph, passes: list, quantizer, ids: list[int], before: np.ndarray,
              limit: float, say: Callable[[str], None],
              to: str = "fp32") -> tuple[list, np.ndarray, dict] | None:
    """Quantize ``float_graph`` (a copy of ``graph`` before ``passes`` ran) with the worst
    modules of ``quantizer.errors`` kept in ``to`` ("int8" or "fp32"), as few as pass the gate;
    make ``graph`` that result. Returns (records, logits [T, V], manifest entry), or None
    when no count passes (``graph`` is left as it was)."""
    ranked = sorted(quantizer.errors, key=lambda m: (m not in quantizer.head_modules,
                                                     -quantizer.errors[m], m))
    aim = limit - margin(limit)
    ppl_before = perplexity(before, ids)
    tries: dict[int, tuple] = {}

    def keep(count: int) -> None:
        quantizer.keep_float, quantizer.keep_int8 = set(), set()
        setattr(quantizer, "keep_int8" if to == "int8" else "keep_float", set(ranked[:count]))

    def attempt(count: int) -> bool:
        work = float_graph.copy()
        keep(count)
        records = PassManager([*passes, DeadCodeElimination()], [VerifyHook()]).run(work)
        logits = graph_logits(work, ids)
        ppl = perplexity(logits, ids)
        increase = ppl / ppl_before - 1
        tries[count] = (work, records, logits, increase)
        say(f"  fallback: {count} of {len(ranked)} modules in {to}: perplexity {ppl:.3f} "
            f"({increase:+.2%})")
        return increase <= aim

    say(f"  fallback: keeping the worst-quantized of {len(ranked)} modules in {to} "
        f"(ranked by {quantizer.errors_measure}), aiming at +{aim:.2%}")
    most = len(ranked) - 1  # every module in float would be no quantization at all
    failed, count = 0, 1
    while count < most and not attempt(count):
        failed, count = count, min(2 * count, most)
    if count >= most and (count < 1 or not attempt(count)):
        keep(0)
        return None
    while count - failed > 1:  # the smallest passing count between them
        middle = (failed + count) // 2
        if attempt(middle):
            count = middle
        else:
            failed = middle
    work, records, logits, increase = tries[count]
    keep(count)
    graph.adopt(work)
    entry = {"to": to, "kept": ranked[:count], "modules": len(ranked), "aim": aim,
             "ranked_by": quantizer.errors_measure,
             "errors": {m: quantizer.errors[m] for m in ranked},
             "tries": [{"kept": k, "perplexity_increase": t[3]}
                       for k, t in sorted(tries.items())]}
    return records, logits, entry
