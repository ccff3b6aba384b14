"""The cached engine, ``optimize``'s default: the KV cache is inserted after the checked
pipeline; the engine prefills (the last position's logits only) then decodes one token per
step. Its greedy tokens equal the uncached engine's (``kv_cache=False``) and eager PyTorch's,
its logits at every one of 64 steps equal full recomputation, a batch of equal-length prompts
shares one cache, prompts of different lengths decode as one cached group per length, and a
model the pass refuses still gets a working uncached engine with the reason recorded."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tiny_models as tm
import torch
from test_end_to_end import eager_greedy
from test_insert_kv_cache import TinyAttention

import arcompile
from arcompile.cli.main import main
from arcompile.errors import DecodeError
from arcompile.runtimes.engine_dir import MANIFEST

PROMPT = [5, 17, 42, 8, 99, 3]
EQUAL = [[5, 17, 42, 8, 99, 3], [7, 300, 12, 64, 2, 250]]
RAGGED = [[5, 17, 42, 8, 99, 3], [7, 300, 12]]
THREE = [[5, 17, 42, 8, 99, 3, 250, 11], [7, 300, 12], [64, 2, 250, 9, 31]]
NAMES = ["gpt2", "llama", "gpt_neox", "opt", "nanogpt"]


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """name -> (eager module, cached engine (the defaults), uncached engine), built once."""
    def check(report):
        assert report.kv_cache is not None and report.kv_cache_refused is None
        assert report.kv_cache["runtime_cache"] == "inplace"
    return tm.engine_pairs(tmp_path_factory, {}, {"kv_cache": False}, check)


class CountSteps:
    """Wraps an engine's cached step to record the (T, past_length) of every call and the
    number of logits rows it returned."""

    def __init__(self, eng):
        self.calls: list[tuple[int, int]] = []
        self.rows: list[int] = []
        self.inner = eng._step

        def step(ids, past_length, pasts, keep=0):
            self.calls.append((ids.shape[1], past_length))
            logits, presents = self.inner(ids, past_length, pasts, keep)
            self.rows.append(logits.shape[1])
            return logits, presents
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
    assert steps.rows == [1] * 32  # the prefill computes the last position's logits only
    assert got == plain.generate(PROMPT, max_new_tokens=32) == eager_greedy(module, PROMPT, 32)


def test_manifest_describes_the_cache(engines):
    _, cached, plain = engines("llama")
    m = cached.manifest["kv_cache"]
    assert m["logits"] == "logits" == cached.manifest["outputs"][0]["name"]
    assert m["layers"] == 2 and m["num_kv_heads"] == 2 and m["head_dim"] == 16
    assert m["past_length"] == "past_length" and m["tokens"] == "input_ids"
    assert m["logits_to_keep"] == "logits_to_keep" and m["max_context"] == 128
    assert m["past"] == [["past_key_0", "past_value_0"], ["past_key_1", "past_value_1"]]
    assert m["present"] == [["present_key_0", "present_value_0"],
                            ["present_key_1", "present_value_1"]]
    inputs = {i["name"]: i["shape"] for i in cached.manifest["inputs"]}
    assert inputs["past_key_0"] == ["B", 2, "P", 16]
    outputs = {o["name"]: o["shape"] for o in cached.manifest["outputs"]}
    assert outputs["present_value_1"] == ["B", 2, "P + T", 16]
    assert outputs["logits"] == ["B", "K", 512]  # K: the rows logits_to_keep asked for
    names = [p["name"] for p in cached.manifest["passes"]]
    assert names[-4:] == ["insert_kv_cache", "dce", "pack_attention", "dce"]
    assert plain.manifest["kv_cache"] is None and "kv_cache_refused" not in plain.manifest


# -- numbers: logits at each cached step against full recomputation ------------------------
def cached_vs_full(cached, full_logits, prompt: list[int], steps: int) -> tuple[float, list]:
    """Greedy-decode ``steps`` tokens through the cached step, comparing each step's logits
    with ``full_logits(seq)`` (the whole sequence recomputed, no cache). Returns the largest
    |Δlogit| and the tokens; asserts the greedy token agrees at every step."""
    seq, worst = list(prompt), 0.0
    buffers = cached._empty_cache(1, len(prompt) + steps)
    logits, pasts = cached._step(np.array([seq]), 0, buffers)
    full = full_logits(seq)
    worst = float(np.abs(logits - full).max())  # the prefill: every position
    for step in range(steps):
        diff = float(np.abs(logits[:, -1] - full[:, -1]).max())
        worst = max(worst, diff)
        token = int(logits[0, -1].argmax())
        assert token == int(full[0, -1].argmax()), f"step {step}: greedy tokens differ"
        seq.append(token)
        if step + 1 < steps:
            logits, pasts = cached._step(np.array([[token]]), len(seq) - 1, pasts, 1)
            full = full_logits(seq)
    return worst, seq[len(prompt):]


@pytest.mark.parametrize("name", NAMES)
def test_logits_at_every_cached_step_equal_full_recomputation(name, engines):
    module, cached, plain = engines(name)

    def eager(seq):
        with torch.no_grad():
            return module(torch.tensor([seq])).numpy()
    worst, tokens = cached_vs_full(cached, eager, PROMPT[:4], 64)
    assert worst <= 1e-4, f"{name}: max |Δlogit| {worst:.3g} over 64 cached steps"
    assert tokens == plain.generate(PROMPT[:4], max_new_tokens=64)


def test_logits_of_a_cached_engine_are_one_prefill(engines):
    module, cached, plain = engines("opt")
    with CountSteps(cached) as steps:
        got = cached.logits(EQUAL)
    assert steps.calls == [(6, 0)] and steps.rows == [6]  # every position's logits
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


def test_ragged_batch_decodes_one_cached_group_per_prompt_length(engines):
    module, cached, _ = engines("gpt_neox")
    with CountSteps(cached) as steps:
        got = cached.generate(RAGGED, max_new_tokens=12)
    # each length its own prefill, then both groups step once per token: never recomputed
    assert steps.calls[:2] == [(6, 0), (3, 0)]
    assert steps.calls[2:] == [c for i in range(11) for c in ((1, 6 + i), (1, 3 + i))]
    assert got == [cached.generate(p, max_new_tokens=12) for p in RAGGED]
    assert got == [eager_greedy(module, p, 12) for p in RAGGED]


@pytest.mark.parametrize("name", NAMES)
def test_batch_of_three_prompts_of_different_lengths_equals_each_alone(name, engines):
    module, cached, plain = engines(name)
    got = cached.generate(THREE, max_new_tokens=16)
    assert got == [cached.generate(p, max_new_tokens=16) for p in THREE]
    assert got == plain.generate(THREE, max_new_tokens=16)
    assert got == [eager_greedy(module, p, 16) for p in THREE]


def test_ragged_batch_with_rows_stopping_at_eos(engines):
    _, cached, plain = engines("llama")
    free = plain.generate(THREE, max_new_tokens=10)
    eos = free[2][1]  # the third row stops early; the others may too
    stop = free[2].index(eos) + 1
    want = plain.generate(THREE, max_new_tokens=10, eos_token_id=eos)
    assert want[2] == free[2][:stop] and stop < 10
    assert cached.generate(THREE, max_new_tokens=10, eos_token_id=eos) == want
    streamed = list(cached.stream(THREE, max_new_tokens=10, eos_token_id=eos))
    assert all(step[2] is None for step in streamed[stop:])


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
    assert limit == 128  # the config's max_position_embeddings: optimize's default
    with pytest.raises(DecodeError, match="maximum context of 128"):
        cached.generate([1] * 100, max_new_tokens=29)
    with pytest.raises(DecodeError, match="maximum context of 128"):  # ragged batches too
        cached.generate([[1] * 100, [2] * 3], max_new_tokens=29)
    with pytest.raises(DecodeError, match="maximum context"):
        cached.logits([[1] * 129])
    assert len(cached.generate([1] * 100, max_new_tokens=28)) == 28


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
    code = main(["optimize", str(path), "-o", str(tmp_path / "engine")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "kv cache: on (2 layers)" in out and "insert_kv_cache" in err
    assert arcompile.load(tmp_path / "engine").kv_cache
    code = main(["run", str(tmp_path / "engine"), "--prompt-ids", "5,17,42,8",
                 "--max-new-tokens", "10"])
    out, _ = capsys.readouterr()
    assert code == 0
    assert [int(t) for t in out.strip().split(",")] == eager_greedy(module, [5, 17, 42, 8], 10)
    # --no-kv-cache: no cache, the prefix recomputed every step
    assert main(["optimize", str(path), "-o", str(tmp_path / "plain"), "--no-kv-cache"]) == 0
    out = capsys.readouterr().out
    assert "kv cache: off" in out and "kv cache: on" not in out
    assert not arcompile.load(tmp_path / "plain").kv_cache


# -- the real SmolLM2 ------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_cached_decode_equals_full_recomputation(smollm2, smollm2_engine, tmp_path):
    """64 greedy steps on real text through the default (cached, in-place) engine: every
    step's logits against the uncached engine recomputing the whole sequence, the tokens
    against the uncached engine's greedy decode."""
    from test_smollm2 import pydoc_text

    report = arcompile.optimize(smollm2, tmp_path / "plain", kv_cache=False, log=None)
    assert report.kv_cache is None
    cached, plain = arcompile.load(smollm2_engine), arcompile.load(tmp_path / "plain")
    m = cached.manifest["kv_cache"]
    assert m["layers"] == 30 and m["num_kv_heads"] == 3 and m["runtime_cache"] == "inplace"
    assert m["max_context"] == 8192 and m["logits_to_keep"] == "logits_to_keep"
    prompt = smollm2.tokenizer.encode(pydoc_text(2000, 200))[:40]
    steps, per_step = 64, []
    seq = list(prompt)
    logits, pasts = cached._step(np.array([seq]), 0, cached._empty_cache(1, len(seq) + steps), 1)
    for step in range(steps):
        per_step.append(logits[0, -1])
        seq.append(int(logits[0, -1].argmax()))
        if step + 1 < steps:
            logits, pasts = cached._step(np.array([seq[-1:]]), len(seq) - 1, pasts, 1)
    # causal: position i of one full forward is the full recomputation of seq[:i + 1]
    full = plain.logits([seq[:-1]])[0, len(prompt) - 1:]
    diffs = np.abs(np.stack(per_step) - full).max(axis=1)
    print(f"\nSmolLM2, 64 cached steps vs full recomputation: max |Δlogit| {diffs.max():.2g}")
    assert diffs.max() <= 1e-4, f"step {int(diffs.argmax())}: |Δlogit| {diffs.max():.3g}"
    assert seq[len(prompt):] == plain.generate(prompt, max_new_tokens=steps)
