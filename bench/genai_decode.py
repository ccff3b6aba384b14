"""Peer worker: ONNX Runtime GenAI decode ms/token (and time to first token).

Runs under a Python that has onnxruntime-genai installed: a virtualenv of its own keeps the
peer and its model builder's extra packages (onnx_ir, onnxscript) out of the environment
arcompile's tests run in, but any Python with it works. bench/decode_latency.py and
bench/suite.py call it as a subprocess speaking the protocol in bench/peer_protocol.py: a JSON
request per line on stdin, a JSON answer per line on stdout, e.g.

    {"model": DIR, "threads": 2, "new_tokens": 32, "prompts": {"128": [ids...], ...}}
    -> {"128": ms_per_token, ...}          ({"detail": true} adds first-token time and tokens)

DIR is the output of ``python -m onnxruntime_genai.models.builder -i HF_DIR -o DIR -p fp32 -e
cpu`` (or ``-p int4`` for 4-bit MatMulNBits weights; HF_DIR from
``bench/smollm2_hf_folder.py``; the builder also needs onnx_ir and onnxscript); the thread
count is written into its genai_config.json. Per-token time is the median of the steps after
the first generated token (the prefill is excluded). ``min_length`` is set to the full length
so an end-of-text token cannot cut a run short and leave fewer steps than the other systems.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peer_protocol import serve, time_tokens  # noqa: E402


def set_threads(model_dir: Path, threads: int) -> None:
    path = model_dir / "genai_config.json"
    config = json.loads(path.read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    options["intra_op_num_threads"] = threads
    path.write_text(json.dumps(config, indent=2))


def open_model(request: dict):
    import onnxruntime_genai as og

    model_dir = Path(request["model"])
    set_threads(model_dir, request["threads"])
    return og.Model(str(model_dir))


def decode(model, ids: list[int], new: int) -> dict:
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    total = len(ids) + new
    params.set_search_options(max_length=total, min_length=total, do_sample=False)

    def tokens():  # timed from the generator's creation: it allocates the cache
        generator = og.Generator(model, params)
        generator.append_tokens(ids)  # the prefill
        while not generator.is_done():
            generator.generate_next_token()
            yield generator.get_next_tokens()[0]

    return time_tokens(tokens)


def main() -> None:
    import onnxruntime_genai as og

    serve(open_model, decode, engine=f"onnxruntime-genai {og.__version__}")


if __name__ == "__main__":
    main()
