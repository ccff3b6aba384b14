"""The numeric check (arcompile/passes/numeric_check.py) on any x86 CPU, and the KV cache that
must never be lost unnoticed (``--kv-cache auto|require|off``, arcompile/uncached.py).

- The float64 interpreter widens inputs, weights and the dtypes ops name.
- A correct rewrite and two deliberately wrong ones (positions off by one, a causal mask one
  column wide) sit at least 1000x apart on each side of the tolerance.
- Under every ``ATEN_CPU_CAPABILITY`` this CPU has, the proofs hold and the engines decode
  the same greedy tokens (tiny model by default, SmolLM2 in the slow part).
- ``--kv-cache require`` fails cleanly; ``auto`` ends with a warning block for a causal model
  left uncached; ``inspect`` and ``run`` say "uncached".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_models as tm
import torch
from test_insert_kv_cache import TinyAttention

import arcompile
from arcompile.cli.main import main
from arcompile.compiler.uncached import UncachedEngineWarning
from arcompile.frontend.from_export import from_exported_program
from arcompile.ir.interpreter import run_graph
from arcompile.passes import PassManager, build_pipeline
from arcompile.passes.numeric_check import EXACT, LOWERING
from bench.numeric_margin import capabilities, measure

ROOT = Path(__file__).resolve().parents[1]
TOKENS = torch.tensor([[5, 17, 42, 8, 99, 3, 250, 77], [1, 2, 3, 4, 5, 6, 7, 8]])  # B = 2: dynamic


def fused_graph(module: torch.nn.Module):
    program = torch.export.export(module, (TOKENS,), dynamic_shapes=(
        {0: torch.export.Dim("B", max=64), 1: torch.export.Dim("T", max=128)},))
    graph = from_exported_program(program, name="tiny")
    PassManager(build_pipeline("default")).run(graph)
    return graph


# -- the float64 interpreter ----------------------------------------------------------------
class CastsAndFactories(torch.nn.Module):
    """``dtype`` named three ways: a cast, a factory, a softmax dtype."""

    def __init__(self, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.emb = torch.nn.Embedding(tm.VOCAB, 16, dtype=dtype)
        self.dtype = dtype

    def forward(self, tokens):
        x = self.emb(tokens).to(self.dtype)
        x = x + torch.ones(16, dtype=self.dtype) / 3
        return torch.softmax(x, dim=-1, dtype=self.dtype) @ self.emb.weight.t()


def test_float64_mode_widens_inputs_weights_and_named_dtypes():
    module = CastsAndFactories().eval()
    program = torch.export.export(module, (TOKENS,))
    graph = from_exported_program(program, name="casts")
    (out32,) = run_graph(graph, [TOKENS])
    (out64,) = run_graph(graph, [TOKENS], compute_dtype=torch.float64)
    assert out32.dtype == torch.float32 and out64.dtype == torch.float64
    with torch.no_grad():
        torch.testing.assert_close(out32, module(TOKENS), rtol=1e-5, atol=1e-6)
        wide = CastsAndFactories(torch.float64)
        wide.emb.weight.copy_(module.emb.weight)
        want = wide(TOKENS)  # eager PyTorch in float64: the same maths
    assert (out64 - want).abs().max() < 1e-12  # float64 all the way, no float32 step left
    assert (out32.double() - want).abs().max() > 1e-12
    with pytest.raises(ValueError, match="float64"):
        run_graph(graph, [TOKENS], compute_dtype=torch.float16)


# -- the margin: a wrong rewrite against a correct one --------------------------------------
@pytest.mark.parametrize("name", ["llama", "gpt2", "opt"])
def test_wrong_rewrites_are_far_above_the_tolerance_and_correct_ones_far_below(name):
    graph = fused_graph(tm.BUILDERS[name]())
    figures = measure(graph, tm.VOCAB)
    correct = figures["correct"]["relative"]
    wrong = min(figures["positions_off_by_one"]["relative"],
                figures["mask_one_column_wide"]["relative"])
    assert correct * 1000 <= EXACT, figures  # float64 rounding only
    assert wrong >= EXACT * 1000, figures  # a bug moves the logits by far more
    assert figures["margin"] >= 1e6, figures


def test_a_wrong_cache_is_refused_by_the_proof():
    """The pass itself, not only the measurement: feed the proof a cached step with its
    positions shifted and it refuses with the float64 figure."""
    from arcompile.passes.insert_kv_cache import InsertKVCache, KVCacheRefused, rewrite
    from bench.numeric_margin import positions_off_by_one

    graph = fused_graph(tm.llama())
    cached = graph.copy()
    rewrite(cached, "insert_kv_cache")
    assert InsertKVCache()._prove(graph, cached) < 1e-9
    with pytest.raises(KVCacheRefused, match="in float64"):
        InsertKVCache()._prove(graph, positions_off_by_one(cached))


# -- every kernel set torch can pick here ---------------------------------------------------
CAPABILITY_SCRIPT = """
import json, sys
import torch
import arcompile
sys.path.insert(0, {tests!r})
import tiny_models as tm
report = arcompile.optimize(tm.llama(), {out!r}, log=None)
engine = arcompile.load({out!r})
print(json.dumps({{"capability": torch.backends.cpu.get_cpu_capability(),
                  "cached": report.kv_cache is not None,
                  "proof": [p.max_abs_diff for p in report.passes if p.name == "insert_kv_cache"],
                  "lowering": report.lowering_max_abs_diff,
                  "tokens": engine.generate([[5, 17, 42, 8], [9, 9, 3]], max_new_tokens=12)}}))
