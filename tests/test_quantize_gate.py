"""``optimize(..., quantize=...)`` / ``--quantize``: weights quantized after the pipeline and
the KV cache, held to a perplexity bound on held-out text; a result beyond it fails with the
figures and writes nothing. The manifest records the gate's figures."""

from __future__ import annotations

import json

import pytest
import tiny_models as tm

import arcompile
from arcompile.cli.main import main
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
def test_smollm2_gate_trips_on_a_bad_setting_and_writes_nothing(tmp_path, smollm2):
    # the session's SmolLM2 (loading the GGUF again costs ~50 s); the command line's exit
    # status and message for a tripped gate on SmolLM2: test_quantize_w8a8's gate test
    out = tmp_path / "q4"
    with pytest.raises(ArcompileError) as e:
        arcompile.optimize(smollm2, out, quantize="int4", group_size=128,
                           max_ppl_increase=0.001, quant_method="rtn", log=None)
    assert "perplexity rose from 12.7" in str(e.value) and "nothing was written" in str(e.value)
    assert not out.exists()


def test_int4_default_is_gptq_with_integer_zero_points_and_a_quantized_lm_head(tmp_path):
    import onnx

    from arcompile.compiler.quantization import DEFAULT_LM_HEAD, GPTQ_SAMPLES

    logs: list[str] = []
    report = arcompile.optimize(tm.llama(), tmp_path / "q4", quantize="int4", log=logs.append)
    q = report.quantization
    head = DEFAULT_LM_HEAD["int4"]["gptq"]
    assert q["settings"] == {
        "bits": 4, "block_size": 32, "symmetric": False, "zero_point": "int",
        "include_lm_head": True, "lm_head": f"{head}_g32_asym", "embedding": "fp32",
        "accuracy_level": 4,
        "method": "gptq", "calibration": {"samples": GPTQ_SAMPLES, "tokens": 128,
                                          "text": "seeded random token ids (no tokenizer)"}}
    assert set(q["seconds"]) == {"calibration", "quantization"}
    assert any(line.startswith("  calibration ") and "gptq" in line for line in logs), logs
    record = next(r for r in report.passes if r.name == "quantize_weights")
    assert record.counts == {"int4_g32_asym": 8, f"lm_head_{head}_g32_asym": 1}
    manifest = json.loads((tmp_path / "q4" / "arcompile.json").read_text())
    assert manifest["quantization"]["settings"] == q["settings"]
    # MatMulNBits' own zero points: no block-sum correction kernels; the head is one too
    model = onnx.load(tmp_path / "q4" / "model.onnx", load_external_data=False)
    kinds = [n.op_type for n in model.graph.node]
    assert kinds.count("MatMulNBits") == 9 and "ReduceSum" not in kinds
    assert "MatMul" not in kinds and "Gemm" not in kinds  # nothing left in fp32
    eng = arcompile.load(tmp_path / "q4")
    assert len(eng.generate([5, 17, 42, 8], max_new_tokens=4)) == 4


@pytest.fixture(scope="module")
def llama_archive(tmp_path_factory):
    import torch

    from arcompile.frontend.export import export_module

    archive = tmp_path_factory.mktemp("quant_cli") / "llama.pt2"
    torch.export.save(export_module(tm.llama(), vocab_size=tm.VOCAB), archive)
    return archive


def test_cli_quantization_flags_reach_the_manifest(tmp_path, capsys, llama_archive):
    archive = llama_archive
    out = tmp_path / "a"
    assert main(["optimize", str(archive), "-o", str(out), "--quantize", "int4",
                 "--lm-head", "fp32", "--quant-method", "rtn"]) == 0
    settings = json.loads((out / "arcompile.json").read_text())["quantization"]["settings"]
    assert settings["method"] == "rtn" and settings["zero_point"] == "float"
    assert settings["lm_head"] == "float32" and not settings["include_lm_head"]
    assert settings["embedding"] == "fp32"
    out = tmp_path / "b"
    assert main(["optimize", str(archive), "-o", str(out), "--quantize", "int4",
                 "--lm-head", "int8", "--calibration-samples", "2", "--group-size", "64",
                 "--embedding", "lm-head"]) == 0
    settings = json.loads((out / "arcompile.json").read_text())["quantization"]["settings"]
    assert settings["method"] == "gptq" and settings["calibration"]["samples"] == 2
    assert settings["lm_head"] == "int8_g64_asym" and settings["block_size"] == 64
    assert settings["embedding"] == "lm_head"
    printed = capsys.readouterr().out
    assert "quantization: int4" in printed and "embedding from the LM head" in printed


