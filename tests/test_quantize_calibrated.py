"""GPTQ (``passes/quant_gptq.py``, ``QuantizeWeights(method="gptq")``): the math (error on
the calibration activations at most round-to-nearest's, codes on the block grids, storage as
round-to-nearest's, deterministic), golden (same ops and attrs as round-to-nearest, rules,
settings), numbers (reference interpreter == ONNX Runtime), the LM head's own width, the
gate's defaults and the CLI's flags and errors, and one SmolLM2 check."""

from __future__ import annotations

import pytest
import tiny_models as tm
import torch
from helpers import apply_pass, ops, run_onnx
from test_quantize_weights import X, _fused, _q4_1_weight

from arcompile.eval import calibration
from arcompile.ir import run_graph
from arcompile.ir.quant_math import quantize, unpack
from arcompile.passes.quant_gptq import SecondMoment, block_grid, gptq
from arcompile.passes.quantize_weights import QuantizeWeights

ZERO_POINTS = ["none", "int", "float"]


def _activations(n: int, K: int, seed: int = 0) -> torch.Tensor:
    """Inputs with correlated channels of different sizes and a mean (as a norm's output)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(K, K, generator=g) * 0.2 + torch.eye(K)
    size = torch.rand(K, generator=g) * 3 + 0.1
    return (torch.randn(n, K, generator=g) @ mix) * size + torch.randn(K, generator=g)


def _output_error(x: torch.Tensor, w: torch.Tensor, dq: torch.Tensor) -> float:
    return float(((x @ (w - dq).t()) ** 2).mean())


def _rtn(w, bits, block_size, zero_point):
    return quantize(w, bits, block_size, zero_point == "none", float_minimum=zero_point == "float")


# -- the math -------------------------------------------------------------------------------
def test_second_moment_is_the_mean_of_x_transpose_x():
    x = _activations(300, 24)
    m = SecondMoment(24)
    m.add(x[:100].reshape(4, 25, 24))  # any leading shape
    m.add(x[100:])
    assert m.rows == 300
    assert torch.allclose(m.hessian, x.t() @ x / 300, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("zero_point", ZERO_POINTS)
@pytest.mark.parametrize("bits,K,block_size", [(4, 96, 32), (4, 80, 32), (4, 64, 64),
                                                (8, 64, 16)])
def test_gptq_error_on_the_calibration_inputs_is_below_round_to_nearest(zero_point, bits, K,
                                                                        block_size):
    x = _activations(512, K)
    w = torch.randn(48, K, generator=torch.Generator().manual_seed(1)) * 0.1
    m = SecondMoment(K)
    m.add(x)
    q = gptq(w, m.hessian, bits, block_size, zero_point)
    rtn = _rtn(w, bits, block_size, zero_point)
    # the same storage as round-to-nearest: the lowering cannot tell them apart
    for got, want in ((q.packed, rtn.packed), (q.scales, rtn.scales),
                      (q.zero_points, rtn.zero_points), (q.block_offsets, rtn.block_offsets)):
        assert (got is None) == (want is None)
        assert got is None or (got.shape == want.shape and got.dtype == want.dtype)
    got, want = _output_error(x, w, q.dequantize()), _output_error(x, w, rtn.dequantize())
    assert got <= 0.8 * want, (got, want)
    # every element is on its block's grid: a code in range, (code - zero) * scale + shift
    nb = -(-K // block_size)
    codes = unpack(q.packed, bits).reshape(48, nb * block_size)[:, :K]
    assert int(codes.max()) <= 2 ** bits - 1
    assert torch.equal(q.dequantize(), q.dequantize())  # (storage round-trips)


def test_gptq_is_deterministic_and_its_padding_is_the_zero_point():
    x = _activations(256, 80)  # 80 = 2.5 blocks of 32: the last block is padded
    w = torch.randn(16, 80) * 0.1
    m = SecondMoment(80)
    m.add(x)
    a, b = gptq(w, m.hessian, 4, 32, "int"), gptq(w, m.hessian, 4, 32, "int")
    assert torch.equal(a.packed, b.packed) and torch.equal(a.scales, b.scales)
    assert torch.equal(a.zero_points, b.zero_points)
    codes = unpack(a.packed, 4).reshape(16, 96)
    zeros = unpack(a.zero_points, 4)[:, 2]  # block 2's zero point, per row
    assert torch.equal(codes[:, 80:], zeros[:, None].expand(16, 16))


def test_gptq_cancels_the_block_shift_of_q4_1_weights_in_an_integer_zero_point():
    # the SmolLM2 case: Q4_1 weights (w = d * q + m) that no integer zero point holds
    w = _q4_1_weight(64, 192, seed=3)
    x = _activations(1024, 192, seed=4)
    m = SecondMoment(192)
    m.add(x)
    got = _output_error(x, w, gptq(w, m.hessian, 4, 32, "int").dequantize())
    want = _output_error(x, w, _rtn(w, 4, 32, "int").dequantize())
    assert got <= 0.5 * want, (got, want)


def test_gptq_grid_of_a_block_matches_round_to_nearest_formulas():
    w = torch.tensor([[-1.0, 0.5, 2.0, 1.0]])
    scale, zero, shift = block_grid(w, 4, "int")
    assert torch.allclose(scale, torch.tensor([0.2])) and zero.tolist() == [5.0]
    scale, zero, shift = block_grid(w, 4, "float")
    assert torch.allclose(scale, torch.tensor([0.2])) and zero.tolist() == [8.0]
    assert torch.allclose(shift, torch.tensor([-1.0 + 8 * 0.2]))
    scale, zero, shift = block_grid(w, 4, "none")
    assert torch.allclose(scale, torch.tensor([2.0 / 7])) and shift.tolist() == [0.0]


def test_gptq_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="Hessian"):
        gptq(torch.ones(4, 32), torch.eye(16), 4, 32, "int")
    with pytest.raises(ValueError, match="zero_point"):
        gptq(torch.ones(4, 32), torch.eye(32), 4, 32, "fp16")
    with pytest.raises(ValueError, match="block_size"):
        gptq(torch.ones(4, 32), torch.eye(32), 4, 24, "int")


# -- the pass: golden -----------------------------------------------------------------------
def _sequences(samples=4, length=16, vocab=512):
    return calibration.calibration_ids(None, vocab, samples, length)[0]


def test_gptq_pass_golden_is_round_to_nearest_structure_with_other_codes():
    _, g_rtn = _fused(tm.llama)
    _, g = _fused(tm.llama)
    p = QuantizeWeights(bits=4, block_size=32, zero_point="int", method="gptq",
                        calibration=_sequences(), calibration_text="seeded random ids")
    result = apply_pass(g, p)
    apply_pass(g_rtn, QuantizeWeights(bits=4, block_size=32, zero_point="int"))
    assert result.counts == {"int4_g32_asym": 8}
    assert result.notes == ["kept aten.linear at model.lm_head in float: it is the LM head, "
                            "kept in float (include_lm_head=False)"]
    assert ops(g) == ops(g_rtn)
    got = [n for n in g.nodes() if n.op == "arc.matmul_nbits"]
    want = [n for n in g_rtn.nodes() if n.op == "arc.matmul_nbits"]
    assert [n.attrs for n in got] == [n.attrs for n in want]
    assert all(n.origin == "quantize_weights/int4_g32_asym" for n in got)
    assert got[0].attrs == {"K": 64, "N": 128, "bits": 4, "block_size": 32,
                            "has_zero_points": True, "has_block_offsets": False,
                            "has_bias": False, "accuracy_level": 4}
    # other codes, same shapes
    assert not torch.equal(got[0].inputs[1].data, want[0].inputs[1].data)
    assert p.settings() == {
        "bits": 4, "block_size": 32, "symmetric": False, "zero_point": "int",
        "include_lm_head": False, "lm_head": "float32", "embedding": "fp32",
        "accuracy_level": 4, "method": "gptq",
        "calibration": {"samples": 4, "tokens": 16, "text": "seeded random ids"}}
    assert set(p.timings) == {"calibration", "quantization"}


def _dequantized(node) -> torch.Tensor:
    """The float weight an arc.matmul_nbits node computes with."""
    from arcompile.ir.quant_math import dequantize

    a, rest = node.attrs, iter(node.inputs[3:])
    zero_points = next(rest).data if a["has_zero_points"] else None
    offsets = next(rest).data if a["has_block_offsets"] else None
    return dequantize(node.inputs[1].data, node.inputs[2].data, zero_points, a["K"], a["bits"],
                      a["block_size"], block_offsets=offsets)


@pytest.mark.parametrize("zero_point", ["int", "float"])
def test_gptq_pass_error_on_the_calibration_activations_is_below_rtn(zero_point):
    """Linear by linear, on the activations it was calibrated with (the float model's, as
    E[x^T x]): E||x (W - Q)^T||^2 = tr((W - Q) H (W - Q)^T) is below round-to-nearest's."""
    seqs = _sequences(samples=6, length=24)
    _, g_float = _fused(tm.llama)
    probe = QuantizeWeights(bits=4, block_size=32, zero_point=zero_point, method="gptq",
                            calibration=seqs)
    moments = {site.name: (site.weight_NK, m.hessian)
               for site, m in probe.second_moments(g_float).values()}
    assert len(moments) == 8  # per layer: QKV, o_proj, [gate; up], down
    errors = {}
    for method in ("rtn", "gptq"):
        _, g = _fused(tm.llama)
        apply_pass(g, QuantizeWeights(bits=4, block_size=32, zero_point=zero_point,
                                      method=method,
                                      calibration=seqs if method == "gptq" else None))
        errors[method] = {}
        for node in (n for n in g.nodes() if n.op == "arc.matmul_nbits"):
            w, H = moments[node.inputs[1].name.removesuffix("_q4_NbB")]
            d = w - _dequantized(node)
            errors[method][node.output.name] = float(torch.einsum("nk,kl,nl->", d, H, d))
    assert errors["gptq"].keys() == errors["rtn"].keys()
    for name, got in errors["gptq"].items():
        assert got <= errors["rtn"][name], name
    assert sum(errors["gptq"].values()) <= 0.8 * sum(errors["rtn"].values()), errors


