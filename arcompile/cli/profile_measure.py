"""One row of ``arcompile profile``: an engine measured in a process of its own.

Run as ``python -m arcompile.cli.profile_measure`` with a JSON request on stdin; the answer is JSON
on stdout. A fresh process per engine makes the peak resident memory that engine's own (a
process's peak never goes down, so rows measured in one process would inherit the largest).

Request::

    {"engine": DIR, "threads": 2, "repeats": 3, "prompt": [ids], "decode_tokens": 128,
     "greedy": [ids],           # eager PyTorch's greedy continuation of the prompt
     "reference_logits": PATH,  # eager logits on the prompt, [1, T, V] .npy
     "held": [ids]}             # held-out text for perplexity

Answer: prefill_ms (median over ``repeats`` of a prompt in, first token out), decode_ms_p50 /
decode_ms_p90 (per token, over ``decode_tokens`` tokens after the first), peak_rss_mb (the
peak through loading, prefill and decoding: before the accuracy checks, whose [T, V] logits
are the measurement's, not the engine's),
max_abs_logit_diff (prompt logits against eager), greedy_agreement (with eager's greedy tokens
fed in, the fraction of positions where the engine's argmax is eager's next token),
greedy_identical_prefix (how many of the engine's own greedy tokens equal eager's before the
first difference) and perplexity (on ``held``).

A cached engine also gets its other decoding modes measured on the same prompt
(``decoding_modes``; ``"modes": false`` in the request skips them): greedy tokens/s plain and
with n-gram speculative decoding, and with layer-skip routing (``optimize --skip``) the lossy
mode's decode ms/token and perplexity and self-speculative decoding; each speculative mode's
acceptance rate and whether its tokens equal plain greedy's.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time

import numpy as np

from arcompile.eval.metrics import perplexity
from arcompile.serve.engine import load


def measure(request: dict) -> dict:
    eng = load(request["engine"], threads=request.get("threads"))
    prompt, greedy = request["prompt"], request["greedy"]
    eng.generate(prompt, max_new_tokens=1)  # warm up: first-run allocations
    prefill = []
    for _ in range(max(1, request.get("repeats", 3))):
        start = time.perf_counter()
        eng.generate(prompt, max_new_tokens=1)
        prefill.append((time.perf_counter() - start) * 1000)

    stamps, tokens = [], []
    for step in eng.stream(prompt, max_new_tokens=request["decode_tokens"]):
        stamps.append(time.perf_counter())
        tokens.append(step[0])
    per_token = np.diff(stamps) * 1000  # the first token's time is the prefill's
    peak = peak_rss_mb()  # what serving takes; the accuracy checks below hold large logits
    same = [a == b for a, b in zip(tokens, greedy)] + [False]

    reference = np.load(request["reference_logits"])
    logits = eng.logits([prompt])
    forced = eng.logits([prompt + greedy[:-1]])[0, len(prompt) - 1:].argmax(-1)
    held = request["held"]
    modes = decoding_modes(eng, prompt, request["decode_tokens"], held) \
        if request.get("modes", True) else {}
    return {**modes,
        "prefill_ms": statistics.median(prefill),
        "decode_ms_p50": float(np.percentile(per_token, 50)) if per_token.size else None,
        "decode_ms_p90": float(np.percentile(per_token, 90)) if per_token.size else None,
        "peak_rss_mb": peak,
        "max_abs_logit_diff": float(np.abs(logits - reference).max()),
        "greedy_agreement": float(np.mean(forced == np.array(greedy))),
        "greedy_identical_prefix": same.index(False),
        "perplexity": perplexity(eng.logits([held])[0], held),
    }


def decoding_modes(eng, prompt: list[int], count: int, held: list[int],
                   draft_tokens: int = 4) -> dict:
    """Greedy tokens/s (``count`` tokens, the prefill included, best of two interleaved runs)
    plain and speculative (self: with layer-skip routing or a self-draft); with layer-skip
    routing the lossy mode too. {} when uncached."""
    if not eng.kv_cache:
        return {}
    runs = {"plain": {}, "spec_ngram": {"speculative": "ngram", "draft_tokens": draft_tokens}}
    if eng.skip_routing is not None or eng.manifest.get("self_draft"):
        runs["spec_self"] = {"speculative": "self", "draft_tokens": draft_tokens}
    if eng.skip_routing is not None:
        runs["skip"] = {"skip": True}
    best: dict[str, float] = {}
    tokens: dict[str, list[int]] = {}
    stats: dict[str, dict] = {}
    for _ in range(2):  # interleaved, so load on the machine hits every mode alike
        for name, kw in runs.items():
            start = time.perf_counter()
            tokens[name] = eng.generate(prompt, max_new_tokens=count, **kw)
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
            if kw.get("speculative"):
                stats[name] = eng.speculation
    out: dict = {f"{name}_tokens_per_s": len(tokens[name]) / best[name] for name in runs}
    for name in stats:
        out[f"{name}_acceptance"] = stats[name]["acceptance_rate"]
        out[f"{name}_tokens_per_round"] = stats[name]["tokens_per_round"]
        out[f"{name}_identical"] = tokens[name] == tokens["plain"]
    if "skip" in runs:
        out["skip_blocks"] = len(eng.skip_routing["chosen"])
        out["skip_perplexity"] = perplexity(eng.logits([held], skip=True)[0], held)
    return out


def peak_rss_mb() -> float:
    """This process's peak resident memory. Linux: VmHWM, which starts afresh at exec;
    getrusage's ru_maxrss would carry over the (larger) peak of the parent that forked us."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes there, KiB here


def main() -> int:
    json.dump(measure(json.load(sys.stdin)), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
