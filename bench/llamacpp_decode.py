"""Peer worker: llama.cpp (through llama-cpp-python) decode ms/token on a GGUF file.

Runs under a Python that has llama-cpp-python installed, which compiles llama.cpp from source;
a virtualenv of its own keeps that build out of arcompile's environment:

    python3 -m venv /tmp/llama-venv
    nice -n 19 /tmp/llama-venv/bin/pip install llama-cpp-python

bench/suite.py calls it as a subprocess speaking the protocol in bench/peer_protocol.py (a
JSON request per line on stdin, a JSON answer per line on stdout); "model" is the GGUF path.
llama.cpp computes with the file's own quantized weights (SmolLM2's is Q4_1), so this peer is
not fp32. Greedy decoding (temperature 0); ``n_threads`` and ``n_threads_batch`` are the
request's thread count, the context is sized by its ``max_context``.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peer_protocol import serve, time_tokens  # noqa: E402


def open_model(request: dict):
    from llama_cpp import Llama

    longest = max(len(ids) for ids in request["prompts"].values()) + request["new_tokens"]
    return Llama(model_path=request["model"], n_ctx=request.get("max_context") or longest,
                 n_threads=request["threads"], n_threads_batch=request["threads"],
                 verbose=False)


def decode(llm, ids: list[int], new: int) -> dict:
    def tokens():
        # generate() skips the prompt prefix it still holds from the last call; reset()
        # forgets it, so every run pays its full prefill like the other systems do
        llm.reset()
        steps = llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                             reset=False)
        return itertools.islice(steps, new)

    return time_tokens(tokens)


def score(request: dict) -> float:
    """Perplexity of ``perplexity_ids`` in one teacher-forced pass, on a model opened for it
    alone (``logits_all`` keeps every position's logits, which the timed model must not pay
    for in its prefill)."""
    import numpy as np  # llama-cpp-python's own dependency
    from llama_cpp import Llama

    ids = request["perplexity_ids"]
    llm = Llama(model_path=request["model"], n_ctx=len(ids), n_batch=len(ids),
                n_threads=request["threads"], n_threads_batch=request["threads"],
                logits_all=True, verbose=False)
    try:
        llm.eval(ids)
        z = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)
        z -= z.max(axis=-1, keepdims=True)
        log_probs = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
        return float(np.exp(-log_probs[np.arange(len(ids) - 1), ids[1:]].mean()))
    finally:
        llm.close()


def main() -> None:
    import llama_cpp

    serve(open_model, decode, engine=f"llama-cpp-python {llama_cpp.__version__}", score=score)


if __name__ == "__main__":
    main()
