"""Speculative and lossy layer-skip decoding: greedy output identical to plain greedy decoding
(self and n-gram drafting, both cache runtimes, any draft length), the cache correct after
rejected drafts (drafters that are always wrong, or right half the time), the lossy mode
consistent with its own logits, the errors, the CLI, and the real SmolLM2."""

from __future__ import annotations

import numpy as np
import pytest
import tiny_models as tm

import arcompile
from arcompile.cli.main import main
from arcompile.errors import ArcompileError, DecodeError
from arcompile.serve import speculative as spec

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], [42]]


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """Tiny LLaMA engines: routed (skip 0.5) in-place and concat, and plain uncached."""
    folder = tmp_path_factory.mktemp("speculative")
    module = tm.llama()
    out = {}
    for name, kw in (("inplace", {"skip": 0.5}),
                     ("concat", {"skip": 0.5, "kv_cache_runtime": "concat"}),
                     ("unrouted", {}), ("uncached", {"kv_cache": False})):
        arcompile.optimize(module, folder / name, log=None, **kw)
        out[name] = arcompile.load(folder / name)
    return out


def plain(eng, prompt, count):
    return eng.generate(prompt, max_new_tokens=count)


# -- lossless -------------------------------------------------------------------------------
@pytest.mark.parametrize("runtime", ["inplace", "concat"])
@pytest.mark.parametrize("mode", ["self", "ngram", "ngram+self"])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_speculative_equals_plain_greedy(engines, runtime, mode, k):
    eng = engines[runtime]
    for prompt in PROMPTS:
        want = plain(eng, prompt, 20)
        assert eng.generate(prompt, max_new_tokens=20, speculative=mode, draft_tokens=k) == want
        s = eng.speculation
        assert s["mode"] == mode and s["tokens"] == 20 and s["draft_tokens"] == k
        assert 0 <= s["accepted"] <= s["drafted"] <= k * s["rounds"]
        assert s["rounds"] + s["accepted"] == 19  # each round: its accepted drafts + one
        if mode == "self":
            assert s["draft_steps"] == s["drafted"] and s["skipped_blocks"] == 1
        if "self" in mode:
            assert s["min_confidence"] == spec.DEFAULT_MIN_CONFIDENCE["self"]
            assert s["draft_skip"] == spec.SELF_DRAFT_SKIP


@pytest.mark.parametrize("count", [0, 1, 2, 3])
def test_short_decodes_and_eos(engines, count):
    eng = engines["inplace"]
    prompt = PROMPTS[1]
    for mode in ("self", "ngram", "ngram+self"):
        assert eng.generate(prompt, max_new_tokens=count, speculative=mode) == \
            plain(eng, prompt, count)
    greedy = plain(eng, prompt, 12)
    eos = greedy[4]
    want = eng.generate(prompt, max_new_tokens=12, eos_token_id=eos)
    assert want[-1] == eos and len(want) <= 5
    for mode in ("self", "ngram", "ngram+self"):
        assert eng.generate(prompt, max_new_tokens=12, eos_token_id=eos, speculative=mode,
                            draft_tokens=4) == want


def test_stream_yields_the_same_tokens_one_by_one(engines):
    eng = engines["inplace"]
    steps = list(eng.stream(PROMPTS[0], max_new_tokens=10, speculative="self", draft_tokens=3))
    assert all(len(s) == 1 for s in steps)
    assert [s[0] for s in steps] == plain(eng, PROMPTS[0], 10)


def test_draft_engine_of_the_same_model(engines):
    # another build of the same model drafts into the same buffers: it agrees with the full
    # model everywhere, so every draft is accepted; its output is plain greedy's
    routed, draft = engines["inplace"], engines["unrouted"]
    for prompt in PROMPTS:
        want = plain(routed, prompt, 16)
        got = routed.generate(prompt, max_new_tokens=16, speculative="draft", draft=draft,
                              draft_tokens=3)
        assert got == want
        s = routed.speculation
        assert s["acceptance_rate"] == 1.0 and s["draft_engine"] == str(draft.path)
    # its folder works as well, and its own routing can skip while drafting
    assert routed.generate(PROMPTS[0], max_new_tokens=8, speculative="draft",
                           draft=str(engines["inplace"].path), draft_skip=0.5) == \
        plain(routed, PROMPTS[0], 8)
    assert routed.generate(PROMPTS[1], max_new_tokens=12, speculative="ngram+draft",
                           draft=draft) == plain(routed, PROMPTS[1], 12)
    with pytest.raises(DecodeError, match="needs draft="):
        routed.generate(PROMPTS[0], speculative="draft")
    with pytest.raises(DecodeError, match="cannot share this engine's cache: its runtime_cache"):
        routed.generate(PROMPTS[0], speculative="draft", draft=engines["concat"])