"""


def _under(capability: str, script: str) -> dict:
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_cpu_capability_caches_and_decodes_the_same_tiny_engine(tmp_path):
    runs = {cap: _under(cap, CAPABILITY_SCRIPT.format(tests=str(ROOT / "tests"),
                                                       out=str(tmp_path / cap)))
            for cap in capabilities()}
    assert {"default", "avx2"} <= set(runs) or sys.platform != "linux"
    for cap, run in runs.items():
        assert run["capability"].lower() == cap, (cap, run["capability"])
        assert run["cached"], (cap, run)
        assert run["proof"][0] < 1e-9, (cap, run)
    tokens = {json.dumps(run["tokens"]) for run in runs.values()}
    assert len(tokens) == 1, runs


@pytest.mark.slow
def test_smollm2_under_every_cpu_capability_is_cached_with_the_same_greedy_tokens(
        tmp_path, smollm2_engine):
    """The defect of issue 17: the proof's float32 figure crossed 1e-4 on some kernels and the
    engine came out uncached. Each capability builds SmolLM2 with the defaults; the one this
    process runs under is the session's engine (built once for every SmolLM2 test), the
    others build in a subprocess each."""
    script = """
import json, torch, arcompile
from arcompile.frontend.load import find_smollm2_gguf
report = arcompile.optimize(str(find_smollm2_gguf()), {out!r}, log=None)
engine = arcompile.load({out!r})
ids = engine.encode("The capital of France is")
print(json.dumps({{"capability": torch.backends.cpu.get_cpu_capability(),
                  "cached": report.kv_cache is not None, "refused": report.kv_cache_refused,
                  "proof": [p.max_abs_diff for p in report.passes if p.name == "insert_kv_cache"],
                  "lowering": report.lowering_max_abs_diff,
                  "tokens": engine.generate(ids, max_new_tokens=16)}}))
