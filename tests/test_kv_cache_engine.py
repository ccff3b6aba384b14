"""The opt-in cached engine: ``optimize(..., kv_cache=True)`` / ``arcompile optimize
--kv-cache`` inserts the KV cache after the checked pipeline; the engine prefills then decodes
one token per step with the presents fed back. Its greedy tokens equal the uncached engine's
and eager PyTorch's, its logits at every step equal full recomputation, a batch of
equal-length prompts uses the cache, a ragged batch falls back to recomputation, and a model
the pass refuses still gets a working uncached engine with the reason recorded."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

import arcompile
import tiny_models as tm
from arcompile.cli import main
from arcompile.errors import DecodeError
from arcompile.runtimes.engine_dir import MANIFEST
from test_end_to_end import eager_greedy
from test_insert_kv_cache import TinyAttention

PROMPT = [5, 17, 42, 8, 99, 3]
EQUAL = [[5, 17, 42, 8, 99, 3], [7, 300, 12, 64, 2, 250]]
RAGGED = [[5, 17, 42, 8, 99, 3], [7, 300, 12]]
NAMES = ["gpt2", "llama", "gpt_neox", "opt", "nanogpt"]


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """name -> (eager module, cached engine, uncached engine), built once per name."""
    built: dict = {}

    def get(name: str):
        if name not in built:
            folder = tmp_path_factory.mktemp(name)
            module, source = tm.model_and_source(name, folder)
            report = arcompile.optimize(source, folder / "cached", kv_cache=True, log=None)
            assert report.kv_cache is not None and report.kv_cache_refused is None
            arcompile.optimize(source, folder / "plain", log=None)
            built[name] = (module, arcompile.load(folder / "cached"),
                           arcompile.load(folder / "plain"))
        return built[name]
    return get


class CountSteps:
    """Wraps an engine's cached step to record the (T, past_length) of every call."""

    def __init__(self, eng):
        self.calls: list[tuple[int, int]] = []
        self.inner = eng._step

        def step(ids, past_length, pasts):
            self.calls.append((ids.shape[1], past_length))
            return self.inner(ids, past_length, pasts)
        eng._step = step
        self.eng = eng

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.eng._step = self.inner


# -- tokens: cached == uncached == eager ---------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_cached_greedy_tokens_equal_uncached_and_eager(name, engines):
    module, cached, plain = engines(name)
    assert cached.kv_cache and not plain.kv_cache
    with CountSteps(cached) as steps:
        got = cached.generate(PROMPT, max_new_tokens=32)
    # one prefill of the prompt, then 31 single-token steps over a growing cache
    assert steps.calls == [(len(PROMPT), 0)] + [(1, len(PROMPT) + i) for i in range(31)]
    assert got == plain.generate(PROMPT, max_new_tokens=32) == eager_greedy(module, PROMPT, 32)


def test_manifest_describes_the_cache(engines):
    _, cached, plain = engines("llama")
    m = cached.manifest["kv_cache"]
    assert m["logits"] == "logits" == cached.manifest["outputs"][0]["name"]
    assert m["layers"] == 2 and m["num_kv_heads"] == 2 and m["head_dim"] == 16
    assert m["past_length"] == "past_length" and m["tokens"] == "input_ids"
    assert m["past"] == [["past_key_0", "past_value_0"], ["past_key_1", "past_value_1"]]
    assert m["present"] == [["present_key_0", "present_value_0"],
                            ["present_key_1", "present_value_1"]]
    inputs = {i["name"]: i["shape"] for i in cached.manifest["inputs"]}
    assert inputs["past_key_0"] == ["B", 2, "P", 16]
    outputs = {o["name"]: o["shape"] for o in cached.manifest["outputs"]}
    assert outputs["present_value_1"] == ["B", 2, "P + T", 16]
    names = [p["name"] for p in cached.manifest["passes"]]
    assert names[-2:] == ["insert_kv_cache", "dce"]
    assert plain.manifest["kv_cache"] is None and "kv_cache_refused" not in plain.manifest


# -- numbers: logits at each cached step against full recomputation ------------------------
@pytest.mark.parametrize("name", ["llama", "opt", "gpt_neox"])
def test_logits_at_every_cached_step_equal_full_recomputation(name, engines):
    module, cached, _ = engines(name)
    seq = list(PROMPT[:4])
    logits, pasts = cached._step(np.array([seq]), 0, cached._empty_cache(1))
    for step in range(17):  # the prefill, then 16 single-token steps
        with torch.no_grad():
            full = module(torch.tensor([seq])).numpy()
        if step == 0:
            assert np.abs(logits - full).max() <= 1e-4
        diff = float(np.abs(logits[:, -1] - full[:, -1]).max())
        assert diff <= 1e-4, f"step {step}: |Δlogit| {diff:.3g}"
        token = int(logits[0, -1].argmax())
        assert token == int(full[0, -1].argmax())
        logits, pasts = cached._step(np.array([[token]]), len(seq), pasts)
        seq.append(token)
        assert pasts[0].shape[2] == len(seq)


def test_logits_of_a_cached_engine_are_one_prefill(engines):
    module, cached, plain = engines("opt")
    with CountSteps(cached) as steps:
        got = cached.logits(EQUAL)
    assert steps.calls == [(6, 0)]
    with torch.no_grad():
        assert np.abs(got - module(torch.tensor(EQUAL)).numpy()).max() <= 1e-4
    assert np.abs(got - plain.logits(EQUAL)).max() <= 1e-4


