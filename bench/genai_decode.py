"""Peer measurement for bench/decode_latency.py: ONNX Runtime GenAI decode ms/token.

Runs under a Python that has onnxruntime-genai installed: a virtualenv of its own keeps the
peer and its model builder's extra packages (onnx_ir, onnxscript) out of the environment
arcompile's tests run in, but any Python with it works. decode_latency.py calls it as a
subprocess with a JSON request on stdin and reads a JSON answer on stdout:

    {"model": DIR, "threads": 2, "new_tokens": 32, "prompts": {"128": [ids...], ...}}
    -> {"128": ms_per_token, ...}

DIR is the output of ``python -m onnxruntime_genai.models.builder -i HF_DIR -o DIR -p fp32 -e
cpu`` (HF_DIR from ``bench/smollm2_hf_folder.py``; the builder also needs onnx_ir and
onnxscript); the thread count is written into its genai_config.json. Per-token time is the
median of the steps after the first generated token (the prefill is excluded).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path


def set_threads(model_dir: Path, threads: int) -> None:
    path = model_dir / "genai_config.json"
    config = json.loads(path.read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    options["intra_op_num_threads"] = threads
    path.write_text(json.dumps(config, indent=2))


def decode_ms(og, model, ids: list[int], new: int) -> float:
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + new, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)  # the prefill
    stamps = []
    while not generator.is_done():
        generator.generate_next_token()
        stamps.append(time.perf_counter())
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    return statistics.median(steps) * 1000


def main() -> None:
    import onnxruntime_genai as og

    request = json.load(sys.stdin)
    model_dir = Path(request["model"])
    set_threads(model_dir, request["threads"])
    model = og.Model(str(model_dir))
    answer = {ctx: decode_ms(og, model, ids, request["new_tokens"])
              for ctx, ids in request["prompts"].items()}
    json.dump(answer, sys.stdout)


if __name__ == "__main__":
    main()