"""
    import shutil

    native = torch.backends.cpu.get_cpu_capability().lower()
    engine = arcompile.load(smollm2_engine)
    proof = next(p for p in engine.manifest["passes"] if p["name"] == "insert_kv_cache")
    assert engine.kv_cache and proof["max_abs_diff"] < 1e-9
    runs = {native: {"tokens": engine.generate(engine.encode("The capital of France is"),
                                               max_new_tokens=16)}}
    for cap in capabilities():
        if cap == native:
            continue
        out = tmp_path / cap
        runs[cap] = _under(cap, script.format(out=str(out)))
        assert runs[cap]["cached"], runs[cap]
        assert runs[cap]["proof"][0] < 1e-9 and runs[cap]["lowering"] < LOWERING * 35, runs[cap]
        shutil.rmtree(out)  # 0.5 GB each
    assert len(runs) >= 2 or sys.platform != "linux", runs
    assert len({json.dumps(r["tokens"]) for r in runs.values()}) == 1, runs


# -- --kv-cache auto | require | off --------------------------------------------------------
def _export(module: torch.nn.Module, path: Path) -> Path:
    program = torch.export.export(module, (TOKENS,), dynamic_shapes=(
        {0: torch.export.Dim("B", max=64), 1: torch.export.Dim("T", max=64)},))
    torch.export.save(program, str(path))
    return path


def test_require_on_a_bidirectional_model_fails_with_one_line_and_writes_nothing(tmp_path, capsys):
    model = _export(TinyAttention(causal=False), tmp_path / "bidirectional.pt2")
    out = tmp_path / "engine"
    code = main(["optimize", str(model), "-o", str(out), "--kv-cache", "require"])
    _, err = capsys.readouterr()
    assert code == 2
    lines = [l for l in err.splitlines() if l.startswith("arcompile: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "--kv-cache require" in lines[0] and "unfused attention remains" in lines[0]
    assert "nothing was written" in lines[0]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".engine")]


def test_auto_on_a_bidirectional_model_writes_it_uncached_without_the_warning(tmp_path, capsys):
    model = _export(TinyAttention(causal=False), tmp_path / "bidirectional.pt2")
    code = main(["optimize", str(model), "-o", str(tmp_path / "engine")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "engine is UNCACHED" in out
    assert "WITHOUT a KV cache" not in err  # no cache can exist: nothing to warn about


def test_auto_ends_with_a_warning_block_when_a_causal_model_is_left_uncached(tmp_path, capsys):
    # the cleanup preset fuses no attention, so the cache pass refuses a causal model
    model = _export(tm.llama(), tmp_path / "llama.pt2")
    engine = tmp_path / "engine"
    code = main(["optimize", str(model), "-o", str(engine), "--passes", "cleanup"])
    out, err = capsys.readouterr()
    assert code == 0, err
    block = err[err.index("warning: the engine was written WITHOUT a KV cache"):]
    assert "why:" in block and "unfused attention remains" in block  # the reason
    assert "slower" in block  # the expected slowdown
    assert "--kv-cache require" in block and "--explain" in block  # how to proceed
    assert err.rstrip().endswith(block.rstrip())  # it ends the output
    code = main(["inspect", str(engine)])
    out, _ = capsys.readouterr()
    assert code == 0 and "UNCACHED" in out
    code = main(["run", str(engine), "--prompt-ids", "5,17,42", "--max-new-tokens", "3"])
    out, err = capsys.readouterr()
    assert code == 0 and "UNCACHED" in err and len(out.strip().split(",")) == 3
    # the Python API warns too, and require refuses the same model
    with pytest.warns(UncachedEngineWarning, match="WITHOUT a KV cache"):
        report = arcompile.optimize(str(model), tmp_path / "api", passes="cleanup", log=None)
    assert report.kv_cache_warning and report.kv_cache is None
    with pytest.raises(arcompile.ArcompileError, match="--kv-cache require"):
        arcompile.optimize(str(model), tmp_path / "req", passes="cleanup", kv_cache="require",
                           log=None)
    assert not (tmp_path / "req").exists()


def test_off_and_its_alias_write_an_uncached_engine_quietly(tmp_path, capsys):
    model = _export(tm.llama(), tmp_path / "llama.pt2")
    for flag, name in ((["--kv-cache", "off"], "off"), (["--no-kv-cache"], "alias")):
        code = main(["optimize", str(model), "-o", str(tmp_path / name), *flag])
        out, err = capsys.readouterr()
        assert code == 0, err
        assert "kv cache: off" in out and "WITHOUT a KV cache" not in err
        assert not arcompile.load(tmp_path / name).kv_cache
    code = main(["optimize", str(model), "-o", str(tmp_path / "on"), "--kv-cache", "require"])
    out, err = capsys.readouterr()
    assert code == 0 and "kv cache: on (2 layers)" in out, err
    with pytest.raises(arcompile.ArcompileError, match="kv_cache must be one of"):
        arcompile.optimize(str(model), tmp_path / "bad", kv_cache="sometimes", log=None)
