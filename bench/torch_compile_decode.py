"""Peer worker: transformers' ``generate`` with its decode step compiled by torch.compile.

This is transformers' own recipe for compiled decoding: a static cache
(``cache_implementation="static"``) and a ``CompileConfig``, which makes ``generate`` run each
decode step through ``torch.compile`` (inductor, mode "default": "reduce-overhead" means CUDA
graphs, which a CPU has not). transformers compiles only the decode step; the prefill runs
eagerly, so this peer's time to first token is eager's. Its flag ``_compile_all_devices``
turns the recipe on for the CPU, where transformers leaves it off by default.

A worker of its own (a subprocess speaking bench/peer_protocol.py, under arcompile's Python):
inductor compiles for minutes on a small CPU and may fail, and a subprocess lets bench/suite.py
give up after a time limit and report why, with its other measurements untouched. The first
request of each prompt length compiles (one graph per static cache size); bench/suite.py
sends a warm-up request first and reports its time. "model" is the SmolLM2 GGUF path; the
model is loaded from it as bench/smollm2_hf_folder.py does (dequantized to fp32).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peer_protocol import serve  # noqa: E402
from transformers_timing import time_generate  # noqa: E402


def open_model(request: dict):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(request["threads"])
    gguf = Path(request["model"])
    return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                dtype=torch.float32).eval()


def decode(model, ids: list[int], new: int) -> dict:
    from transformers import CompileConfig

    config = CompileConfig(mode="default")
    config._compile_all_devices = True  # transformers compiles only on accelerators otherwise
    return time_generate(model, ids, new, use_cache=True, cache_implementation="static",
                         compile_config=config)


def main() -> None:
    import torch

    serve(open_model, decode, engine=f"torch {torch.__version__} inductor")


if __name__ == "__main__":
    main()
