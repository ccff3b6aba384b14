"""The benchmark suite: SmolLM2 decode and prefill times of arcompile and its peers, in one run.

    make bench                                    # or, with the venv set up:
    .venv/bin/python bench/suite.py [--contexts 128 1024] [--new-tokens 32] [--repeats 3]
        [--threads 2] [--systems KEY ...] [--genai-python PY] [--genai-model DIR]
        [--genai-int4-model DIR] [--llama-python PY]

Systems (keys for ``--systems``): arcompile_default (the shipping engine: fusions and the
in-place KV cache), arcompile_int8, arcompile_int4 and arcompile_w8a8 (the same with
``--quantize int8`` / ``int4`` / ``w8a8`` at their defaults; each passes its perplexity gate
while building), arcompile_int4_g64 (``--quantize int4 --group-size 64``),
arcompile_int4_g64_kv8 (the same with ``--kv-cache-dtype int8``), arcompile_attention (the clean-up passes and fuse_attention, the least
the KV cache accepts), arcompile_cleanup (the preset, no fusions; with the cache if optimize
gives it one, else uncached, as it ships), arcompile_uncached (the default passes, no
cache), transformers_cached and transformers_uncached (eager ``generate`` with and without
its cache), torch_compile (transformers' compiled-decode recipe), ort_genai_fp32 and
ort_genai_int4 (ONNX Runtime GenAI's model-builder output), llama_cpp (llama-cpp-python on
the same GGUF, Q4_1). Extra systems, run only when named in ``--systems``: arcompile_int4_kv8
(the default int4 weights with ``--kv-cache-dtype int8``), arcompile_int4_sym
(symmetric int4, int4 head) and arcompile_int4_qdq (the same as ``--weight-format qdq``),
arcompile_int4_g128_fallback_int8 / _fp32 (round-to-nearest g128, which the gate refuses,
passed by ``--gate-fallback int8`` / ``fp32``). Every system gets the same prompts (text from
``pydoc_data.topics``) and the same thread count; the systems are alternated within each
repeat, in a rotating order, so drift on a shared machine hits all alike.

Per system and context: decode ms/token (median of the steps after the first new token, so
the prefill is excluded; then the median over repeats), time to the first token (the
prefill), and how many of its greedy tokens equal transformers eager's. Per system, after
the timings: its perplexity on the 512 held-out tokens the quantization gate uses
(bench/held_perplexity.py), where its API gives logits. A peer that is not
installed is skipped with the reason; one that fails (or outlives its time limit) is
recorded as failed with its error. Nothing is estimated or filled in.

Peers run as subprocess workers (bench/peer_protocol.py) under their own Pythons, so their
packages stay out of arcompile's environment. Where they are found:
  --genai-python / $GENAI_PYTHON (default /tmp/genai-venv/bin/python, if it exists)
  --genai-model / $GENAI_MODEL, --genai-int4-model / $GENAI_INT4_MODEL (default
      /tmp/smol-genai and /tmp/smol-genai-int4): built from bench/smollm2_hf_folder.py's
      folder by ``python -m onnxruntime_genai.models.builder -i HF -o DIR -p fp32|int4 -e cpu``
  --llama-python / $LLAMA_PYTHON (default /tmp/llama-venv/bin/python): a Python with
      llama-cpp-python (see bench/llamacpp_decode.py)
torch.compile runs under this Python, in a worker with a time limit (``--compile-timeout``).

Writes bench/results/suite.json and suite.md (the table, made from the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from decode_latency import prompt_ids  # noqa: E402
from held_perplexity import genai_logits  # noqa: E402
from peer_protocol import time_tokens  # noqa: E402
from peer_worker import PeerFailed, PeerWorker  # noqa: E402
from suite_report import machine, markdown, versions  # noqa: E402
from transformers_timing import time_generate  # noqa: E402

import arcompile  # noqa: E402
from arcompile import progress  # noqa: E402
from arcompile.eval.metrics import (  # noqa: E402
    HELD_TOKENS,
    held_ids,
    perplexity,  # noqa: E402
)
from arcompile.frontend.load import find_smollm2_gguf, load_model  # noqa: E402
from arcompile.passes.pipeline import PRESETS  # noqa: E402

REFERENCE = "transformers_cached"  # greedy tokens are compared with eager's
BASELINE = "arcompile_default"  # decode ratios are to the shipping engine
# arcompile's 4-bit engines against the 4-bit peers, repeat by repeat: in how many repeats each
# decoded faster (the systems alternate within a repeat, so a pair shares the machine's state)
PAIRED = ("arcompile_int4", ("ort_genai_int4", "llama_cpp"))
# systems a plain run leaves out (each costs a build and its timings); name them in --systems
EXTRA = ("arcompile_int4_kv8", "arcompile_int4_sym", "arcompile_int4_qdq",
         "arcompile_int4_g128_fallback_int8", "arcompile_int4_g128_fallback_fp32")


@dataclass
class System:
    key: str
    label: str
    precision: str
    uncached: bool = False
    note: str = ""
    run: Callable[[str, list[int], int], dict] | None = None  # (ctx, ids, new) -> timing
    skip: str | None = None  # "not installed: ..." / "failed: ..." once known
    timeout_s: float = 600.0  # how long a worker's next answer may take
    new_tokens: int = 0
    warmup_s: dict[str, list[float]] = field(default_factory=dict)  # per warm-up round
    timings: dict[str, list[dict]] = field(default_factory=dict)
    # the perplexity of a token list, teacher-forced (None: not measured)
    score: Callable[[list[int]], float] | None = None
    perplexity: float | str | None = None  # the figure, or why it could not be measured


def log(message: str) -> None:
    progress.log(message)  # stderr: above the bars on a terminal, plain lines elsewhere


def default_path(option: str | None, env: str, fallback: str) -> str | None:
    """The option, else the environment variable, else the /tmp default if it exists."""
    return option or os.environ.get(env) or (fallback if Path(fallback).exists() else None)


def importable(python: str, module: str) -> str | None:
    """None when ``module`` imports under ``python``, else why not."""
    try:
        done = subprocess.run([python, "-c", f"import {module}"], capture_output=True,
                              text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"cannot run {python}: {e}"
    if done.returncode:
        lines = done.stderr.strip().splitlines()
        return f"`import {module}` fails under {python}: {lines[-1] if lines else '?'}"
    return None


# -- arcompile and transformers, in this process ----------------------------------------------
def arcompile_systems(loaded, tmp: Path, threads: int, wanted: Callable[[str], bool],
                      ) -> list[System]:
    # (key, label, precision, passes, ask for the KV cache, a refusal fails the system,
    #  quantization options, note)
    variants = [
        ("arcompile_default", "arcompile default (fused, KV cache)", "fp32", "default", True,
         True, {}, "the shipping engine: every pass, in-place KV cache"),
        ("arcompile_int8", "arcompile default + --quantize int8", "int8 weights", "default",
         True, True, {"quantize": "int8"},
         "MatMulNBits 8-bit weights, the default settings of --quantize int8"),
        ("arcompile_int4", "arcompile default + --quantize int4", "int4 weights", "default",
         True, True, {"quantize": "int4"},
         "MatMulNBits 4-bit weights, the default settings of --quantize int4"),
        ("arcompile_int4_g64", "arcompile default + --quantize int4 --group-size 64",
         "int4 weights, groups of 64", "default", True, True,
         {"quantize": "int4", "group_size": 64},
         "MatMulNBits 4-bit weights in groups of 64: a scale per 64 weights rather than 32, "
         "11% fewer bytes read per token"),
        ("arcompile_int4_g64_kv8", "arcompile default + --quantize int4 --group-size 64 "
         "--kv-cache-dtype int8", "int4 weights (g64), int8 KV cache", "default", True, True,
         {"quantize": "int4", "group_size": 64, "kv_cache_dtype": "int8"},
         "the same weights, and the cache in int8 (GroupQueryAttention's quantized cache): a "
         "quarter of the cache bytes read per token, which int4 weights leave untouched"),
        ("arcompile_int4_kv8", "arcompile default + --quantize int4 --kv-cache-dtype int8",
         "int4 weights, int8 KV cache", "default", True, True,
         {"quantize": "int4", "kv_cache_dtype": "int8"},
         "the default int4 weights (groups of 32), and the cache in int8"),
        ("arcompile_int4_sym", "arcompile default + --quantize int4 --zero-point none "
         "--lm-head int4", "int4 weights, symmetric", "default", True, True,
         {"quantize": "int4", "zero_point": "none", "lm_head": "int4"},
         "MatMulNBits 4-bit symmetric weights, the head too: the twin of arcompile_int4_qdq"),
        ("arcompile_int4_qdq", "arcompile default + --quantize int4 --zero-point none "
         "--lm-head int4 --weight-format qdq", "int4 weights, symmetric, QDQ", "default", True,
         True, {"quantize": "int4", "zero_point": "none", "lm_head": "int4",
                "weight_format": "qdq"},
         "the same weights as DequantizeLinear -> MatMul (TensorRT's weight-only form), which "
         "ONNX Runtime fuses back into MatMulNBits"),
        ("arcompile_int4_g128_fallback_int8", "arcompile default + --quantize int4 "
         "--group-size 128 --quant-method rtn --gate-fallback int8", "int4 weights (g128), the "
         "worst modules int8", "default", True, True,
         {"quantize": "int4", "group_size": 128, "quant_method": "rtn",
          "gate_fallback": "int8"},
         "a setting the perplexity gate refuses (+60%), passed by keeping the worst-quantized "
         "modules in int8"),
        ("arcompile_int4_g128_fallback_fp32", "arcompile default + --quantize int4 "
         "--group-size 128 --quant-method rtn --gate-fallback fp32", "int4 weights (g128), the "
         "worst modules fp32", "default", True, True,
         {"quantize": "int4", "group_size": 128, "quant_method": "rtn",
          "gate_fallback": "fp32"},
         "the same, the worst-quantized modules kept in float"),
        ("arcompile_w8a8", "arcompile default + --quantize w8a8", "int8 weights and "
         "activations", "default", True, True, {"quantize": "w8a8"},
         "SmoothQuant, static int8 activation scales (MatMulIntegerToFloat), the default "
         "settings of --quantize w8a8"),
        ("arcompile_attention", "arcompile cleanup + fuse_attention (KV cache)", "fp32",
         PRESETS["cleanup"] + ["fuse_attention"], True, True, {},
         "the smallest pipeline the KV cache accepts: against default, what the other "
         "fusions (norms, rope, MLP, merged linears) buy per token"),
        # the preset as shipped: where optimize refuses it the cache (it needs fused
        # attention), it writes the uncached engine, and that is what is measured
        ("arcompile_cleanup", "arcompile cleanup (no fusions)", "fp32", "cleanup", True, False,
         {}, "clean-up passes only"),
        ("arcompile_uncached", "arcompile default, no KV cache", "fp32", "default", False,
         False, {}, "every pass, kv_cache=False: each token recomputes the whole prefix"),
    ]
    systems = []
    for key, label, precision, passes, cached, needs_cache, quant, note in variants:
        system = System(key, label, precision, uncached=not cached, note=note)
        if not wanted(key):
            system.skip = ("not run: an extra system, asked for by --systems" if key in EXTRA
                           else "not run: left out by --systems")
            systems.append(system)
            continue
        start = time.perf_counter()
        try:
            # the numerics checks are off because they only verify, and the engine they pass
            # is the same; the greedy-token comparison with eager checks every run instead
            # (a quantized engine passes its own perplexity gate in optimize)
            report = arcompile.optimize(loaded, tmp / key, passes=passes, kv_cache=cached,
                                        check_numerics=False, log=None, **quant)
            if cached and report.kv_cache is None:
                if needs_cache:
                    raise RuntimeError(f"the KV cache was refused: {report.kv_cache_refused}")
                system.uncached = True
                system.label += ", KV cache refused: uncached"
                system.note += f"; optimize refused the cache: {report.kv_cache_refused}"
            if report.quantization:
                q = report.quantization
                system.note += (f"; perplexity {q['perplexity_unquantized']:.3f} -> "
                                f"{q['perplexity_onnxruntime']:.3f} (ONNX Runtime, "
                                f"{q['perplexity_onnxruntime'] / q['perplexity_unquantized'] - 1:+.2%}"
                                f"), greedy agreement {q['greedy_agreement']:.1%}")
            eng = arcompile.load(tmp / key, threads=threads)
        except Exception as e:  # noqa: BLE001 - recorded, and the suite goes on
            system.skip = f"failed: {type(e).__name__}: {e}"
            systems.append(system)
            continue
        system.note += f"; built in {time.perf_counter() - start:.0f} s"
        system.run = streamed(eng)
        system.score = lambda ids, eng=eng: perplexity(eng.logits([ids])[0], ids)
        systems.append(system)
    return systems


def streamed(eng) -> Callable[[str, list[int], int], dict]:
    """An engine's decode timed token by token through ``stream`` (one row)."""
    def run(ctx: str, ids: list[int], new: int) -> dict:
        return time_tokens(lambda: (step[0] for step in eng.stream(ids, max_new_tokens=new)))
    return run


