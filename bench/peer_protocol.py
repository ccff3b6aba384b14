"""How the benchmark times one decode, and the stdin/stdout protocol of its peer workers.

Standard library only: the workers (genai_decode.py, llamacpp_decode.py,
torch_compile_decode.py) import it from their own directory and run under other
virtualenvs, which need not have anything of arcompile's.

One timed decode: ``t0`` just before the call that starts it, then a stamp each time a new
token is available. ``first_token_ms`` is the prefill plus the first token (time to first
token); ``decode_ms`` is the median of the gaps between later stamps, so the prefill never
enters it.

A worker reads one JSON request per line on stdin and answers one JSON line on stdout,
keeping the model open between requests (so a suite can alternate systems without reloading):

    {"model": PATH, "threads": 2, "new_tokens": 32, "prompts": {"128": [ids...], ...},
     "detail": false, "max_context": 1056}
    -> {"128": decode_ms, ...}                                    (detail false or absent)
    -> {"128": {"decode_ms": .., "first_token_ms": .., "steps": n, "tokens": [..],
                "engine": "name version"}, ...}                     (detail true)

``max_context`` (optional) is the most tokens any later request will hold, for runtimes that
size a context up front. A worker that can score text also answers

    {"model": PATH, "threads": 2, "perplexity_ids": [ids...]}  -> {"perplexity": float}

(the perplexity of the ids, teacher-forced, in one pass); one that cannot answers
{"perplexity": null, "reason": "..."}. A request sent without a trailing newline, as one document (how
bench/decode_latency.py calls genai_decode.py), is answered the same way.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any, Callable, Iterable


def summarize(t0: float, stamps: list[float], tokens: list[int]) -> dict[str, Any]:
    """Timing of one decode from its start time and the stamp of each new token."""
    if len(stamps) < 2:
        raise ValueError("a decode step needs at least two new tokens to be timed")
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"decode_ms": statistics.median(gaps) * 1000,
            "first_token_ms": (stamps[0] - t0) * 1000,
            "steps": len(gaps), "tokens": list(tokens)}


def time_tokens(start: Callable[[], Iterable[int]]) -> dict[str, Any]:
    """Time a decode given as a function returning an iterator of new tokens."""
    stamps: list[float] = []
    tokens: list[int] = []
    t0 = time.perf_counter()
    for token in start():
        stamps.append(time.perf_counter())
        tokens.append(int(token))
    return summarize(t0, stamps, tokens)


def serve(open_model: Callable[[dict], Any],
          decode: Callable[[Any, list[int], int], dict[str, Any]],
          engine: str, score: Callable[[dict], float] | None = None) -> None:
    """Answer requests on stdin until it closes.

    ``open_model(request)`` opens the runtime once per (model, threads, max_context);
    ``decode(model, ids, new_tokens)`` returns what ``summarize`` does; ``score(request)``,
    where given, the perplexity of ``request["perplexity_ids"]``.
    """
    models: dict[tuple, Any] = {}
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        if "perplexity_ids" in request:
            answer = ({"perplexity": score(request)} if score is not None else
                      {"perplexity": None, "reason": f"{engine}: this worker gives no logits"})
            print(json.dumps(answer), flush=True)
            continue
        key = (request["model"], request["threads"], request.get("max_context"))
        if key not in models:
            models.clear()  # one open model at a time keeps the worker's memory flat
            models[key] = open_model(request)
        answer = {}
        for ctx, ids in request["prompts"].items():
            run = decode(models[key], ids, request["new_tokens"])
            answer[ctx] = dict(run, engine=engine) if request.get("detail") else run["decode_ms"]
        print(json.dumps(answer), flush=True)