# -- the cache after rejected drafts ----------------------------------------------------------
def _decode_with(eng, prompt, count, draft, k=4):
    """speculative_steps with ``draft``; the tokens, stats, and the cache as it ends."""
    cache = eng._empty_cache(1, len(prompt) + count + 1)
    held = {"cache": cache}
    def keep_trimmed(c, n):  # the concat runtime: keep the trimmed cache to look at
        held["cache"] = [x[:, :, :n] for x in c]
        return held["cache"]

    trim = keep_trimmed if eng._inplace is None else None
    stats = spec.SpeculationStats("test", k)
    tokens = list(spec.speculative_steps(eng._step, cache, prompt, count, draft, k, stats,
                                         trim=trim))
    return tokens, stats, held["cache"]


def _next_logits_match_recomputation(eng, prompt, tokens, cache):
    """One more step on the cache left behind equals the full recomputation's last row."""
    seq = prompt + tokens
    got, _ = eng._step(np.array([[tokens[-1]]]), len(seq) - 1, cache, 1)
    want = eng.logits([seq])[0, -1]
    assert np.abs(got[0, -1] - want).max() < 1e-4


@pytest.mark.parametrize("runtime", ["inplace", "concat"])
def test_always_wrong_drafter(engines, runtime):
    eng = engines[runtime]
    prompt = PROMPTS[1]
    want = plain(eng, prompt, 16)
    vocab = eng.logits([prompt]).shape[-1]

    def wrong(context, past, cache, count):  # never the token greedy decoding picks next
        truth = want[len(context) - len(prompt):]
        return [(truth[i] + 1) % vocab if i < len(truth) else 0 for i in range(count)]

    tokens, stats, cache = _decode_with(eng, prompt, 16, wrong)
    assert tokens == want
    assert stats.accepted == 0 and stats.drafted > 0 and stats.rounds == 15
    _next_logits_match_recomputation(eng, prompt, tokens, cache)


@pytest.mark.parametrize("runtime", ["inplace", "concat"])
def test_half_right_drafter(engines, runtime):
    eng = engines[runtime]
    prompt = PROMPTS[0]
    want = plain(eng, prompt, 17)
    vocab = eng.logits([prompt]).shape[-1]

    def half(context, past, cache, count):  # right, then wrong: one accepted per round
        truth = want[len(context) - len(prompt):] + [0] * count
        return [truth[0], (truth[1] + 1) % vocab][:count]

    tokens, stats, cache = _decode_with(eng, prompt, 17, half)
    assert tokens == want
    assert stats.acceptance_rate == pytest.approx(0.5, abs=0.07)
    assert stats.rounds == 8  # 16 tokens after the prefill's, two per round
    _next_logits_match_recomputation(eng, prompt, tokens, cache)


def test_verifying_logits_equal_full_recomputation_after_rejections(engines):
    # every verifying step's rows (after rejections left stale rows behind) against the
    # logits of the whole sequence recomputed from scratch
    eng = engines["inplace"]
    prompt = PROMPTS[1]
    want = plain(eng, prompt, 12)
    seen = []

    def step(ids, past, cache, keep, skip=None):
        logits, cache = eng._step(ids, past, cache, keep, skip)
        seen.append((ids[0].tolist(), past, logits[0]))
        return logits, cache

    def wrong(context, past, cache, count):
        return [(t + 7) % 512 for t in context[-count:]]

    cache = eng._empty_cache(1, len(prompt) + 13)
    stats = spec.SpeculationStats("test", 3)
    assert list(spec.speculative_steps(step, cache, prompt, 12, wrong, 3, stats)) == want
    for ids, past, rows in seen[1:]:
        context = (prompt + want)[:past]
        full = eng.logits([context + ids])[0, past:]
        assert np.abs(rows - full).max() < 1e-4


# -- lossy ----------------------------------------------------------------------------------
def test_lossy_skip_decodes_its_own_argmax(engines):
    eng = engines["inplace"]
    prompt = PROMPTS[1]
    out = eng.generate(prompt, max_new_tokens=8, skip=True)
    logits = eng.logits([prompt + out[:-1]], skip=True)[0, len(prompt) - 1:]
    assert logits.argmax(-1).tolist() == out
    assert np.abs(eng.logits([prompt], skip=True) - eng.logits([prompt])).max() > 1e-3
    # a fraction: the top of the ranking (one of two blocks here, as the choice)
    assert eng.generate(prompt, max_new_tokens=8, skip=0.5) == out
    assert eng.skip_flags(0.99).tolist() == [True, True]


# -- n-gram lookup --------------------------------------------------------------------------
def test_ngram_lookup():
    # the last 3 tokens (1, 2, 3) recur at the start: what followed them is the draft
    assert spec.ngram_lookup([1, 2, 3, 4, 5, 9, 1, 2, 3], 2) == [4, 5]
    # the most recent occurrence wins over an older one
    assert spec.ngram_lookup([7, 8, 1, 2, 3, 6, 1, 2, 3, 4, 0, 1, 2, 3], 1) == [4]
    # falls back to shorter n-grams: only (3,) recurs
    assert spec.ngram_lookup([3, 5, 6, 9, 3], 3) == [5, 6, 9]
    assert spec.ngram_lookup([1, 2, 3], 4) == []
    # a recent match too near the end to fill the draft: the longest continuation instead
    assert spec.ngram_lookup([4, 4, 4, 4, 4], 3) == [4, 4]