def transformers_systems(hf) -> list[System]:
    cached = System("transformers_cached", "transformers eager, KV cache", "fp32",
                    note="`generate(use_cache=True)`, its dynamic cache")
    cached.run = lambda ctx, ids, new: time_generate(hf, ids, new, use_cache=True)
    cached.score = lambda ids: perplexity(
        hf(torch.tensor([ids])).logits[0].detach().float().numpy(), ids)
    uncached = System("transformers_uncached", "transformers eager, no cache", "fp32",
                      uncached=True, note="`generate(use_cache=False)`")
    uncached.run = lambda ctx, ids, new: time_generate(hf, ids, new, use_cache=False)
    uncached.perplexity = "not measured: the same model as transformers eager with its cache"
    return [cached, uncached]


# -- peers, in worker subprocesses ------------------------------------------------------------
def worker_system(system: System, python: str, script: str, model: str, threads: int,
                  max_context: int, workers: list[PeerWorker], scores: bool = False) -> System:
    """``system`` timed by a worker running ``script``; ``scores``: the worker also answers
    perplexity requests (peer_protocol.py), which give the system's perplexity."""
    mine: list[PeerWorker] = []

    def worker() -> PeerWorker:
        if not mine:  # started on first use: a system left out by --systems costs nothing
            mine.append(PeerWorker(python, HERE / script))
            workers.append(mine[0])
        return mine[0]

    def run(ctx: str, ids: list[int], new: int) -> dict:
        answer = worker().ask(
            {"model": model, "threads": threads, "new_tokens": new, "prompts": {ctx: ids},
             "detail": True, "max_context": max_context}, timeout_s=system.timeout_s)
        return answer[ctx]

    def score(ids: list[int]) -> float:
        answer = worker().ask({"model": model, "threads": threads, "perplexity_ids": ids},
                             timeout_s=system.timeout_s)
        if answer.get("perplexity") is None:
            raise RuntimeError(answer.get("reason", "no perplexity"))
        return answer["perplexity"]

    system.run = run
    system.score = score if scores else None
    return system


