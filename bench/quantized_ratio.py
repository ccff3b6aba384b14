"""How many times faster than fp32 quantized engines decode, with fp32 timed right beside them.

    .venv/bin/python bench/quantized_ratio.py FP32_ENGINE ENGINE [ENGINE ...]
        [--contexts 128 1024] [--rounds 24] [--steps 16] [--threads 2] [--target 3]
        [--out bench/results/quantized_ratio.json]

This machine is shared, and fp32's decode time moves with how busy its memory is (SmolLM2
fp32 between about 11 and 18 ms per token at context 128, in a minute and within one
process), while an int4 engine, which reads a sixth of the bytes, barely moves. A ratio of
medians taken minutes apart then says more about the neighbours than about the engines. Here
every round times each engine for ``--steps`` one-token steps after a prefill of held-out
text (bench/kv_cache_int8.py's ``decode_ms``), the engines back to back in a rotating order,
so the engines of a round see the same machine; each round gives a paired ratio fp32 ms /
engine ms.

Per engine and context: the median of the paired ratios, their range, how many rounds reach
``--target``, and the median ratio over the quietest third of the rounds (those where fp32
was fastest: the machine as it is when nobody else reads memory) and over the busiest third.
Per quantized engine, after the rounds: its ``MatMulNBits`` nodes alone (the same attributes
and weight shapes, random bytes, one model of nothing else), the weight kernels' share of a
decode step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kv_cache_int8 import decode_ms  # noqa: E402


def describe(manifest: dict) -> str:
    """fp32, or the weight mode with its group size, and the cache's dtype."""
    q = manifest.get("quantization")
    cache = manifest.get("kv_cache", {}).get("dtype", "float32")
    if not q:
        what = "fp32"
    else:
        block = q.get("settings", {}).get("block_size")
        what = f"{q['mode']} g{block}" if block else q["mode"]
    return what + (", int8 cache" if cache == "int8" else "")


