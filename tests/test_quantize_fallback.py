"""The perplexity gate's fallback (arcompile/quant_fallback.py, ``--gate-fallback``): when the
gate trips, the worst-quantized modules are kept wider (int8, or float), as few as pass it;
without the flag the same setting fails and writes nothing."""

from __future__ import annotations

import json

import onnx
import pytest
import tiny_models as tm
import torch

import arcompile
from arcompile.errors import ArcompileError
from arcompile.eval.metrics import held_ids

# int4 round-to-nearest in groups of 64 raises this model's perplexity by ~0.85%
SETTING = dict(quantize="int4", quant_method="rtn", zero_point="none", group_size=64)
LIMIT = 0.005


@pytest.fixture(scope="module")
def trained():
    """The tiny LLaMA trained a little on the held-out ids the gate measures (a model without
    a tokenizer is measured on seeded random ids): untrained, its perplexity there is the
    vocabulary's and quantization moves it by noise; trained, quantization costs it."""
    torch.manual_seed(0)
    model = tm.llama()
    ids = torch.tensor([held_ids(None, tm.VOCAB, 128)[0]])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(25):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 ids[0, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_gate_trips_without_the_fallback_and_names_it(tmp_path, trained):
    with pytest.raises(ArcompileError, match="beyond --max-ppl-increase.*--gate-fallback"):
        arcompile.optimize(trained, tmp_path / "q", max_ppl_increase=LIMIT, log=None, **SETTING)
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("to", ["fp32", "int8"])
def test_fallback_keeps_the_worst_modules_wider_as_few_as_pass(tmp_path, trained, to):
    logs: list[str] = []
    report = arcompile.optimize(trained, tmp_path / "q", max_ppl_increase=LIMIT,
                                gate_fallback=to, log=logs.append, **SETTING)
    q = report.quantization
    fb = q["fallback"]
    kept, errors = fb["kept"], fb["errors"]
    assert fb["to"] == to
    assert 1 <= len(kept) < fb["modules"] == len(errors) == 7  # 2 x (qkv, o, mlp) + the head
    assert fb["ranked_by"] == "the relative weight error"
    # the LM head first, then the worst by the quantizer's own measure (not the held-out text)
    assert kept[0] == "model.lm_head"
    rest = [m for m in kept if m != "model.lm_head"]
    assert not rest or min(errors[m] for m in rest) >= max(
        e for m, e in errors.items() if m not in kept)
    # the tries aim below the bound (ONNX Runtime's rounding may add a little), and one
    # module fewer in float missed the aim
    assert fb["aim"] == pytest.approx(LIMIT * 0.75)
    assert q["perplexity_increase"] <= fb["aim"]
    assert q["perplexity_onnxruntime"] / q["perplexity_unquantized"] - 1 <= LIMIT
    tries = {t["kept"]: t["perplexity_increase"] for t in fb["tries"]}
    assert tries[len(kept)] == pytest.approx(q["perplexity_increase"])
    assert tries[len(kept) - 1] > fb["aim"] if len(kept) > 1 else True
    assert any(line.startswith("  fallback: ") for line in logs), logs
    manifest = json.loads((tmp_path / "q" / "arcompile.json").read_text())
    assert manifest["quantization"]["fallback"]["kept"] == kept
    record = next(r for r in report.passes if r.name == "quantize_weights")
    model = onnx.load(tmp_path / "q" / "model.onnx", load_external_data=False)
    bits = [next(a.i for a in n.attribute if a.name == "bits") for n in model.graph.node
            if n.op_type == "MatMulNBits"]
    float_notes = sum("the perplexity gate's fallback" in n for n in record.notes)
    if to == "fp32":  # the kept modules run float MatMuls, the others MatMulNBits
        assert float_notes == len(kept) and 8 not in bits[:-1]
        assert "MatMul" in [n.op_type for n in model.graph.node]
    else:  # int4 modules become int8 (g32, integer zero point); the int8 head goes float
        assert float_notes == 1 and kept[0] == "model.lm_head"
        widened = sum(v for k, v in record.counts.items() if k.startswith("int8_g32_asym"))
        assert widened >= len(kept) - 1 and bits.count(8) == widened
    assert 4 in bits
    assert abs(q["perplexity_onnxruntime"] / q["perplexity"] - 1) <= 0.02
    assert len(arcompile.load(tmp_path / "q").generate([5, 17, 42], max_new_tokens=4)) == 4


def test_fallback_refuses_what_it_cannot_fall_back(tmp_path, trained):
    for extra, message in ((dict(quantize="w8a8"), "applies to --quantize int8 or int4"),
                           (dict(quantize="int4", kv_cache_dtype="int8"),
                            "without --kv-cache-dtype int8"),
                           (dict(), "gate_fallback without quantize"),
                           (dict(quantize="int8", gate_fallback="int8"), "choose fp32")):
        with pytest.raises(ArcompileError, match=message):
            arcompile.optimize(tm.llama(), tmp_path / "x", **{"gate_fallback": True, **extra},
                               log=None)
    assert not (tmp_path / "x").exists()


def test_cli_summary_names_the_modules_the_fallback_kept(tmp_path, trained, capsys):
    from arcompile.cli.main import main

    model = tmp_path / "trained.pt2"
    ids = torch.tensor(held_ids(None, tm.VOCAB, 32)[0]).reshape(2, 16)  # B > 1: kept dynamic
    torch.export.save(torch.export.export(trained, (ids,), dynamic_shapes=(
        {0: torch.export.Dim("B", max=64), 1: torch.export.Dim("T", max=256)},)), str(model))
    out = tmp_path / "q"
    assert main(["optimize", str(model), "-o", str(out), "--quantize", "int4",
                 "--quant-method", "rtn", "--zero-point", "none", "--group-size", "64",
                 "--max-ppl-increase", f"{LIMIT:.1%}", "--gate-fallback", "fp32",
                 "--max-context", "128"]) == 0  # the gate then reads the 128 ids it learnt
    printed = capsys.readouterr()
    kept = json.loads((out / "arcompile.json").read_text())["quantization"]["fallback"]["kept"]
    assert f"kept in fp32 by the gate's fallback ({len(kept)} of 7 modules): " \
           f"{', '.join(kept)}" in printed.out
    assert "  fallback: 1 of 7 modules in fp32" in printed.err


@pytest.mark.slow
def test_smollm2_fallback_passes_the_setting_the_gate_refuses(tmp_path, smollm2):
    # the gate-trip test's setting (test_quantize_gate): round-to-nearest in groups of 128;
    # the session's SmolLM2 (the command line's summary: the test above)
    logs: list[str] = []
    report = arcompile.optimize(smollm2, tmp_path / "q4", quantize="int4", group_size=128,
                                quant_method="rtn", gate_fallback=True, log=logs.append)
    q = report.quantization
    fb = q["fallback"]
    assert fb["to"] == "int8"  # int4's default
    assert fb["tries"][0]["perplexity_increase"] > 0.08  # one module kept is far off
    assert 1 <= len(fb["kept"]) < fb["modules"]
    assert q["perplexity_increase"] <= fb["aim"] < 0.08
    assert q["perplexity_onnxruntime"] / q["perplexity_unquantized"] - 1 <= 0.08
    assert any(line.startswith("  fallback: 1 of") for line in logs), logs


# -- the pass's own keep_float / keep_int8, as the fallback drives it ------------------------
def test_keep_options_golden_numbers_and_the_8_bit_case(tmp_path):
    import copy

    from helpers import apply_pass, run_onnx
    from test_quantize_weights import X, _fused

    from arcompile.ir import run_graph
    from arcompile.ir.quant_math import quantize
    from arcompile.passes.quantize_weights import FALLBACK_INT8, QuantizeWeights

    model, g = _fused(tm.llama)
    attn, mlp = "model.model.layers.0.self_attn.o_proj", "model.model.layers.1.mlp"
    p = QuantizeWeights(bits=4, block_size=32, zero_point="none", include_lm_head=True,
                        lm_head_bits=8, accuracy_level=0, keep_float=[attn],
                        keep_int8=[mlp, "model.lm_head"])
    result = apply_pass(g, p)
    # golden: o_proj stays a float linear, layer 1's MLP is int8 (g32, integer zero point),
    # the head, already int8, stays float; the rest int4
    bits = {n.module: n.attrs["bits"] for n in g.nodes() if n.op == "arc.matmul_nbits"}
    assert attn not in bits and "model.lm_head" not in bits and bits[mlp] == 8
    assert {b for m, b in bits.items() if m != mlp} == {4}
    assert result.counts[FALLBACK_INT8.rule] == 2  # gate/up and down
    assert sum("the perplexity gate's fallback" in n for n in result.notes) == 2
    assert set(p.errors) == set(bits) - {mlp}  # measured in a module's own format only
    # numbers: ONNX Runtime (optimizations off) computes what the interpreter does, and the
    # interpreter what eager does with those weights dequantized
    ref = run_graph(g, [X])[0]
    assert abs(run_onnx(g, tmp_path, X) - ref.numpy()).max() <= 1e-4
    want = copy.deepcopy(model)
    for name, mod in want.named_modules():
        if isinstance(mod, torch.nn.Linear) and name not in (attn, "model.lm_head"):
            q = (quantize(mod.weight.data, 8, 32, symmetric=False) if name.startswith(mlp)
                 else quantize(mod.weight.data, 4, 32, symmetric=True))
            mod.weight = torch.nn.Parameter(q.dequantize())
    assert (ref - want(X).detach()).abs().max() <= 1e-4