def peer_systems(args, gguf: Path, max_context: int, workers: list[PeerWorker]) -> list[System]:
    systems = []
    compiled = System("torch_compile", "torch.compile (inductor, static cache)", "fp32",
                      note="transformers' compiled-decode recipe; its prefill runs eagerly")
    compiled.perplexity = "not measured: the same model as transformers eager, compiled"
    if args.no_torch_compile:
        compiled.skip = "not run: --no-torch-compile"
        systems.append(compiled)
    else:
        systems.append(worker_system(compiled, sys.executable, "torch_compile_decode.py",
                                     str(gguf), args.threads, max_context, workers))

    genai_python = default_path(args.genai_python, "GENAI_PYTHON", "/tmp/genai-venv/bin/python")
    genai_missing = (importable(genai_python, "onnxruntime_genai") if genai_python else
                     "no Python with onnxruntime-genai (--genai-python or $GENAI_PYTHON; "
                     "/tmp/genai-venv/bin/python is absent)")
    for key, label, precision, flag, env, fallback in [
        ("ort_genai_fp32", "ONNX Runtime GenAI fp32", "fp32", "--genai-model", "GENAI_MODEL",
         "/tmp/smol-genai"),
        ("ort_genai_int4", "ONNX Runtime GenAI int4", "int4 (MatMulNBits)",
         "--genai-int4-model", "GENAI_INT4_MODEL", "/tmp/smol-genai-int4"),
    ]:
        option = getattr(args, flag[2:].replace("-", "_"))
        system = System(key, label, precision, note="model-builder output (`-e cpu`, its defaults)")
        model = default_path(option, env, fallback)
        if genai_missing:
            system.skip = f"not installed: {genai_missing}"
        elif not model:
            system.skip = (f"not installed: no {label} model folder ({flag} or ${env}; "
                           f"{fallback} is absent)")
        else:
            worker_system(system, genai_python, "genai_decode.py", model, args.threads,
                          max_context, workers)
            system.score = lambda ids, model=model: perplexity(
                genai_logits(model, ids, args.threads), ids)
        systems.append(system)

    llama = System("llama_cpp", "llama.cpp (llama-cpp-python)", "Q4_1 (the GGUF as shipped)",
                   note="same GGUF file, its own 4-bit kernels")
    llama_python = default_path(args.llama_python, "LLAMA_PYTHON", "/tmp/llama-venv/bin/python")
    missing = (importable(llama_python, "llama_cpp") if llama_python else
               "no Python with llama-cpp-python (--llama-python or $LLAMA_PYTHON; "
               "/tmp/llama-venv/bin/python is absent)")
    if missing:
        llama.skip = f"not installed: {missing}"
    else:
        worker_system(llama, llama_python, "llamacpp_decode.py", str(gguf), args.threads,
                      max_context, workers, scores=True)
    systems.append(llama)
    return systems


