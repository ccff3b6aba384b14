"""The int8 KV cache against the float one: two engines of the same model, one built with
``--kv-cache-dtype int8``.

    python bench/kv_cache_int8.py FLOAT_ENGINE INT8_ENGINE [--contexts 128 1024] [--out x.json]

Prints and saves: decode ms/token after a prompt of each context length (the engines
interleaved round by round, the median of each; compare ratios, the machine is shared),
perplexity of the held-out text (one prefill of 512 and of 2048 tokens: with an int8 cache a
prefill attends to the dequantized cache as decoding does), greedy agreement (teacher forced:
both engines read the float engine's greedy continuation of prompts from the held-out text,
the fraction of positions where they pick the same next token; and how many tokens the two
free-running greedy decodes share before they part), and cache bytes per token.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np


def decode_ms(eng, prompt: list[int], steps: int) -> float:
    """Median ms of one-token greedy steps after a prefill of ``prompt``."""
    ids = np.array([prompt], dtype=np.int64)
    bufs = eng._empty_cache(1, len(prompt) + steps + 1)
    logits, _ = eng._step(ids, 0, bufs, keep=1)
    token, times = int(logits[0, -1].argmax()), []
    for i in range(steps):
        start = time.perf_counter()
        logits, _ = eng._step(np.array([[token]], dtype=np.int64), len(prompt) + i, bufs, keep=1)
        times.append(time.perf_counter() - start)
        token = int(logits[0, -1].argmax())
    return 1000 * statistics.median(times)


def perplexity(eng, ids: list[int]) -> float:
    from arcompile.eval.metrics import perplexity as ppl

    return float(ppl(eng.logits([ids])[0], ids))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("float_engine")
    ap.add_argument("int8_engine")
    ap.add_argument("--contexts", type=int, nargs="+", default=[128, 1024])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out")
    args = ap.parse_args()

    import arcompile
    from arcompile.eval import heldtext

    engines = {"float32": arcompile.load(args.float_engine, threads=args.threads),
               "int8": arcompile.load(args.int8_engine, threads=args.threads)}
    tok = engines["float32"].tokenizer
    held = heldtext.token_ids(tok, heldtext.HELD, max(2048, max(args.contexts)))
    result: dict = {"threads": args.threads, "contexts": {}}

    for context in args.contexts:  # interleaved: float, int8, float, int8, ...
        times = {name: [] for name in engines}
        decode_ms(engines["float32"], held[:context], 4)  # warm up both
        decode_ms(engines["int8"], held[:context], 4)
        for _ in range(args.rounds):
            for name, eng in engines.items():
                times[name].append(decode_ms(eng, held[:context], args.steps))
        med = {name: statistics.median(t) for name, t in times.items()}
        result["contexts"][context] = {"ms_per_token": med,
                                       "int8_over_float": med["int8"] / med["float32"]}
        print(f"context {context}: float {med['float32']:.2f} ms/token, int8 "
              f"{med['int8']:.2f} ms/token, ratio int8/float {med['int8'] / med['float32']:.3f}",
              flush=True)

    result["perplexity"] = {}
    for count in (512, 2048):
        p = {name: perplexity(eng, held[:count]) for name, eng in engines.items()}
        p["increase"] = p["int8"] / p["float32"] - 1
        result["perplexity"][count] = p
        print(f"perplexity, {count} held tokens: float {p['float32']:.3f}, int8 "
              f"{p['int8']:.3f} ({p['increase']:+.2%})", flush=True)

    agree, total, shared = 0, 0, []
    for start in range(0, 4 * 300, 300):  # four prompts of 64 held tokens, 64 new each
        prompt = held[start:start + 64]
        ref = engines["float32"].generate(prompt, max_new_tokens=64)
        got = engines["int8"].generate(prompt, max_new_tokens=64)
        shared.append(next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), len(ref)))
        ids = prompt + ref
        want = engines["float32"].logits([ids])[0][len(prompt) - 1:-1].argmax(-1)
        have = engines["int8"].logits([ids])[0][len(prompt) - 1:-1].argmax(-1)
        agree += int((want == have).sum())
        total += len(want)
    result["greedy_agreement"] = agree / total
    result["free_running_tokens_shared"] = shared
    print(f"greedy agreement (teacher forced) {agree / total:.1%}; free-running greedy "
          f"decodes share {shared} of 64 tokens", flush=True)

    cache = engines["int8"].manifest["kv_cache"]
    per_token = cache["layers"] * 2 * cache["num_kv_heads"] * cache["head_dim"]
    result["cache_bytes_per_token"] = {"float32": 4 * per_token, "int8": per_token}
    print(f"cache bytes per token: float32 {4 * per_token}, int8 {per_token} (+ "
          f"{4 * per_token} bytes of scales in all)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