# -- batches ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_batch_of_equal_length_prompts_uses_the_cache(name, engines):
    module, cached, _ = engines(name)
    with CountSteps(cached) as steps:
        got = cached.generate(EQUAL, max_new_tokens=16)
    assert steps.calls[0] == (6, 0) and steps.calls[1:] == [(1, 6 + i) for i in range(15)]
    assert got == [eager_greedy(module, p, 16) for p in EQUAL]


def test_ragged_batch_falls_back_to_recomputation(engines):
    module, cached, _ = engines("gpt_neox")
    with CountSteps(cached) as steps:
        got = cached.generate(RAGGED, max_new_tokens=12)
    # every step a prefill of the whole (right-padded) prefix: the recompute loop
    assert steps.calls == [(6 + i, 0) for i in range(12)]
    assert got == [cached.generate(p, max_new_tokens=12) for p in RAGGED]
    assert got == [eager_greedy(module, p, 12) for p in RAGGED]


def test_cached_rows_stop_at_eos_and_leave_the_batch(engines):
    _, cached, plain = engines("nanogpt")
    free = plain.generate(EQUAL, max_new_tokens=8)
    eos = free[0][2]
    out = cached.generate(EQUAL, max_new_tokens=8, eos_token_id=eos)
    assert out == plain.generate(EQUAL, max_new_tokens=8, eos_token_id=eos)
    assert out[0] == free[0][: free[0].index(eos) + 1]
    # sampling is reproducible with a seed on the cached path too
    kw = dict(max_new_tokens=10, do_sample=True, temperature=50.0)
    assert cached.generate(PROMPT, seed=7, **kw) == cached.generate(PROMPT, seed=7, **kw)


def test_max_context_is_checked_on_the_cached_path(engines):
    _, cached, _ = engines("llama")
    limit = cached.max_context
    assert limit == 128
    with pytest.raises(DecodeError, match="maximum context of 128"):
        cached.generate([1] * 100, max_new_tokens=29)
    with pytest.raises(DecodeError, match="maximum context"):
        cached.logits([[1] * 129])


# -- refusal: bidirectional attention keeps a working uncached engine ------------------------
def test_refusal_writes_a_working_uncached_engine(tmp_path, capsys):
    module = TinyAttention(causal=False)  # bidirectional: never fused, so never cached
    report = arcompile.optimize(module, tmp_path / "engine", kv_cache=True, log=print)
    printed = capsys.readouterr().out
    assert report.kv_cache is None
    assert "unfused attention remains" in report.kv_cache_refused
    assert "KV cache not inserted" in printed and "unfused attention remains" in printed
    manifest = json.loads((tmp_path / "engine" / MANIFEST).read_text())
    assert manifest["kv_cache"] is None
    assert "unfused attention remains" in manifest["kv_cache_refused"]
    assert len(manifest["inputs"]) == 1 and manifest["outputs"][0]["name"] == "logits"
    eng = arcompile.load(tmp_path / "engine")
    assert not eng.kv_cache
    x = torch.tensor([PROMPT])
    with torch.no_grad():
        assert np.abs(eng.logits(x.tolist()) - module(x).numpy()).max() <= 1e-4
    # bidirectional: the next token depends on the whole sequence, recomputed every step
    assert eng.generate(PROMPT, max_new_tokens=6) == eager_greedy(module, PROMPT, 6)


# -- the CLI flag ----------------------------------------------------------------------------
def test_cli_kv_cache_flag(tmp_path, capsys):
    module = tm.gpt2()
    path = tm.trace_torchscript(module, tmp_path / "gpt2.pt")
    code = main(["optimize", str(path), "-o", str(tmp_path / "engine"), "--kv-cache"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "kv cache: on (2 layers)" in out and "insert_kv_cache" in err
    assert arcompile.load(tmp_path / "engine").kv_cache
    code = main(["run", str(tmp_path / "engine"), "--prompt-ids", "5,17,42,8",
                 "--max-new-tokens", "10"])
    out, _ = capsys.readouterr()
    assert code == 0
    assert [int(t) for t in out.strip().split(",")] == eager_greedy(module, [5, 17, 42, 8], 10)
    # without the flag: no cache, as before
    assert main(["optimize", str(path), "-o", str(tmp_path / "plain")]) == 0
    assert "kv cache" not in capsys.readouterr().out
    assert not arcompile.load(tmp_path / "plain").kv_cache


# -- the real SmolLM2 ------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_cached_engine_equals_uncached(smollm2, smollm2_engine, tmp_path):
    from test_smollm2 import pydoc_text

    report = arcompile.optimize(smollm2, tmp_path / "cached", kv_cache=True, log=None)
    assert report.kv_cache["layers"] == 30 and report.kv_cache["num_kv_heads"] == 3
    cached, plain = arcompile.load(tmp_path / "cached"), arcompile.load(smollm2_engine)
    prompt = smollm2.tokenizer.encode(pydoc_text(2000, 200))[:40]
    timings = {}
    tokens = {}
    for label, eng in (("cached", cached), ("uncached", plain)):
        eng.generate(prompt, max_new_tokens=2)  # warm up
        start = time.perf_counter()
        tokens[label] = eng.generate(prompt, max_new_tokens=32)
        timings[label] = (time.perf_counter() - start) * 1000 / 32
    print(f"\nSmolLM2 decode, prompt {len(prompt)} + 32 tokens: cached "
          f"{timings['cached']:.1f} ms/token, uncached {timings['uncached']:.1f} ms/token")
    assert tokens["cached"] == tokens["uncached"]
    assert len(tokens["cached"]) == 32