# -- numbers --------------------------------------------------------------------------------
@pytest.mark.parametrize("zero_point", ZERO_POINTS)
def test_gptq_pass_numbers_interpreter_ort_and_eager(tmp_path, zero_point):
    """The lowering computes what the IR says (ORT's optimizations off), and the IR computes
    the model with its weights replaced by the dequantized GPTQ codes."""
    import copy

    model, g = _fused(tm.llama)
    apply_pass(g, QuantizeWeights(bits=4, block_size=32, zero_point=zero_point,
                                  method="gptq", calibration=_sequences(),
                                  include_lm_head=True, lm_head_bits=8, accuracy_level=0))
    ref = run_graph(g, [X])[0]
    assert abs(run_onnx(g, tmp_path, X) - ref.numpy()).max() <= 1e-4
    # eager with the same dequantized weights (merged gate/up and QKV split back per linear)
    want = copy.deepcopy(model)
    inner = want.model
    nodes = {n.output.name: n for n in g.nodes() if n.op == "arc.matmul_nbits"}
    layers = inner.model.layers
    for i, layer in enumerate(layers):
        names = [k for k in nodes if nodes[k].module.startswith(f"model.model.layers.{i}.")]
        by_shape = {(nodes[k].attrs["N"], nodes[k].attrs["K"]): _dequantized(nodes[k])
                    for k in names}
        attn, mlp = layer.self_attn, layer.mlp
        q, k, v = by_shape[(128, 64)].split([64, 32, 32])
        gate, up = by_shape[(256, 64)].split([128, 128])
        for lin, w in ((attn.q_proj, q), (attn.k_proj, k), (attn.v_proj, v),
                       (attn.o_proj, by_shape[(64, 64)]), (mlp.gate_proj, gate),
                       (mlp.up_proj, up), (mlp.down_proj, by_shape[(64, 128)])):
            lin.weight = torch.nn.Parameter(w)
    table = inner.model.embed_tokens.weight.data.clone()
    head = g.outputs[0].producer
    inner.lm_head.weight = torch.nn.Parameter(_dequantized(head))  # unties
    inner.model.embed_tokens.weight = torch.nn.Parameter(table)
    assert (ref - want(X).detach()).abs().max() <= 1e-4


