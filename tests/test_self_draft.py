"""The self-draft (arcompile/self_draft.py, ``--self-draft``): a quantized copy of the model
inside the engine folder that drafts for ``speculative="self"``. Greedy output identical to
plain greedy's, the engine itself untouched by the copy, the draft's files checked with the
engine's, the refusals, and the CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import tiny_models as tm

import arcompile
from arcompile.cli.main import main
from arcompile.errors import ArcompileError, DecodeError, EngineError
from arcompile.serve import speculative as spec

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], [42]]


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """Tiny LLaMA: routed (skip 0.5) with an int4 self-draft, the same without it, unrouted
    with an int8 self-draft (concat cache), and int8 weights with an int4 self-draft."""
    folder = tmp_path_factory.mktemp("self_draft")
    module = tm.llama()
    out = {}
    for name, kw in (("drafted", {"skip": 0.5, "self_draft": "int4"}),
                     ("routed", {"skip": 0.5}),
                     ("int8", {"self_draft": "int8", "kv_cache_runtime": "concat"}),
                     ("quantized", {"quantize": "int8", "self_draft": "int4"})):
        arcompile.optimize(module, folder / name, log=None, **kw)
        out[name] = arcompile.load(folder / name)
    return out


def plain(eng, prompt, count):
    return eng.generate(prompt, max_new_tokens=count)


def test_the_engine_is_the_one_built_without_the_draft(engines):
    # the copy is quantized, never the graph the engine is lowered from
    drafted, routed = engines["drafted"], engines["routed"]
    ids = [PROMPTS[1]]
    np.testing.assert_array_equal(drafted.logits(ids), routed.logits(ids))
    a = onnx.load(str(drafted.path / "model.onnx"), load_external_data=False)
    assert "MatMulNBits" not in {n.op_type for n in a.graph.node}
    assert drafted.manifest["skip_ffn"]["chosen"] == routed.manifest["skip_ffn"]["chosen"]


def test_the_engines_own_quantization_leaves_the_draft_alone(engines):
    # the same int4 copy of the same float graph, whether the engine is then quantized or
    # routed: the two drafts compute the same logits
    a = engines["drafted"]._own_draft()
    b = engines["quantized"]._own_draft()
    np.testing.assert_array_equal(a.logits([PROMPTS[1]]), b.logits([PROMPTS[1]]))
    eng = engines["quantized"]
    assert eng.manifest["quantization"]["mode"] == "int8"
    for prompt in PROMPTS:
        assert eng.generate(prompt, max_new_tokens=16, speculative="self") == \
            plain(eng, prompt, 16)


def test_the_draft_is_a_quantized_engine_listed_in_the_manifest(engines):
    eng = engines["drafted"]
    entry = eng.manifest["self_draft"]
    assert entry["folder"] == "draft" and entry["mode"] == "int4" and entry["method"] == "rtn"
    assert 0 <= entry["greedy_agreement"] <= 1 and entry["perplexity"] > 0
    inner = json.loads((eng.path / "draft" / "arcompile.json").read_text())
    assert inner["quantization"]["mode"] == "int4"
    assert inner["kv_cache"]["past"] == eng.manifest["kv_cache"]["past"]
    assert "skip_ffn" not in inner  # copied before the routing
    files = eng.manifest["files"]
    assert "draft/arcompile.json" in files and "draft/model.onnx" in files
    model = onnx.load(str(eng.path / "draft" / "model.onnx"), load_external_data=False)
    bits = {a.i for n in model.graph.node if n.op_type == "MatMulNBits"
            for a in n.attribute if a.name == "bits"}
    assert 4 in bits


@pytest.mark.parametrize("name", ["drafted", "int8"])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_self_drafting_with_the_copy_equals_plain_greedy(engines, name, k):
    eng = engines[name]
    for prompt in PROMPTS:
        want = plain(eng, prompt, 20)
        for confidence in (None, 0.0):  # 0: every slot drafted, so rejections happen too
            assert eng.generate(prompt, max_new_tokens=20, speculative="self",
                                draft_tokens=k, min_confidence=confidence) == want
            s = eng.speculation
            assert s["drafter"] == f"{eng.manifest['self_draft']['mode']} self-draft"
            assert s["draft_steps"] == s["drafted"] > 0
            assert s["rounds"] + s["accepted"] == 19
            assert s["min_confidence"] == (spec.DEFAULT_MIN_CONFIDENCE["self-draft"]
                                           if confidence is None else 0.0)
        assert eng.generate(prompt, max_new_tokens=12, speculative="ngram+self") == \
            plain(eng, prompt, 12)


def test_draft_skip_picks_the_skipped_block_drafter(engines):
    eng = engines["drafted"]
    want = plain(eng, PROMPTS[0], 16)
    assert eng.generate(PROMPTS[0], max_new_tokens=16, speculative="self",
                        draft_skip=0.5) == want
    assert eng.speculation["drafter"] == "engine with feed-forward blocks skipped"
    assert eng.speculation["skipped_blocks"] == 1
    with pytest.raises(DecodeError, match="no layer-skip routing"):  # the int8 one is unrouted
        engines["int8"].generate(PROMPTS[0], speculative="self", draft_skip=0.5)


def test_an_engine_with_neither_says_what_self_needs(tmp_path):
    arcompile.optimize(tm.llama(), tmp_path / "plain", log=None)
    with pytest.raises(DecodeError, match="--self-draft int4.*--skip.*has neither"):
        arcompile.load(tmp_path / "plain").generate([1, 2], speculative="self")


def test_refusals_write_nothing(tmp_path):
    cases = [({"self_draft": "int2"}, "not one of int8, int4"),
             ({"self_draft": "int4", "kv_cache": False}, "--no-kv-cache"),
             ({"self_draft": "int4", "kv_cache_dtype": "int8"}, "kv-cache-dtype int8"),
             ({"self_draft": "int4", "quantize": "int4"}, "no cheaper"),
             ({"self_draft": "int8", "quantize": "w8a8"}, "no cheaper")]
    for i, (kw, match) in enumerate(cases):
        with pytest.raises(ArcompileError, match=match):
            arcompile.optimize(tm.llama(), tmp_path / f"e{i}", log=None, **kw)
        assert not (tmp_path / f"e{i}").exists()
    # an occupied folder is refused before anything is built
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(EngineError, match="not an arcompile engine directory"):
        arcompile.optimize(tm.llama(), tmp_path / "taken", log=None, self_draft="int4")
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_draft_beyond_its_gate_fails_the_build_and_leaves_nothing(tmp_path, monkeypatch):
    from arcompile.compiler import self_draft

    monkeypatch.setattr(self_draft, "MAX_PPL_INCREASE", -1.0)  # no draft can pass
    with pytest.raises(ArcompileError, match=r"--self-draft int4 \(gated at .*not "
                                             r"--max-ppl-increase\).*perplexity rose"):
        arcompile.optimize(tm.llama(), tmp_path / "e", log=None, self_draft="int4")
    assert list(tmp_path.iterdir()) == []  # neither the engine nor a staged folder


def test_a_tampered_draft_is_refused(engines, tmp_path):
    copy = tmp_path / "engine"
    shutil.copytree(engines["drafted"].path, copy)
    data = copy / "draft" / "model.onnx"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(EngineError, match="draft/model.onnx was altered"):
        arcompile.load(copy)
    # a manifest that names a self-draft whose files it does not list
    shutil.rmtree(copy)
    shutil.copytree(engines["routed"].path, copy)
    manifest = json.loads((copy / "arcompile.json").read_text())
    manifest["self_draft"] = {"folder": "../elsewhere", "mode": "int4", "method": "rtn",
                              "perplexity_model": 1.0, "perplexity": 1.0,
                              "greedy_agreement": 1.0}
    (copy / "arcompile.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match="do not list draft/"):
        arcompile.load(copy).generate(PROMPTS[0], speculative="self")


def test_cli_optimize_inspect_and_run(tmp_path, capsys):
    import torch

    from arcompile.frontend.export import export_module

    model = tmp_path / "tiny.pt2"
    torch.export.save(export_module(tm.llama(), vocab_size=tm.VOCAB), model)
    out = tmp_path / "engine"
    assert main(["optimize", str(model), "-o", str(out), "--self-draft", "int4"]) == 0
    printed = capsys.readouterr().out
    assert "self-draft: int4 (rtn) in draft/" in printed
    assert main(["inspect", str(out)]) == 0
    assert "self-draft: int4 (rtn)" in capsys.readouterr().out
    want = ",".join(str(t) for t in arcompile.load(out).generate(PROMPTS[0], max_new_tokens=10))
    assert main(["run", str(out), "--prompt-ids", "5,6,7,8,9,10,11", "--max-new-tokens", "10",
                 "--speculative", "self"]) == 0
    got = capsys.readouterr()
    assert got.out.strip() == want
    assert "speculative (self, drafted by the int4 self-draft)" in got.err


@pytest.mark.slow
def test_smollm2_self_draft_equals_greedy_and_agrees(smollm2, tmp_path):
    from arcompile.eval import heldtext

    arcompile.optimize(smollm2, tmp_path / "engine", log=None, self_draft="int4")
    eng = arcompile.load(tmp_path / "engine")
    entry = eng.manifest["self_draft"]
    assert entry["greedy_agreement"] > 0.9  # RTN int4 of the Q4_1-born weights
    assert abs(entry["perplexity"] / entry["perplexity_model"] - 1) < 0.02
    prompt = heldtext.token_ids(smollm2.tokenizer, heldtext.PROMPTS, 48)
    want = plain(eng, prompt, 32)
    assert eng.generate(prompt, max_new_tokens=32, speculative="self") == want
    # A k-token draft accepted token by token at agreement p has an expected acceptance of
    # (p + p^2 + ... + p^k) / k: ~0.8 at p = 0.9, k = 4, so 0.8 sat at the mean. 32 tokens make
    # 10-20 drafts, each worth 5-10 points (an AVX2 EPYC measured 0.77); a drafter
    # that reads a wrong cache or wrong weights accepts almost none.
    stats = eng.speculation
    assert stats["acceptance_rate"] > 0.6 and stats["tokens_per_round"] > 1.5, stats