@pytest.mark.parametrize("argv,message", [
    (["--quant-method", "gptq"], "quant_method without quantize"),
    (["--lm-head", "int4"], "lm_head without quantize"),
    (["--calibration-samples", "8"], "calibration_samples without quantize"),
    (["--embedding", "lm-head"], "embedding without quantize"),
    (["--quantize", "int4", "--lm-head", "fp32", "--embedding", "lm-head"],
     "--lm-head fp32 keeps the head in float"),
    (["--quantize", "int4", "--calibration-samples", "0"], "at least 1, got 0"),
    (["--quantize", "int4", "--quant-method", "rtn", "--calibration-samples", "4"],
     "applies to a calibrated --quant-method"),
    (["--quantize", "w8a8", "--lm-head", "int4"], "--lm-head applies to --quantize int8 or int4"),
    (["--weight-format", "qdq"], "weight_format without quantize"),
    (["--gate-fallback"], "gate_fallback without quantize"),
    (["--quantize", "w8a8", "--gate-fallback"], "applies to --quantize int8 or int4"),
    (["--quantize", "int8", "--gate-fallback", "int8"], "choose fp32"),
    (["--quantize", "w8a8", "--weight-format", "qdq"],
     "--weight-format applies to --quantize int8 or int4"),
    (["--quantize", "int4", "--weight-format", "qdq", "--embedding", "lm-head"],
     "--embedding lm-head has no QDQ form"),
])
def test_cli_quantization_flags_refuse_bad_values(tmp_path, capsys, llama_archive, argv,
                                                   message):
    out = tmp_path / "out"
    assert main(["optimize", str(llama_archive), "-o", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not out.exists()


def test_cli_weight_format_qdq_writes_dequantize_linear_and_decodes_alike(tmp_path, capsys,
                                                                         llama_archive):
    import onnx

    engines = {}
    for form in ("matmulnbits", "qdq"):
        out = tmp_path / form
        assert main(["optimize", str(llama_archive), "-o", str(out), "--quantize", "int4",
                     "--quant-method", "rtn", "--zero-point", "none", "--lm-head", "int4",
                     "--weight-format", form]) == 0
        q = json.loads((out / "arcompile.json").read_text())["quantization"]
        assert q["weight_format"] == form
        assert abs(q["perplexity_onnxruntime"] / q["perplexity"] - 1) <= 0.02
        kinds = [n.op_type for n in onnx.load(out / "model.onnx",
                                              load_external_data=False).graph.node]
        engines[form] = (q, kinds, arcompile.load(out).generate([5, 17, 42, 8],
                                                                 max_new_tokens=8))
    q, kinds, tokens = engines["qdq"]
    assert q["tensorrt_form_issues"] == []  # symmetric int4 in blocks
    assert "MatMulNBits" not in kinds and kinds.count("DequantizeLinear") == 9
    assert "MatMulNBits" in engines["matmulnbits"][1]
    assert "tensorrt_form_issues" not in engines["matmulnbits"][0]
    assert q["perplexity"] == engines["matmulnbits"][0]["perplexity"]  # same IR, same codes
    assert tokens == engines["matmulnbits"][2]
    printed = capsys.readouterr()
    assert "QDQ weights" in printed.out and "TensorRT's documented weight-only form" in printed.err
    # the int4 default (integer zero points) in QDQ: written, and told why TensorRT would not
    out = tmp_path / "asym"
    assert main(["optimize", str(llama_archive), "-o", str(out), "--quantize", "int4",
                 "--quant-method", "rtn", "--zero-point", "int", "--weight-format", "qdq"]) == 0
    q = json.loads((out / "arcompile.json").read_text())["quantization"]
    issues = q["tensorrt_form_issues"]  # and rtn's default LM head is int8 in blocks
    assert [line.split(" (")[0] for line in issues] == ["int8 weights in blocks",
                                                       "integer zero points"]
    assert "--lm-head int4 or fp32" in issues[0] and "--lm-head" not in issues[1]
    assert "not in TensorRT's documented weight-only form" in capsys.readouterr().err


def test_cli_quantization_flags_take_only_known_values(tmp_path, llama_archive):
    for bad in (["--quantize", "int4", "--lm-head", "int2"],
                ["--quantize", "int4", "--weight-format", "int4"],
                ["--quantize", "int4", "--quant-method", "awq"]):
        with pytest.raises(SystemExit):  # argparse's choices
            main(["optimize", str(llama_archive), "-o", str(tmp_path / "out"), *bad])


@pytest.mark.parametrize("zero_point,rule", [("none", "int4_g32_sym"), ("int", "int4_g32_asym"),
                                             ("float", "int4_g32_fmin")])
def test_zero_point_option_picks_symmetric_or_asymmetric_int4(tmp_path, zero_point, rule):
    report = arcompile.optimize(tm.llama(), tmp_path / "q4", quantize="int4", quant_method="rtn",
                                zero_point=zero_point, log=None)
    q = report.quantization
    assert q["settings"]["zero_point"] == zero_point
    record = next(r for r in report.passes if r.name == "quantize_weights")
    assert record.counts[rule] == 8  # every linear of the body in that format
    assert abs(q["perplexity_onnxruntime"] / q["perplexity"] - 1) <= 0.02
    assert len(arcompile.load(tmp_path / "q4").generate([5, 17, 42], max_new_tokens=3)) == 3


def test_zero_point_is_refused_where_it_does_not_apply(tmp_path):
    with pytest.raises(ArcompileError, match="--zero-point applies to --quantize int8 or int4"):
        arcompile.optimize(tm.llama(), tmp_path / "w", quantize="w8a8", zero_point="none",
                           log=None)
    with pytest.raises(ArcompileError, match="zero_point must be one of none, int, float"):
        arcompile.optimize(tm.llama(), tmp_path / "w", quantize="int4", zero_point="half",
                           log=None)
    assert not (tmp_path / "w").exists()