# -- errors ---------------------------------------------------------------------------------
def test_errors(engines):
    routed, unrouted, uncached = engines["inplace"], engines["unrouted"], engines["uncached"]
    with pytest.raises(DecodeError, match="cached engine"):
        uncached.generate([1, 2], speculative="ngram")
    for bad in (0, -1, 1.5, True):
        with pytest.raises(DecodeError, match="draft_tokens"):
            routed.generate([1, 2], speculative="self", draft_tokens=bad)
    with pytest.raises(DecodeError, match="batch 1"):
        routed.generate([[1, 2], [3, 4]], speculative="ngram")
    with pytest.raises(DecodeError, match="greedy"):
        routed.generate([1, 2], speculative="self", do_sample=True)
    with pytest.raises(DecodeError, match="speculative must be"):
        routed.generate([1, 2], speculative="medusa")
    with pytest.raises(DecodeError, match=r"--skip FRACTION\); this engine has neither"):
        unrouted.generate([1, 2], speculative="self")
    with pytest.raises(DecodeError, match="no layer-skip routing"):
        unrouted.generate([1, 2], skip=True)
    for bad in (1.5, 0, -0.2):
        with pytest.raises(DecodeError, match=r"\(0, 1\)"):
            routed.generate([1, 2], skip=bad)
    # n-gram drafting needs only the cache
    assert unrouted.generate([1, 2, 3], max_new_tokens=6, speculative="ngram") == \
        plain(unrouted, [1, 2, 3], 6)


def test_optimize_skip_errors(tmp_path):
    with pytest.raises(ArcompileError, match=r"\(0, 1\)"):
        arcompile.optimize(tm.llama(), tmp_path / "a", log=None, skip=1.0)
    with pytest.raises(ArcompileError, match="no KV cache"):
        arcompile.optimize(tm.llama(), tmp_path / "b", log=None, skip=0.25, kv_cache=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_run_speculative_and_skip(engines, capsys):
    folder = str(engines["inplace"].path)
    want = ",".join(str(t) for t in plain(engines["inplace"], PROMPTS[0], 10))
    for extra in (["--speculative", "self", "--draft-tokens", "3"], ["--speculative", "ngram"]):
        code = main(["run", folder, "--prompt-ids", "5,6,7,8,9,10,11", "--max-new-tokens", "10",
                     *extra])
        out, err = capsys.readouterr()
        assert code == 0 and out.strip() == want
        assert "drafts accepted" in err
    code = main(["run", folder, "--prompt-ids", "5,6,7,8,9,10,11", "--max-new-tokens", "4",
                 "--skip"])
    out, _ = capsys.readouterr()
    assert code == 0
    assert [int(t) for t in out.strip().split(",")] == \
        engines["inplace"].generate(PROMPTS[0], max_new_tokens=4, skip=True)
    with pytest.raises(SystemExit):  # argparse refuses a --skip outside (0, 1)
        main(["run", folder, "--prompt-ids", "1,2", "--skip", "1.5"])


def test_profile_measures_the_decoding_modes(engines):
    from arcompile.cli.profile_measure import decoding_modes
    from arcompile.cli.profile_report import MODE_COLUMNS, _table

    row = decoding_modes(engines["inplace"], PROMPTS[0], 8, PROMPTS[1], draft_tokens=3)
    for mode in ("plain", "spec_ngram", "spec_self", "skip"):
        assert row[f"{mode}_tokens_per_s"] > 0
    assert row["spec_self_identical"] and row["spec_ngram_identical"]
    assert 0 <= row["spec_self_acceptance"] <= 1 and row["skip_blocks"] == 1
    assert row["skip_perplexity"] > 0
    assert "spec_self_tokens_per_s" not in decoding_modes(engines["unrouted"], PROMPTS[0], 4,
                                                          PROMPTS[1])
    assert decoding_modes(engines["uncached"], PROMPTS[0], 4, PROMPTS[1]) == {}
    lines = _table(MODE_COLUMNS, [{"pass": "skip_ffn", **row}])
    assert "self accept" in lines[0] and "yes" in lines[2]


# -- the real model ---------------------------------------------------------------------------
def test_smollm2_self_speculative_equals_greedy(smollm2, tmp_path):
    from arcompile.eval import heldtext

    arcompile.optimize(smollm2, tmp_path / "engine", log=None, skip=0.25)
    eng = arcompile.load(tmp_path / "engine")
    meta = eng.skip_routing
    assert len(meta["blocks"]) == 30 and len(meta["chosen"]) == 8
    assert meta["calibration"].endswith("(calibration region)")
    assert meta["perplexity"]["skipped"] > meta["perplexity"]["full"]
    prompt = heldtext.token_ids(smollm2.tokenizer, heldtext.PROMPTS, 48)
    want = plain(eng, prompt, 24)
    for mode in ("self", "ngram", "ngram+self"):
        assert eng.generate(prompt, max_new_tokens=24, speculative=mode) == want
        assert eng.speculation["drafted"] > 0
    assert len(eng.generate(prompt, max_new_tokens=8, skip=True)) == 8