# -- measuring ---------------------------------------------------------------------------------
def attempt(system: System, ctx: str, ids: list[int], new: int, timeout_s: float) -> dict | None:
    """One timed decode; a failure marks the system failed and returns None."""
    system.timeout_s = timeout_s
    try:
        return system.run(ctx, ids, new)
    except Exception as e:  # noqa: BLE001 - recorded, and the suite goes on
        reason = str(e) if isinstance(e, PeerFailed) else f"{type(e).__name__}: {e}"
        system.skip = f"failed: {reason}"
        log(f"  {system.key} failed: {reason}")
        return None


def measure(systems: list[System], prompts: dict[str, list[int]], args) -> list[list[float]]:
    """Warm up, then time every live system; returns the 1-minute load average at the start
    and end of each repeat (above the thread count: something else shared the cores)."""
    live = lambda: [s for s in systems if s.skip is None]  # noqa: E731
    new_for = lambda s: args.uncached_new_tokens if s.uncached else args.new_tokens  # noqa: E731
    log("warming up (first runs allocate, and torch.compile compiles) ...")
    for system in progress.track(live(), "warming up", unit="systems"):
        system.new_tokens = new_for(system)
        compiled = system.key == "torch_compile"
        timeout = args.compile_timeout if compiled else args.peer_timeout
        # the same request as the timed ones (torch.compile's graphs depend on its length),
        # except for the uncached systems, where a few tokens warm up as well as many.
        # torch.compile gets two rounds: going back to a length it has seen can still
        # recompile once (the cache length turns dynamic), seen in a repeat otherwise
        warm_new = 3 if system.uncached else system.new_tokens
        for _ in range(2 if compiled else 1):
            for ctx, ids in prompts.items():
                start = time.perf_counter()
                if attempt(system, ctx, ids, warm_new, timeout) is None:
                    if compiled and "no answer" in (system.skip or ""):
                        system.skip += (" (compiling on this CPU took longer than "
                                        "--compile-timeout)")
                    break
                system.warmup_s.setdefault(ctx, []).append(time.perf_counter() - start)
                log(f"  {system.key} ctx {ctx}: {system.warmup_s[ctx][-1]:.1f} s")
            if system.skip is not None:
                break
    load: list[list[float]] = []
    for r in progress.track(range(args.repeats), "timed repeats", unit="repeats"):
        load.append([round(os.getloadavg()[0], 2)])
        order = live()
        order = order[r % len(order):] + order[:r % len(order)] if order else order
        log(f"repeat {r + 1}/{args.repeats}: {', '.join(s.key for s in order)}")
        for ctx, ids in prompts.items():
            for system in order:
                if system.skip is None:
                    t = attempt(system, ctx, ids, new_for(system), args.peer_timeout)
                    if t is not None:
                        system.timings.setdefault(ctx, []).append(t)
        load[-1].append(round(os.getloadavg()[0], 2))
    return load


