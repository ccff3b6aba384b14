"""The in-place cached engine (the default runtime; here ``max_context=N``) lowers
``arc.attention_cached`` to GroupQueryAttention over [B, Hkv, capacity, D] buffers that the
engine allocates once per decode (capacity = prompt + new tokens, at most N) and binds as both
past and present every step. Its greedy tokens equal the concat engine's and eager PyTorch's,
its logits at every step equal full recomputation, the buffers are the same objects every step
(no copy), a batch whose rows stop at different steps stays right, and a decode past N is a
DecodeError."""

from __future__ import annotations

import numpy as np
import pytest
import tiny_models as tm
import torch
from test_end_to_end import eager_greedy

import arcompile
from arcompile.cli.main import main
from arcompile.errors import DecodeError

PROMPT = [5, 17, 42, 8, 99, 3]
EQUAL = [[5, 17, 42, 8, 99, 3], [7, 300, 12, 64, 2, 250]]
NAMES = ["llama", "gpt2", "nanogpt"]
MAX = 64


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """name -> (eager module, in-place engine, concat engine), built once per name."""
    def check(report):
        assert report.kv_cache["runtime_cache"] == "inplace"
        assert report.lowering_max_abs_diff <= 1e-4
    return tm.engine_pairs(tmp_path_factory, {"max_context": MAX},
                           {"kv_cache_runtime": "concat"}, check)


@pytest.mark.parametrize("name", NAMES)
def test_inplace_greedy_tokens_equal_concat_and_eager(name, engines):
    module, inplace, concat = engines(name)
    got = inplace.generate(PROMPT, max_new_tokens=32)
    assert got == concat.generate(PROMPT, max_new_tokens=32) == eager_greedy(module, PROMPT, 32)


@pytest.mark.parametrize("name", NAMES)
def test_inplace_logits_at_every_step_equal_full_recomputation(name, engines):
    module, inplace, _ = engines(name)
    seq = list(PROMPT[:4])
    buffers = inplace._empty_cache(1)  # capacity: max_context by default
    assert all(b.shape()[0] == 1 and b.shape()[2] == MAX for b in buffers)
    logits, pasts = inplace._step(np.array([seq]), 0, buffers)
    for step in range(17):  # the prefill, then 16 single-token steps
        with torch.no_grad():
            full = module(torch.tensor([seq])).numpy()
        if step == 0:
            assert np.abs(logits - full).max() <= 1e-4
        diff = float(np.abs(logits[:, -1] - full[:, -1]).max())
        assert diff <= 1e-4, f"step {step}: |Δlogit| {diff:.3g}"
        token = int(logits[0, -1].argmax())
        logits, pasts = inplace._step(np.array([[token]]), len(seq), pasts)
        assert all(p is b for p, b in zip(pasts, buffers))  # the same buffers, never copied
        seq.append(token)


def test_manifest_records_the_inplace_cache(engines):
    _, inplace, concat = engines("llama")
    assert inplace.manifest["kv_cache"]["runtime_cache"] == "inplace"
    assert inplace.manifest["kv_cache"]["max_context"] == MAX == inplace.max_context
    assert concat.manifest["kv_cache"]["runtime_cache"] == "concat"
    assert concat.manifest["kv_cache"]["max_context"] == 128 == concat.max_context  # config


def test_buffers_hold_the_prompt_and_new_tokens_only(engines):
    _, inplace, _ = engines("nanogpt")
    seen = []
    inner = inplace._empty_cache

    def spy(batch, capacity=None):
        seen.append((batch, capacity))
        return inner(batch, capacity)
    inplace._empty_cache = spy
    try:
        inplace.generate(EQUAL, max_new_tokens=5)
    finally:
        del inplace._empty_cache
    assert seen == [(2, 6 + 5)]
    assert inner(1, 1000)[0].shape()[2] == MAX  # capped at max_context


def test_batch_with_a_row_stopping_early(engines):
    module, inplace, concat = engines("llama")
    want = [eager_greedy(module, p, 12) for p in EQUAL]
    eos = want[1][0]  # row 1 stops at once, row 0 decodes on (row 1 kept in the buffers)
    assert eos not in want[0]
    got = inplace.generate(EQUAL, max_new_tokens=12, eos_token_id=eos)
    assert got == concat.generate(EQUAL, max_new_tokens=12, eos_token_id=eos)
    assert got == [want[0], [eos]]


def test_decoding_past_max_context_is_a_decode_error(engines):
    _, inplace, _ = engines("gpt2")
    with pytest.raises(DecodeError, match=f"maximum context of {MAX}"):
        inplace.generate(PROMPT, max_new_tokens=MAX - len(PROMPT) + 1)
    assert len(inplace.generate(PROMPT, max_new_tokens=MAX - len(PROMPT))) == MAX - len(PROMPT)
    with pytest.raises(DecodeError, match="cache capacity"):  # the step itself refuses too
        inplace._step(np.array([[1, 2]]), MAX - 1, inplace._empty_cache(1))


def test_cli_inplace(tmp_path, capsys):
    module = tm.gpt2()
    path = tm.trace_torchscript(module, tmp_path / "gpt2.pt")
    code = main(["optimize", str(path), "-o", str(tmp_path / "engine"), "--max-context", "32"])
    assert code == 0, capsys.readouterr().err
    eng = arcompile.load(tmp_path / "engine")
    assert eng.manifest["kv_cache"]["runtime_cache"] == "inplace" and eng.max_context == 32
    prompt = [5, 17, 42, 8]
    assert eng.generate(prompt, max_new_tokens=10) == eager_greedy(module, prompt, 10)


def test_kept_binding_follows_new_buffers_shapes_and_stops(engines):
    """The step keeps its I/O binding on the decode's buffers (only tokens and lengths are
    rebound): a new decode, a stream stopped early, a batch of two prompt lengths stepped in
    turn and logits() in between all give what a fresh engine gives, and the step itself
    holds no decode's state (test_engine_concurrency.py: the buffers go with the decode)."""
    module, inplace, concat = engines("llama")
    want = concat.generate(PROMPT, max_new_tokens=12)
    stream = inplace.stream(PROMPT, max_new_tokens=12)
    assert [next(stream)[0] for _ in range(3)] == want[:3]
    stream.close()  # stopped early: the next decode gets new buffers and a new binding
    rows = [PROMPT, PROMPT[:4]]  # two cache groups, stepped in turn
    assert inplace.generate(rows, max_new_tokens=12) == concat.generate(rows, max_new_tokens=12)
    full = inplace.logits([PROMPT + want[:-1]])  # every row: ORT's own output array
    assert full.shape[1] == len(PROMPT) + len(want) - 1
    assert list(full[0, len(PROMPT) - 1:].argmax(-1)) == want
    first = inplace.generate(PROMPT, max_new_tokens=12)
    assert first == want and inplace.generate(PROMPT, max_new_tokens=12) == want
    assert set(vars(inplace._inplace)) == {  # its configuration only, no decode's state
        "session", "tokens", "past_length", "logits", "logits_to_keep", "pasts", "presents",
        "max_context", "defaults"}