# -- the real model -------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_int4_default_is_within_the_gate_and_beats_round_to_nearest(smollm2):
    """SmolLM2 (from a Q4_1 GGUF): int4 with MatMulNBits' integer zero point, GPTQ against
    round-to-nearest, 512 held tokens in the interpreter (the gate's own measurement), both
    with the int4 LM head. 16 calibration sequences keep the test short (the default 64 give
    12.90, +0.9%). Measured: fp32 12.79, round-to-nearest ~16.5 (+29%), GPTQ ~13.3 (+4%)."""
    import copy

    from arcompile.compiler import quantization
    from arcompile.compiler.options import TransformOptions
    from arcompile.eval.metrics import perplexity
    from arcompile.frontend.from_export import from_exported_program
    from arcompile.passes import PassManager, VerifyHook, build_pipeline

    g = from_exported_program(smollm2.program, "smollm2")
    PassManager(build_pipeline("default"), [VerifyHook()]).run(g)
    rtn = copy.deepcopy(g, {id(v.data): v.data for v in g.constants()})
    apply_pass(rtn, QuantizeWeights(bits=4, block_size=32, zero_point="int",
                                    include_lm_head=True))
    from arcompile.eval import metrics

    ids, _ = metrics.held_ids(smollm2.tokenizer, 49152)
    ppl_rtn = perplexity(metrics.graph_logits(rtn, ids), ids)
    _, info = quantization.quantize(g, TransformOptions(quantize="int4", calibration_samples=16),
                                    smollm2.tokenizer, 49152, lambda _m: None)
    s = info["settings"]
    assert (s["method"], s["zero_point"], s["block_size"]) == ("gptq", "int", 32)
    assert s["lm_head"] == "int4_g32_asym" and s["calibration"]["samples"] == 16
    assert info["perplexity_increase"] <= 0.06, info["perplexity"]
    assert info["perplexity"] <= 0.85 * ppl_rtn, (info["perplexity"], ppl_rtn)
