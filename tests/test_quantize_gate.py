"""``optimize(..., quantize=...)`` / ``--quantize``: weights quantized after the pipeline and
the KV cache, held to a perplexity bound on held-out text; a result beyond it fails with the
figures and writes nothing. The manifest records the gate's figures."""

from __future__ import annotations

import json

import pytest

import arcompile
import tiny_models as tm
from arcompile.cli import main
from arcompile.errors import ArcompileError


def test_int8_engine_records_the_gate_and_decodes(tmp_path):
    module = tm.llama()
    report = arcompile.optimize(module, tmp_path / "q8", quantize="int8", log=None)
    q = report.quantization
    assert q["mode"] == "int8" and q["settings"]["bits"] == 8
    assert abs(q["perplexity_increase"]) <= 0.01 and q["greedy_agreement"] >= 0.95
    assert abs(q["perplexity_onnxruntime"] / q["perplexity"] - 1) <= 0.02
    manifest = json.loads((tmp_path / "q8" / "arcompile.json").read_text())
    assert manifest["quantization"]["perplexity"] == q["perplexity"]
    assert "_ids" not in manifest["quantization"]
    names = [p["name"] for p in manifest["passes"]]
    assert names[-2:] == ["quantize_weights", "dce"] and "insert_kv_cache" in names
    assert manifest["kv_cache"] is not None  # quantized and cached
    eng = arcompile.load(tmp_path / "q8")
    assert len(eng.generate([5, 17, 42, 8], max_new_tokens=8)) == 8


def test_unknown_mode_and_bad_group_size_are_clear_errors(tmp_path):
    with pytest.raises(ArcompileError, match="int3.*available: int8, int4"):
        arcompile.optimize(tm.nanogpt(), tmp_path / "a", quantize="int3", log=None)
    with pytest.raises(ArcompileError, match="method 'magic'"):
        arcompile.optimize(tm.nanogpt(), tmp_path / "a", quantize="int8", quant_method="magic",
                           log=None)
    with pytest.raises(ArcompileError, match="48"):
        arcompile.optimize(tm.nanogpt(), tmp_path / "b", quantize="int4", group_size=48,
                           log=None)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_smollm2_gate_trips_on_a_bad_setting_and_writes_nothing(tmp_path, capsys):
    from arcompile.frontend.load import find_smollm2_gguf

    out = tmp_path / "q4"
    code = main(["optimize", str(find_smollm2_gguf()), "-o", str(out), "--quantize", "int4",
                 "--group-size", "128", "--max-ppl-increase", "0.1%"])
    err = capsys.readouterr().err
    assert code == 2 and "perplexity rose from 12.7" in err and "nothing was written" in err
    assert not out.exists()
