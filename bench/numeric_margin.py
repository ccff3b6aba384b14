"""How far the numeric check keeps a wrong rewrite from a correct one (arcompile/passes/
numeric_check.py), on SmolLM2, under each kernel set torch can pick on this CPU.

For each ``ATEN_CPU_CAPABILITY`` (``default``, ``avx2``, ``avx512`` where the CPU has it) a
child process loads SmolLM2, runs the default pipeline and measures, on the KV-cache proof's
own random tokens (B = 2, prefix 3 of 8):

- ``old_check``: the float32 proof as it was (max |Δlogit|, held to an absolute 1e-4);
- ``correct``: the float64 proof (max |Δlogit| and its fraction of the logits' magnitude);
- ``positions_off_by_one``: the cached step placing the tokens after the prefix one position
  too far (``past_length + 1`` fed to its positions whenever it is not 0);
- ``mask_one_column_wide``: every attention seeing one token past the causal diagonal.

The margin is the smaller wrong figure over the correct one (relative gaps). Writes
``bench/results/numeric_margin.json``:

    python bench/numeric_margin.py [--capabilities default,avx2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from arcompile.ir.cached_step import cached_decode
from arcompile.ir.graph import Graph  # noqa: E402
from arcompile.ir.ops import register  # noqa: E402
from arcompile.passes.insert_kv_cache import rewrite  # noqa: E402
from arcompile.passes.numeric_check import (  # noqa: E402
    CHECK_DTYPE,
    EXACT,
    gap,
    relative_gap,
    run_exact,
)

WIDE_ATTENTION = "arc.attention_one_column_wide"  # registered here only: a wrong rewrite


@register(WIDE_ATTENTION)
def _attention_one_column_wide(query, key, value, *, num_heads, num_kv_heads, head_dim, scale,
                               softmax_dtype="float32", **_attrs):
    """arc.attention whose causal mask lets row i see key i + 1 too: a deliberate bug."""
    work = getattr(torch, softmax_dtype)
    q, k, v = (t.to(work) for t in (query, key, value))
    length, source = q.shape[-2], k.shape[-2]
    mask = torch.ones(length, source, dtype=torch.bool).tril(source - length + 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                         enable_gqa=num_heads != num_kv_heads)
    return out.to(query.dtype)


def positions_off_by_one(cached: Graph) -> Graph:
    """A copy of the cached step that places the tokens after a cached prefix one position
    too far (``past_length + 1`` whenever ``past_length > 0``). A shift of every position
    alike would be no bug for rotary models, whose attention sees only relative positions."""
    work = cached.copy()
    name = work.meta["kv_cache"].past_length
    past = next(v for v in work.inputs if v.name == name)
    uses = list(past.uses())
    cached_any = work.add_op("aten.gt.Scalar", {"self": past, "other": 0},
                             [(torch.bool, past.shape)], origin="wrong/positions").output
    shifted = work.add_op("aten.add.Tensor", {"self": past, "other": cached_any},
                          [(past.dtype, past.shape)], origin="wrong/positions").output
    for node, port in uses:
        work.set_input(node, port, shifted)
    return work


def mask_one_column_wide(graph: Graph) -> Graph:
    """A copy of the fused (uncached) graph whose attentions see one future token."""
    work = graph.copy()
    for node in work.nodes():
        if node.op == "arc.attention":
            node.op = WIDE_ATTENTION
    return work


def measure(graph: Graph, vocab: int, length: int = 8, split: int = 3, batch: int = 2,
            seed: int = 0) -> dict:
    """The figures of the module docstring for a fused, uncached ``graph``."""
    cached = graph.copy()
    rewrite(cached, "insert_kv_cache")
    tokens = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
    chunks = [tokens[:, :split], tokens[:, split:]]

    def figures(got, want) -> dict:
        return {"max_abs": gap(got, want), "relative": relative_gap(got, want)}

    full32 = cached_decode_full(graph, tokens, None)
    full64 = cached_decode_full(graph, tokens, CHECK_DTYPE)
    steps32 = torch.cat(cached_decode(cached, chunks), dim=1)
    steps64 = torch.cat(cached_decode(cached, chunks, compute_dtype=CHECK_DTYPE), dim=1)
    shifted = torch.cat(cached_decode(positions_off_by_one(cached), chunks,
                                      compute_dtype=CHECK_DTYPE), dim=1)
    wide = run_exact(mask_one_column_wide(graph), [tokens])[0]
    out = {
        "old_check": {**figures(steps32, full32), "tolerance_abs": 1e-4},
        "correct": figures(steps64, full64),
        "positions_off_by_one": figures(shifted, full64),
        "mask_one_column_wide": figures(wide, full64),
        "tolerance_relative": EXACT,
    }
    wrong = min(out["positions_off_by_one"]["relative"], out["mask_one_column_wide"]["relative"])
    out["margin"] = wrong / max(out["correct"]["relative"], 1e-300)
    return out


def cached_decode_full(graph: Graph, tokens: torch.Tensor, dtype) -> torch.Tensor:
    from arcompile.ir.interpreter import run_graph

    return run_graph(graph, [tokens], compute_dtype=dtype)[0]


def capabilities() -> list[str]:
    """The kernel sets torch can use here: default and avx2 on any x86-64 CPU this project
    runs on, avx512 where the CPU has it."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    found = ["default"] + (["avx2"] if " avx2" in flags else [])
    avx512 = all(f" {f}" in flags for f in ("avx512f", "avx512bw", "avx512vl", "avx512dq"))
    return found + (["avx512"] if avx512 else [])


def _child() -> None:
    """One capability: SmolLM2's figures as JSON on stdout."""
    from arcompile.frontend.from_export import from_exported_program
    from arcompile.frontend.load import find_smollm2_gguf, load_model
    from arcompile.passes import PassManager, build_pipeline

    loaded = load_model(str(find_smollm2_gguf()), log=lambda _m: None)
    graph = from_exported_program(loaded.program, name="smollm2")
    PassManager(build_pipeline("default")).run(graph)
    figures = measure(graph, int(loaded.config["vocab_size"]))
    figures["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    print(json.dumps(figures))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--capabilities", default=None,
                    help="comma-separated ATEN_CPU_CAPABILITY values (default: all this CPU has)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/numeric_margin.json"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child()
    caps = args.capabilities.split(",") if args.capabilities else capabilities()
    runs = {}
    for cap in caps:
        env = {**os.environ, "ATEN_CPU_CAPABILITY": cap}
        proc = subprocess.run([sys.executable, __file__, "--child"], env=env,
                              capture_output=True, text=True, check=True)
        runs[cap] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = runs[cap]
        print(f"{cap:8} old check {r['old_check']['max_abs']:.3g} (abs, tolerance 1e-4) | "
              f"float64: correct {r['correct']['relative']:.3g}, positions+1 "
              f"{r['positions_off_by_one']['relative']:.3g}, mask +1 column "
              f"{r['mask_one_column_wide']['relative']:.3g} (relative, tolerance "
              f"{r['tolerance_relative']:g}); margin {r['margin']:.3g}x", flush=True)
    import platform

    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": platform.processor() or platform.machine(),
              "cpu": _cpu_name(), "torch": torch.__version__, "runs": runs}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