def summarize(fp32_ms: list[float], ms: list[float], target: float) -> dict:
    """Paired ratios of one engine at one context, overall and by the machine's load."""
    ratios = [f / m for f, m in zip(fp32_ms, ms)]
    order = sorted(range(len(ratios)), key=lambda i: fp32_ms[i])
    third = max(1, len(order) // 3)
    quiet, busy = order[:third], order[-third:]
    return {"ms_per_token": ms, "ratio": ratios,
            "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios),
            "rounds_at_target": sum(r >= target for r in ratios),
            "ratio_median_quiet": statistics.median(ratios[i] for i in quiet),
            "ratio_median_busy": statistics.median(ratios[i] for i in busy),
            "ms_median_quiet": statistics.median(ms[i] for i in quiet),
            "ms_median_busy": statistics.median(ms[i] for i in busy)}


def weight_kernels_ms(engine_dir: str, threads: int, runs: int = 100) -> float | None:
    """Median ms of one run of every ``MatMulNBits`` node of the engine's graph, alone: same
    attributes, initializers of the same shapes and types filled with random bytes, each
    node fed a one-row input of its width, in a session set up as an engine's. None when the
    graph has none."""
    import tempfile

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from arcompile.runtimes.onnxruntime.session import make_session

    model = onnx.load(str(Path(engine_dir) / "model.onnx"), load_external_data=False)
    found = {t.name: t for t in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    if not nodes:
        return None
    rng = np.random.default_rng(0)
    inits, graph_nodes, outputs, widths = {}, [], [], set()
    for i, node in enumerate(nodes):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        ins = [f"x{attrs['K']}"]
        widths.add(attrs["K"])
        for name in node.input[1:]:
            if name and name not in inits:
                t = found[name]
                dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
                value = (rng.integers(0, 256, tuple(t.dims)).astype(dtype)
                         if np.issubdtype(dtype, np.integer)
                         else (rng.random(tuple(t.dims)) * 0.01).astype(dtype))
                inits[name] = numpy_helper.from_array(value, name)
            ins.append(name)
        graph_nodes.append(helper.make_node("MatMulNBits", ins, [f"y{i}"],
                                            domain="com.microsoft", **attrs))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None))
    inputs = [helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, [1, k])
              for k in sorted(widths)]
    graph = helper.make_graph(graph_nodes, "weights", inputs, outputs, list(inits.values()))
    alone = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    with tempfile.TemporaryDirectory() as tmp:  # the engine's own session settings
        onnx.save(alone, f"{tmp}/weights.onnx")
        session = make_session(f"{tmp}/weights.onnx", threads=threads)
    feed = {f"x{k}": rng.standard_normal((1, k)).astype(np.float32) for k in widths}
    for _ in range(5):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("fp32_engine")
    ap.add_argument("engines", nargs="+", help="quantized engines of the same model")
    ap.add_argument("--contexts", type=int, nargs="+", default=[128, 1024])
    ap.add_argument("--rounds", type=int, default=24)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--target", type=float, default=3.0)
    ap.add_argument("--out", default="bench/results/quantized_ratio.json")
    args = ap.parse_args()

    import arcompile
    from arcompile.eval import heldtext

    paths = [args.fp32_engine, *args.engines]
    engines = {p: arcompile.load(p, threads=args.threads) for p in paths}
    if engines[args.fp32_engine].manifest.get("quantization"):
        raise SystemExit(f"{args.fp32_engine} is quantized; the first engine is the fp32 one")
    for p, eng in engines.items():
        if not eng.kv_cache:
            raise SystemExit(f"{p} has no KV cache; this bench times cached decode steps")
    held = heldtext.token_ids(engines[args.fp32_engine].tokenizer, heldtext.HELD,
                              max(args.contexts))
    start = time.time()
    result: dict = {"benchmark": "quantized_ratio",
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    "threads": args.threads, "rounds": args.rounds, "steps": args.steps,
                    "target": args.target,
                    "engines": {p: describe(e.manifest) for p, e in engines.items()},
                    "contexts": {}}
    for context in args.contexts:
        prompt = held[:context]
        for eng in engines.values():
            decode_ms(eng, prompt, 4)  # warm up
        times: dict[str, list[float]] = {p: [] for p in paths}
        for r in range(args.rounds):
            for p in paths[r % len(paths):] + paths[:r % len(paths)]:
                times[p].append(decode_ms(engines[p], prompt, args.steps))
        fp32 = times[args.fp32_engine]
        by_engine = {"fp32_ms_per_token": fp32,
                     "fp32_ms_median": statistics.median(fp32),
                     "fp32_ms_range": [min(fp32), max(fp32)]}
        print(f"context {context}: fp32 {statistics.median(fp32):.2f} ms/token "
              f"({min(fp32):.2f}-{max(fp32):.2f})", flush=True)
        for p in args.engines:
            s = summarize(fp32, times[p], args.target)
            by_engine[p] = s
            print(f"  {describe(engines[p].manifest)} ({p}): {statistics.median(times[p]):.2f} "
                  f"ms/token, {s['ratio_median']:.2f}x fp32 (range {s['ratio_min']:.2f}-"
                  f"{s['ratio_max']:.2f}, quiet third {s['ratio_median_quiet']:.2f}x, busy "
                  f"third {s['ratio_median_busy']:.2f}x), {s['rounds_at_target']}/"
                  f"{args.rounds} rounds at {args.target:g}x", flush=True)
        result["contexts"][str(context)] = by_engine
    result["weight_kernels_alone_ms"] = {}
    for p in args.engines:
        ms = weight_kernels_ms(p, args.threads)
        result["weight_kernels_alone_ms"][p] = ms
        if ms is not None:
            print(f"  {describe(engines[p].manifest)}: its MatMulNBits nodes alone {ms:.2f} ms",
                  flush=True)
    result["wall_s"] = round(time.time() - start, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