def measure_perplexity(systems: list[System], tokenizer) -> None:
    """Each live system's perplexity on the quantization gate's held-out tokens."""
    ids, _ = held_ids(tokenizer, 0)
    for system in progress.track(systems, "perplexity per system", unit="systems"):
        if system.skip is not None or system.score is None:
            continue
        log(f"perplexity of {system.key} on {len(ids)} held-out tokens ...")
        try:
            system.perplexity = system.score(ids)
        except Exception as e:  # noqa: BLE001 - recorded, and the suite goes on
            system.perplexity = f"failed: {type(e).__name__}: {e}"


def paired_wins(system: System, peer: System) -> dict[str, str]:
    """Per context, "k/n": the repeats in which ``system`` decoded faster than ``peer``."""
    wins = {}
    for ctx, runs in system.timings.items():
        theirs = peer.timings.get(ctx, [])
        n = min(len(runs), len(theirs))
        if n:
            k = sum(a["decode_ms"] < b["decode_ms"] for a, b in zip(runs, theirs))
            wins[ctx] = f"{k}/{n}"
    return wins


def summary(system: System, reference: System | None, baseline: System | None,
            peers: list[System] = ()) -> dict:
    out: dict[str, Any] = {"label": system.label, "precision": system.precision}
    if system.skip is not None:
        status, reason = system.skip.split(": ", 1)
        return {**out, "status": status, "reason": reason, "note": system.note}
    note = system.note
    if system.key == "torch_compile":  # its first run per length is the compile
        note += "; first run (compiling) " + ", ".join(
            f"{s[0]:.0f} s at {c}" for c, s in system.warmup_s.items())
    if isinstance(system.perplexity, float):
        out["perplexity"] = system.perplexity
        if baseline is not None and isinstance(baseline.perplexity, float):
            out["perplexity_vs_arcompile_default"] = system.perplexity / baseline.perplexity - 1
    elif system.perplexity is not None:
        out["perplexity_missing"] = system.perplexity
    out.update(status="measured", note=note,
               new_tokens=system.new_tokens,
               warmup_s={c: [round(x, 2) for x in s] for c, s in system.warmup_s.items()}, contexts={})
    for ctx, runs in system.timings.items():
        per = {"decode_ms_per_token": statistics.median(t["decode_ms"] for t in runs),
               "first_token_ms": statistics.median(t["first_token_ms"] for t in runs),
               "decode_ms_runs": [round(t["decode_ms"], 3) for t in runs],
               "first_token_ms_runs": [round(t["first_token_ms"], 3) for t in runs],
               # the best repeat: the least disturbed by other processes on a shared machine
               "decode_ms_min": min(t["decode_ms"] for t in runs),
               "steps_per_run": runs[0]["steps"]}
        if "engine" in runs[0]:
            out["engine"] = runs[0]["engine"]
        if reference is not None and reference.skip is None and ctx in reference.timings:
            mine, eager = runs[0]["tokens"], reference.timings[ctx][0]["tokens"]
            n = min(len(mine), len(eager))
            same = next((i for i in range(n) if mine[i] != eager[i]), n)
            per["greedy_match_vs_eager"] = f"{same}/{n}"
        out["contexts"][ctx] = per
    if baseline is not None and baseline.skip is None:
        out["decode_vs_arcompile_default"] = {
            ctx: per["decode_ms_per_token"] /
            statistics.median(t["decode_ms"] for t in baseline.timings[ctx])
            for ctx, per in out["contexts"].items() if ctx in baseline.timings}
    paired = {peer.key: paired_wins(system, peer) for peer in peers
              if system.key.startswith(PAIRED[0]) and peer.skip is None}
    if paired:
        out["faster_than_in_repeats"] = paired
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 1024],
                        help="prompt lengths to decode after (default 128 1024)")
    parser.add_argument("--prefill-context", type=int, default=128,
                        help="the context whose time to first token the table shows")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--uncached-new-tokens", type=int, default=8,
                        help="new tokens for the systems without a cache, whose every step "
                             "recomputes the prefix (seconds per token at context 1024)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--systems", nargs="+", help="measure only these keys (see above)")
    parser.add_argument("--genai-python")
    parser.add_argument("--genai-model")
    parser.add_argument("--genai-int4-model")
    parser.add_argument("--llama-python")
    parser.add_argument("--no-torch-compile", action="store_true")
    parser.add_argument("--compile-timeout", type=float, default=1200,
                        help="seconds torch.compile's first run of a context may take")
    parser.add_argument("--peer-timeout", type=float, default=600,
                        help="seconds any other single decode may take")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    if min(args.new_tokens, args.uncached_new_tokens) < 3:
        parser.error("--new-tokens and --uncached-new-tokens must be at least 3 (2 steps)")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    progress.install(progress.for_stream())  # bars on a terminal, plain lines elsewhere

    gguf = find_smollm2_gguf()
    log(f"loading {gguf.name} ...")
    loaded = load_model(str(gguf), log=log)
    prompts = {str(ctx): prompt_ids(loaded.tokenizer, ctx) for ctx in args.contexts}
    max_context = max(args.contexts) + max(args.new_tokens, args.uncached_new_tokens)
    wanted = set(args.systems or [])
    workers: list[PeerWorker] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            log("building the arcompile engines ...")
            systems = arcompile_systems(loaded, Path(tmp), args.threads,
                                        lambda key: key in wanted if wanted
                                        else key not in EXTRA)
            systems += transformers_systems(loaded.module.model)
            systems += peer_systems(args, gguf, max_context, workers)
            for system in systems:
                if wanted and system.key not in wanted and system.skip is None:
                    system.skip = "not run: left out by --systems"
            load = measure(systems, prompts, args)
            measure_perplexity(systems, loaded.tokenizer)
        finally:
            for worker in workers:
                worker.close()

    by_key = {s.key: s for s in systems}
    result = {
        "benchmark": "suite",
        "model": "SmolLM2-135M-Instruct",
        "source": f"{gguf.name} (arcompile, transformers and GenAI dequantize it to fp32)",
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": machine(),
        "versions": versions(),
        "threads": args.threads,
        "contexts": args.contexts,
        "prefill_context": (args.prefill_context if args.prefill_context in args.contexts
                            else args.contexts[0]),
        "new_tokens": args.new_tokens,
        "uncached_new_tokens": args.uncached_new_tokens,
        "repeats": args.repeats,
        "prompts": "pydoc_data.topics text (bench/decode_latency.py prompt_ids)",
        "perplexity_text": f"{HELD_TOKENS} held-out pydoc_data tokens (the quantization gate's), "
                           "one teacher-forced forward pass",
        "wall_s": None,
        "load_average_per_repeat": load,
        "systems": {s.key: summary(s, by_key.get(REFERENCE), by_key.get(BASELINE),
                                   [by_key[k] for k in PAIRED[1] if k in by_key])
                    for s in systems},
    }
    result["wall_s"] = round(time.perf_counter() - started, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "suite.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (out / "suite.md").write_text(table)
    print(table)
    print(f"wrote {out / 'suite.json'} and {out / 'suite.md'} ({result['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
