"""``arcompile profile``: what every pass buys in latency, memory and accuracy.

The model goes through ``optimize`` as usual, with one more pass-manager hook
(``ProfileHook``): before the first pass and after every pass it lowers the graph as it stands
into an engine directory (``compile.write_engine``) and measures that engine in a process of
its own (``profile_measure``) on the same prompts. Nothing in the passes knows about it, so a
new pass appears in the profile without extra work. Each row holds:

- the pass's compile time and the graph's size (nodes);
- prefill ms (a prompt of ``prompt_tokens`` in, first token out) and decode ms/token p50 and
  p90 over ``decode_tokens`` tokens — rows before ``insert_kv_cache`` decode by recomputing
  the prefix, rows after it with the cache;
- peak resident memory of the measuring process and the engine's size on disk;
- accuracy against eager PyTorch: max |Δlogit| on the prompt, greedy agreement over
  ``agreement_tokens`` tokens, perplexity on held-out text (``heldtext.HELD``).

Models without a tokenizer are measured on seeded random token ids, and the report says so.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from arcompile import progress
from arcompile.compiler.optimize import optimize
from arcompile.compiler.options import TransformOptions
from arcompile.compiler.write_engine import write_engine
from arcompile.errors import ArcompileError
from arcompile.eval import heldtext
from arcompile.eval.metrics import perplexity
from arcompile.frontend.from_export import from_exported_program
from arcompile.frontend.load import LoadedModel, load_model
from arcompile.ir.interpreter import run_graph
from arcompile.passes import build_pipeline
from arcompile.passes.manager import Hook, PassRecord


class ProfileHook(Hook):
    """Measures the graph before the first pass ("traced") and after every pass."""

    def __init__(self, measure: Callable[[Any, str, PassRecord | None], dict]):
        self.measure = measure
        self.rows: list[dict] = []

    def before(self, p, graph) -> None:
        if not self.rows:
            self.rows.append(self.measure(graph, "traced", None))

    def after(self, p, graph, record: PassRecord) -> None:
        self.rows.append(self.measure(graph, p.name, record))


def profile(model: Any, passes: str | list[str] = "default", kv_cache: bool = True,
            output_dir: str | Path | None = None, prompt_tokens: int = 128,
            decode_tokens: int = 128, agreement_tokens: int = 64, held_tokens: int = 512,
            repeats: int = 3, threads: int | None = None,
            log: Callable[[str], None] | None = print, **options: Any) -> dict:
    """Profile ``model`` through ``passes``; returns the report (see ``profile_report``).

    ``output_dir``: keep the final engine there (default: a temporary folder).
    ``options``: optimize's options that change what the engine computes
    (``TransformOptions``: ``quantize="int4"``, ``group_size``, ``quant_method``, ...); the
    quantizing passes then get rows of their own and the gate's figures (perplexity, greedy
    agreement with the unquantized graph) go into the report.
    ``skip`` (layer-skip routing) passes through the same way: its row and every later one
    measure the lossy mode and self-speculative decoding too (``decoding_modes``).
    """
    opts = TransformOptions.from_keywords(options, "profile")  # before the slow part
    say = log or (lambda _msg: None)
    for name, n in (("prompt_tokens", prompt_tokens), ("decode_tokens", decode_tokens),
                    ("agreement_tokens", agreement_tokens), ("held_tokens", held_tokens)):
        if n < 2:
            raise ArcompileError(f"{name} must be at least 2, got {n}")
    total_rows = (len(build_pipeline(passes)) + 1 + (4 if kv_cache else 0)
                  + {None: 0, "w8a8": 3}.get(opts.quantize, 2)
                  + (1 if opts.kv_cache_dtype == "int8" else 0)
                  + (1 if opts.skip else 0))
    loaded = model if isinstance(model, LoadedModel) else load_model(model, log=say)
    say("computing the eager PyTorch reference")
    with progress.step("eager PyTorch reference"):
        ref = _reference(loaded, prompt_tokens, agreement_tokens, held_tokens)

    with tempfile.TemporaryDirectory(prefix="arcompile-profile-") as tmp:
        work = Path(tmp)
        np.save(work / "reference_logits.npy", ref["logits"])
        request = {"threads": threads, "repeats": repeats, "prompt": ref["prompt"],
                   "decode_tokens": decode_tokens, "greedy": ref["greedy"],
                   "reference_logits": str(work / "reference_logits.npy"), "held": ref["held"]}

        def measure(graph, name: str, record: PassRecord | None) -> dict:
            index = len(hook.rows) + 1
            when = "as" if record is None else "after"
            say(f"[{index}/{max(index, total_rows)}] measuring the engine {when} {name} "
                f"({len(graph)} nodes) ...")
            start = time.perf_counter()
            folder = work / f"{index:02d}-{name}"
            with progress.step(f"profile row {index}/{max(index, total_rows)}: {name}"):
                write_engine(graph, folder, loaded, [])
                lower_s = time.perf_counter() - start
                with progress.step("measuring (worker process)", echo=False):
                    measured = _run_worker({**request, "engine": str(folder)})
            row = {"pass": name, "nodes": len(graph),
                   "compile_s": record.seconds if record else 0.0, "lower_s": lower_s,
                   "kv_cache": graph.meta.get("kv_cache") is not None,
                   "engine_mb": sum(f.stat().st_size for f in folder.rglob("*")
                                    if f.is_file()) / 2**20,
                   **measured}
            say(f"      prefill {row['prefill_ms']:.1f} ms, decode {row['decode_ms_p50']:.1f} "
                f"ms/token, max|Δlogit| {row['max_abs_logit_diff']:.2g}, "
                f"ppl {row['perplexity']:.3f}")
            _remove(folder)
            return row

        hook = ProfileHook(measure)
        final = Path(output_dir) if output_dir else work / "final"
        report = optimize(loaded, final, passes=passes, kv_cache=kv_cache, hooks=[hook],
                          log=say, **opts.given())
    return {
        "model": loaded.config.get("name") or Path(str(loaded.source)).name,
        "source": str(loaded.source),
        "created": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "settings": {"passes": passes, "kv_cache": kv_cache, **opts.given(),
                     "prompt_tokens": prompt_tokens,
                     "decode_tokens": decode_tokens, "agreement_tokens": agreement_tokens,
                     "held_tokens": held_tokens, "repeats": repeats, "threads": threads},
        "text": ref["text"],
        "reference": {"system": ref["system"], "perplexity": ref["perplexity"]},
        "kv_cache_refused": report.kv_cache_refused,
        "quantization": report.quantization,
        "engine": str(output_dir) if output_dir else None,
        "rows": hook.rows,
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "processor": platform.processor() or platform.machine()},
    }


def _reference(loaded, prompt_tokens: int, agreement_tokens: int, held_tokens: int) -> dict:
    """Eager PyTorch on the profile's prompts: logits, greedy tokens, perplexity. A file that
    holds no eager module (torch.export, TorchScript) is run as traced, op by op, by the
    reference interpreter (torch ops, no pass applied), and the report says so."""
    if loaded.tokenizer is not None:
        text = "pydoc_data.topics (heldtext.PROMPTS for prompts, heldtext.HELD for perplexity)"
        prompt = heldtext.token_ids(loaded.tokenizer, heldtext.PROMPTS, prompt_tokens)
        held = heldtext.token_ids(loaded.tokenizer, heldtext.HELD, held_tokens)
    else:
        text = "seeded random token ids (the model has no tokenizer)"
        vocab = int(loaded.config.get("vocab_size") or 0) or _vocab(loaded)
        gen = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, vocab, (prompt_tokens,), generator=gen).tolist()
        held = torch.randint(0, vocab, (held_tokens,), generator=gen).tolist()
    module, system = _eager(loaded)
    with torch.no_grad():
        logits = module(torch.tensor([prompt])).float()
        greedy, seq = [], list(prompt)
        step = logits
        for _ in range(agreement_tokens):
            greedy.append(int(step[0, -1].argmax()))
            seq.append(greedy[-1])
            if len(greedy) < agreement_tokens:
                step = module(torch.tensor([seq])).float()
        held_logits = module(torch.tensor([held])).float()[0].numpy()
    return {"prompt": prompt, "held": held, "greedy": greedy, "text": text, "system": system,
            "logits": logits.numpy(), "perplexity": perplexity(held_logits, held)}


def _eager(loaded) -> tuple[Callable, str]:
    if loaded.module is not None:
        return loaded.module, "eager PyTorch"
    graph = from_exported_program(loaded.program, name="reference")
    return (lambda x: run_graph(graph, [x])[0],
            "the traced graph in arcompile's reference interpreter (torch ops, no pass "
            "applied; the source file holds no eager module)")


def _vocab(loaded) -> int:
    forward, _ = _eager(loaded)
    with torch.no_grad():
        return int(forward(torch.zeros((1, 1), dtype=torch.int64)).shape[-1])


def _run_worker(request: dict) -> dict:
    done = subprocess.run([sys.executable, "-m", "arcompile.cli.profile_measure"],
                          input=json.dumps(request), capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ArcompileError(f"measuring {request['engine']} failed: {last}")
    return json.loads(done.stdout)


def _remove(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
