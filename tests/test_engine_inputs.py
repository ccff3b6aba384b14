"""Wrong inputs at the API boundary (``Engine.generate`` / ``stream`` / ``logits``,
``load(threads=)``, ``arcompile run``'s flags) are one-line DecodeErrors (ArcompileErrors)
that name the parameter and the accepted range, raised before any step runs: no raw
TypeError, no ONNX Runtime "internal error", no id wrapping round, no unbounded decode, no
hang on an absurd thread count."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import tiny_models as tm
import torch

import arcompile
from arcompile.cli.main import main
from arcompile.errors import ArcompileError
from arcompile.serve import engine as engine_module

PROMPT = [5, 17, 42, 8]
TOP = tm.VOCAB - 1


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """A tiny LLaMA with the default (in-place) cache, and an uncached engine from a .pt2
    whose manifest names no maximum context (no config, no cache)."""
    folder = tmp_path_factory.mktemp("inputs")
    arcompile.optimize(tm.llama(), folder / "cached", log=None)
    dyn = torch.export.Dim.DYNAMIC
    program = torch.export.export(tm.nanogpt(), (torch.randint(0, tm.VOCAB, (2, 8)),),
                                  dynamic_shapes=({0: dyn, 1: dyn},))
    torch.export.save(program, folder / "nanogpt.pt2")
    arcompile.optimize(str(folder / "nanogpt.pt2"), folder / "uncached", kv_cache=False,
                       log=None)
    return {"cached": arcompile.load(folder / "cached"),
            "uncached": arcompile.load(folder / "uncached"), "folder": folder}


def refused(match: str, fn, *args, **kw) -> str:
    """The DecodeError ``fn`` raises: one line, matching ``match``."""
    with pytest.raises(ArcompileError, match=match) as info:
        fn(*args, **kw)
    assert "\n" not in str(info.value), str(info.value)
    return str(info.value)


@pytest.mark.parametrize("kind", ["cached", "uncached"])
def test_token_ids_outside_the_vocabulary(engines, kind):
    eng = engines[kind]
    assert eng.vocab_size == tm.VOCAB
    for bad in (-1, tm.VOCAB, 10**12):
        row = [5, bad, 7]
        message = refused(rf"token ids must be in \[0, {TOP}\].*got {bad}", eng.generate, row)
        assert "vocabulary" in message
        refused(rf"token ids must be in \[0, {TOP}\]", eng.logits, row)
        refused(rf"token ids must be in \[0, {TOP}\]", eng.generate, [PROMPT, row])
    refused("token ids must be integers", eng.generate, [5, 2.0])
    refused("a mix of both", eng.generate, [[5, 6], 7])


@pytest.mark.parametrize("bad", [2.5, None, "4", True, -1, np.float32(3)])
def test_max_new_tokens_must_be_an_integer(engines, bad):
    for eng in (engines["cached"], engines["uncached"]):
        refused(r"max_new_tokens must be an integer >= 0, got", eng.generate, PROMPT,
                max_new_tokens=bad)
    assert engines["cached"].generate(PROMPT, max_new_tokens=np.int64(3)) == \
        engines["cached"].generate(PROMPT, max_new_tokens=3)


def test_an_engine_without_a_named_context_is_bounded(engines):
    eng = engines["uncached"]
    assert eng.manifest["kv_cache"] is None and "max_position_embeddings" not in eng.config
    assert eng.max_context == engine_module.DEFAULT_MAX_CONTEXT == 2048
    from arcompile.compiler.optimize import DEFAULT_MAX_CONTEXT

    assert DEFAULT_MAX_CONTEXT == engine_module.DEFAULT_MAX_CONTEXT  # optimize's default too
    start = time.perf_counter()
    for count in (10**9, 2048 - len(PROMPT) + 1):
        refused(rf"exceeds the engine's maximum context of 2048 \(max_new_tokens must be in "
                rf"\[0, {2048 - len(PROMPT)}\]", eng.generate, PROMPT, max_new_tokens=count)
    refused("maximum context of 2048", eng.logits, [1] * 2049)
    assert time.perf_counter() - start < 5
    cached = engines["cached"]
    refused(r"max_new_tokens must be in \[0, 124\]", cached.generate, PROMPT,
            max_new_tokens=10**9)


BAD_SAMPLING = [
    ("top_k", 2.5, r"top_k must be an integer >= 0"),
    ("top_k", -1, r"top_k must be an integer >= 0"),
    ("top_k", "3", r"top_k must be an integer >= 0"),
    ("top_p", 0, r"top_p must be a finite number in \(0, 1\]"),
    ("top_p", 1.5, r"top_p must be a finite number in \(0, 1\]"),
    ("top_p", math.nan, r"top_p must be a finite number in \(0, 1\]"),
    ("temperature", math.nan, r"temperature must be a finite number in \(0, "),
    ("temperature", math.inf, r"temperature must be a finite number in \(0, "),
    ("temperature", -1.0, r"temperature must be a finite number in \(0, "),
    ("temperature", 0, r"temperature must be a finite number in \(0, "),
    ("temperature", "hot", r"temperature must be a finite number"),
    ("seed", -1, r"seed must be an integer in \[0, "),
    ("seed", 2.5, r"seed must be an integer in \[0, "),
    ("seed", "1", r"seed must be an integer in \[0, "),
]


@pytest.mark.parametrize("name,bad,match", BAD_SAMPLING)
def test_sampling_settings(engines, name, bad, match):
    eng = engines["cached"]
    refused(match, eng.generate, PROMPT, max_new_tokens=2, do_sample=True, **{name: bad})
    if name != "temperature" or bad != 0:  # greedy: temperature 0 is fine, NaN is not
        refused(match.replace(r"\(0, ", r"[\[(]0, "), eng.generate, PROMPT, max_new_tokens=2,
                **{name: bad})


def test_flags_and_stop_tokens(engines):
    eng = engines["cached"]
    for bad in ("yes", 1, None):
        refused("do_sample must be True or False", eng.generate, PROMPT, do_sample=bad)
    for bad in ("x", -1, tm.VOCAB, 2.0, True, [2, "x"], [2, tm.VOCAB]):
        refused(rf"eos_token_id must be .*\[0, {TOP}\]", eng.generate, PROMPT, eos_token_id=bad)
    want = eng.generate(PROMPT, max_new_tokens=8)
    stop = want[3]
    assert eng.generate(PROMPT, max_new_tokens=8, eos_token_id=np.int64(stop)) == \
        eng.generate(PROMPT, max_new_tokens=8, eos_token_id=[stop]) == \
        want[:want.index(stop) + 1]


def test_speculative_settings(engines):
    eng = engines["cached"]
    for bad in (0, -1, 2.5, True, "4", 10**9):
        refused(r"draft_tokens must be an integer in \[1, 128\]", eng.generate, PROMPT,
                speculative="ngram", draft_tokens=bad)
    for bad in (5, "fast"):
        refused("speculative must be None or one of self, ngram", eng.generate, PROMPT,
                speculative=bad)
    for bad in (1.5, math.nan, "high"):
        refused(r"min_confidence must be a finite number in \[0, 1\]", eng.generate, PROMPT,
                speculative="ngram", min_confidence=bad)


@pytest.mark.parametrize("bad", [0, -1, 100000, 2.5, True, "2"])
def test_threads_out_of_range_are_refused_at_once(engines, bad):
    start = time.perf_counter()
    refused(r"threads \(--threads\) must be an integer in \[1, \d+\]",
            arcompile.load, engines["folder"] / "cached", threads=bad)
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("flags,match", [
    (["--prompt-ids", "5,-1,7"], r"token ids must be in \[0, 511\]"),
    (["--prompt-ids", "5,512"], r"token ids must be in \[0, 511\]"),
    (["--max-new-tokens", "-1"], r"max_new_tokens must be an integer >= 0"),
    (["--max-new-tokens", "100000"], r"max_new_tokens must be in \[0, 124\]"),
    (["--threads", "100000"], r"threads \(--threads\) must be an integer in \[1, "),
    (["--threads", "0"], r"threads \(--threads\) must be an integer in \[1, "),
    (["--threads", "-1"], r"threads \(--threads\) must be an integer in \[1, "),
    (["--top-k", "-1"], r"top_k must be an integer >= 0"),
    (["--top-p", "0"], r"top_p must be a finite number in \(0, 1\]"),
    (["--temperature", "nan", "--do-sample"], r"temperature must be a finite number"),
    (["--temperature", "inf"], r"temperature must be a finite number"),
    (["--seed", "-1"], r"seed must be an integer in \[0, "),
    (["--eos-token-id", "9999"], r"eos_token_id must be an integer in \[0, 511\]"),
    (["--speculative", "ngram", "--draft-tokens", "0"], r"draft_tokens must be an integer"),
])
def test_cli_flags(engines, capsys, flags, match):
    import re

    prompt = [] if "--prompt-ids" in flags else ["--prompt-ids", "5,17,42,8"]
    argv = ["run", str(engines["folder"] / "cached"), *prompt, "--max-new-tokens", "2", *flags]
    start = time.perf_counter()
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("arcompile: error: ") and re.search(match, lines[0]), lines[0]
    assert time.perf_counter() - start < 10
