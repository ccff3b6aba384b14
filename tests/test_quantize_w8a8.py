"""smooth_quant + quantize_w8a8 (static W8A8, ``--quantize w8a8``): the maths (per-channel
int8 weights, static activation rounding, percentiles, outlier channels), golden before/after
for both passes, numbers (smoothing exact within 1e-4 of the reference; the quantized graph in
ONNX Runtime with its optimizations off equal to the interpreter, and with them on running
integer kernels and no dynamic quantization), the GQA head mapping behind the o_proj rule, the
576-wide layer, negatives, the engine, and the gate tripping on a deliberately bad setting on
SmolLM2 (STYLE.md #9)."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tiny_models as tm
import torch
from helpers import apply_pass, cleanup, ops, run_onnx, to_ir

import arcompile
from arcompile.errors import ArcompileError
from arcompile.eval.calibration import calibration_ids, observe_inputs
from arcompile.frontend.export import export_module
from arcompile.frontend.from_export import from_exported_program
from arcompile.ir import run_graph
from arcompile.ir.graph import Graph
from arcompile.ir.opdefs.qlinear import fake_quantize
from arcompile.passes import NumericCheckHook, PassManager, VerifyHook, build_pipeline
from arcompile.passes.linear_sites import AbsStats
from arcompile.passes.quantize_w8a8 import (
    WEIGHT_QMAX,
    QuantizeW8A8,
    activation_scale,
    quantize_weight_per_channel,
)
from arcompile.passes.smooth_quant import SmoothQuant

TOKENS = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
X = torch.tensor([[7, 3, 9, 1, 2, 8, 4]])
CALIBRATION = calibration_ids(None, tm.VOCAB, samples=4, length=16)[0]  # seeded random ids
CALIBRATION_16 = calibration_ids(None, 16, samples=4, length=16)[0]  # for 16-token vocabularies

_FUSED: dict = {}


def _fused(builder, decomposed: bool = False) -> Graph:
    """``builder()``'s model through the default pipeline (fusions, merged linears), made
    once per session; each call gets its own copy sharing the weight tensors."""
    key = (builder.__name__, decomposed)
    if key not in _FUSED:
        program = export_module(builder(), example_inputs=(TOKENS,))
        g = from_exported_program(program.run_decompositions() if decomposed else program, "m")
        PassManager(build_pipeline("default"), [VerifyHook()]).run(g)
        _FUSED[key] = g
    g = _FUSED[key]
    return copy.deepcopy(g, {id(v.data): v.data for v in g.constants()})


def _cached(builder) -> Graph:
    """The fused graph with the KV cache inserted as ``optimize`` does it (in-place runtime)."""
    from arcompile.compiler.optimize import _insert_kv_cache

    g = _fused(builder)
    _insert_kv_cache(g, lambda _m: None, "inplace", 128)
    assert g.meta.get("kv_cache")
    return g


def _input_stats(graph: Graph, node, port) -> AbsStats:
    """|x| statistics of ``node``'s input ``port`` over the calibration sequences."""
    from arcompile.passes.linear_sites import gated_hidden

    stats = AbsStats()
    observe_inputs(graph, CALIBRATION, [node], lambda n, args: stats.add(
        gated_hidden(n, args) if port == "hidden" else args[port]))
    return stats


def _optimized_ops(model_path, folder) -> list[str]:
    """The op types ORT runs after its own graph optimizations (CPU, all levels)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(folder / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(folder / "optimized.onnx"), load_external_data=False)
    return [n.op_type for n in optimized.graph.node]


# -- the maths ----------------------------------------------------------------------------------
@pytest.mark.parametrize("N,K", [(96, 576), (7, 64)])
def test_weights_per_output_channel_are_within_half_a_step(N, K):
    torch.manual_seed(0)
    w = torch.randn(N, K) * torch.rand(N, 1) * 3
    w[1] = 0  # an all-zero row keeps scale 1, codes 0
    q_KN, scale_N = quantize_weight_per_channel(w)
    assert q_KN.dtype == torch.int8 and q_KN.shape == (K, N) and scale_N.shape == (N,)
    assert WEIGHT_QMAX == 63  # 7 bits: no int16 saturation in ORT's u8 x s8 kernels
    assert q_KN.abs().max() == 63 and scale_N[1] == 1 and not q_KN[:, 1].any()
    back = (q_KN.float() * scale_N).t()
    assert ((w - back).abs() <= scale_N[:, None] / 2 + 1e-7).all()
    assert torch.allclose(scale_N[0], w[0].abs().max() / 63)


def test_static_activation_rounding_ties_to_even_and_saturates():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, 126.6, 127.4, 500.0, -500.0])
    assert fake_quantize(x, 1.0).tolist() == [0, 2, 2, -0, 127, 127, 127, -128]
    assert torch.equal(fake_quantize(x * 0.01, 0.01), fake_quantize(x, 1.0) * torch.tensor(0.01))
    assert activation_scale(0.0) == 1.0  # an input that was always zero
    assert activation_scale(254.0) == 2.0


def test_percentile_statistic_is_exact_over_every_sample():
    torch.manual_seed(0)
    chunks = [torch.randn(16, 32) for _ in range(4)]
    stats = AbsStats(percentile=99.0, calls=4)
    for c in chunks:
        stats.add(c)
    a = torch.cat(chunks).abs()
    k = int(np.ceil(a.numel() * 0.01))
    assert stats.value() == torch.topk(a.reshape(-1), k).values[-1].item()
    assert torch.equal(stats.channel_max, a.amax(0))
    # without channel 3 (the statistic an outlier channel leaves): max of the others
    plain = AbsStats()
    for c in chunks:
        plain.add(c)
    keep = [j for j in range(32) if j != 3]
    assert plain.value(without=torch.tensor([3])) == a[:, keep].max().item()


def test_bad_settings_are_refused():
    for bad in (dict(statistic="p100"), dict(statistic="median"), dict(outlier_ratio=1.0),
                dict(max_outliers=-1)):
        with pytest.raises(ValueError):
            QuantizeW8A8(CALIBRATION, **bad)
    with pytest.raises(ValueError):
        QuantizeW8A8([])
    with pytest.raises(ValueError):
        SmoothQuant(CALIBRATION, alpha=1.5)


# -- smooth_quant: golden ---------------------------------------------------------------------
def test_smooth_golden_llama():
    g = _fused(tm.llama)
    before_ops = sorted(ops(g))
    norms = {n.module: n.inputs[-1].data for n in g.nodes()
             if n.op in ("arc.rms_norm", "arc.skip_rms_norm")}
    result = apply_pass(g, SmoothQuant(CALIBRATION, alpha=0.5))
    # per layer: the input norm -> merged QKV, the post-attention norm -> [gate; up],
    # up_proj's rows -> down_proj, v_proj's rows -> o_proj (GQA, 4 query heads on 2 KV heads)
    assert result.counts == {"norm": 4, "down": 2, "attention": 2}
    assert len(result.notes) == 1 and "model.model.norm" in result.notes[0]  # the LM head's
    assert result.max_abs_diff <= 1e-4
    assert sorted(ops(g)) == before_ops  # same ops: only constants were replaced
    for n in g.nodes():
        if n.op in ("arc.rms_norm", "arc.skip_rms_norm") and n.module != "model.model.norm":
            gain = n.inputs[-1]
            assert gain.producer.origin == "smooth_quant/norm"
            assert gain.name.endswith("_smooth") and not torch.equal(gain.data, norms[n.module])
    mlp = next(n for n in g.nodes() if n.op == "arc.gated_mlp")
    # gate: the norm's columns; up: down's rows, then the norm's columns; down: columns
    assert [w.producer.origin for w in mlp.inputs[1:4]] == [
        "smooth_quant/norm", "smooth_quant/norm", "smooth_quant/down"]


def test_smooth_alpha_half_balances_activation_and_weight_ranges():
    """alpha = 0.5: after smoothing, max|x_j| over the calibration tokens equals
    max_n |W[n, j]| for every channel j (both are sqrt(max|x_j| max|W_j|))."""
    g = _fused(tm.llama)
    apply_pass(g, SmoothQuant(CALIBRATION, alpha=0.5))
    qkv = next(n for n in g.nodes() if n.op == "arc.split_linear")
    x_max = _input_stats(g, qkv, 0).channel_max
    w = qkv.inputs[1]
    w_max = torch.cat([p.data for p in w.producer.inputs]).abs().amax(0)
    assert torch.allclose(x_max, w_max, rtol=1e-4)
    mlp = next(n for n in g.nodes() if n.op == "arc.gated_mlp")
    h_max = _input_stats(g, mlp, "hidden").channel_max
    assert torch.allclose(h_max, mlp.inputs[3].data.abs().amax(0), rtol=1e-4)


def test_smooth_gqa_head_mapping_of_the_o_proj_rule():
    """o_proj's input channel h * D + d (query head h) reads KV head h // 2 (4 heads on 2):
    its column scale is the KV channel's and the value rows take the inverse."""
    g = _fused(tm.llama)
    old_o = next(v for v in g.constants() if v.name.endswith("layers_0_self_attn_o_proj_weight"))
    old_v = next(v for v in g.constants() if v.name.endswith("layers_0_self_attn_v_proj_weight"))
    old_q = next(v for v in g.constants() if v.name.endswith("layers_0_self_attn_q_proj_weight"))
    o_data, v_data, q_data = old_o.data.clone(), old_v.data.clone(), old_q.data.clone()
    apply_pass(g, SmoothQuant(CALIBRATION, alpha=0.5))
    o_proj = next(n for n in g.nodes() if n.op == "aten.linear"
                  and n.module == "model.model.layers.0.self_attn.o_proj")
    col = (o_proj.arg("weight").data / o_data)[0]  # [Hq * D], the same for every row
    s = col.reshape(4, 16)  # 4 query heads x head_dim 16
    same = lambda a, b: torch.allclose(a, b, rtol=1e-6)  # noqa: E731  (W' / W rounds)
    assert same(s[0], s[1]) and same(s[2], s[3]) and not same(s[0], s[2])
    qkv = next(n for n in g.nodes() if n.op == "arc.split_linear"
               and n.module == "model.model.layers.0.self_attn")
    new_q, _new_k, new_v = (v.data for v in qkv.inputs[1].producer.inputs)
    norm_cols = (new_q / q_data)[0]  # the input norm's factor, per input channel
    rows = (new_v / (v_data * norm_cols))[:, 0]  # the value rows' factor, per KV channel
    assert torch.allclose(rows.reshape(2, 16), 1 / s[[0, 2]], rtol=1e-5)


# -- smooth_quant: numbers --------------------------------------------------------------------
@pytest.mark.parametrize("builder", [tm.llama, tm.opt, tm.gpt2, tm.gpt_neox, tm.nanogpt],
                         ids=["llama", "opt", "gpt2", "gpt_neox", "nanogpt"])
def test_smooth_is_exact_within_its_tolerance(builder):
    g = _fused(builder)
    records = PassManager([SmoothQuant(CALIBRATION)], [VerifyHook(),
                          NumericCheckHook(g, [TOKENS])]).run(g)
    assert records[0].counts.get("norm", 0) >= 4  # two norms a layer at least
    assert records[0].max_abs_diff <= 1e-4


def test_smooth_cached_step_with_packed_attention():
    g = _cached(tm.llama)
    result = apply_pass(g, SmoothQuant(CALIBRATION))
    assert result.counts == {"norm": 4, "down": 2, "attention": 2}
    assert result.max_abs_diff <= 1e-4


# -- smooth_quant: negatives ------------------------------------------------------------------
class Attention(torch.nn.Module):
    """One attention block; ``scale_value`` multiplies V before the heads (a near miss for
    the o_proj rule: V is no longer a projection's output), ``norm_reused`` adds the norm's
    output to the result (a near miss for the norm rule: a reader that is not a linear)."""

    def __init__(self, scale_value=False, norm_reused=False):
        super().__init__()
        torch.manual_seed(0)
        self.scale_value, self.norm_reused = scale_value, norm_reused
        self.emb = torch.nn.Embedding(16, 32)
        self.norm = torch.nn.RMSNorm(32, eps=1e-5)
        self.q, self.k, self.v, self.o = (torch.nn.Linear(32, 32, bias=False) for _ in range(4))
        self.head = torch.nn.Linear(32, 16, bias=False)

    def forward(self, ids):
        B, T = ids.shape
        h = self.norm(self.emb(ids))
        v = self.v(h) * 0.5 if self.scale_value else self.v(h)
        q, k, v = (t.view(B, T, 4, 8).transpose(1, 2) for t in (self.q(h), self.k(h), v))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = self.o(a.transpose(1, 2).reshape(B, T, 32))
        return self.head(y + h if self.norm_reused else y)


def _smoothed(model) -> tuple[Graph, object]:
    g = cleanup(to_ir(model.eval(), TOKENS))
    PassManager(build_pipeline("default"), [VerifyHook()]).run(g)
    before = [(n.op, n.inputs) for n in g.nodes()]
    result = SmoothQuant(CALIBRATION_16).run(g)
    return g, before, result


def test_smooth_near_misses_stay_as_they_were():
    _, _, result = _smoothed(Attention())
    assert result.counts == {"norm": 1, "attention": 1}
    g, before, result = _smoothed(Attention(scale_value=True))
    assert result.counts == {"norm": 1}
    assert any("the value is made by aten.mul.Tensor, not a linear" in n for n in result.notes), \
        result.notes
    g, before, result = _smoothed(Attention(norm_reused=True))
    assert result.counts == {"attention": 1}
    assert any("aten.add.Tensor" in n and "not a linear" in n for n in result.notes), \
        result.notes
    norm = next(n for n in g.nodes() if n.op == "arc.rms_norm")
    assert norm.inputs[1].producer.origin == "frontend"  # its gain untouched


# -- quantize_w8a8: golden --------------------------------------------------------------------
def test_w8a8_golden_llama():
    g = _fused(tm.llama)
    o_proj = next(n for n in g.nodes() if n.op == "aten.linear"
                  and n.module == "model.model.layers.0.self_attn.o_proj")
    o_max = _input_stats(g, o_proj, 0).value()
    result = apply_pass(g, QuantizeW8A8(CALIBRATION, outlier_ratio=None))
    assert result.counts == {"w8a8_max": 8}  # per layer: merged QKV, o_proj, [gate; up], down
    assert result.notes == ["kept aten.linear at model.lm_head in float: it is the LM head, "
                            "kept in float (include_lm_head=False)"]
    got = ops(g)
    assert got.count("arc.qlinear") == 8 and got.count("aten.linear") == 1  # the LM head
    assert not any(op in got for op in ("arc.gated_mlp", "arc.split_linear",
                                        "arc.concat_weights"))
    layer0 = [n for n in g.nodes() if n.module.startswith("model.model.layers.0.")
              and n.op in ("arc.qlinear", "aten.split_with_sizes", "aten.silu",
                           "aten.mul.Tensor")]
    assert [(n.op, n.module.removeprefix("model.model.layers.0.")) for n in layer0] == [
        ("arc.qlinear", "self_attn"), ("aten.split_with_sizes", "self_attn"),
        ("arc.qlinear", "self_attn.o_proj"),
        ("arc.qlinear", "mlp"), ("aten.split_with_sizes", "mlp"), ("aten.silu", "mlp"),
        ("aten.mul.Tensor", "mlp"), ("arc.qlinear", "mlp")]
    assert all(n.origin == "quantize_w8a8/w8a8_max" for n in layer0)
    qkv, o, gate_up, down = (n for n in layer0 if n.op == "arc.qlinear")
    assert o.attrs == {"x_scale": activation_scale(o_max), "x_zero_point": 0,
                       "has_outliers": False, "has_bias": False}
    for node, (K, N) in ((qkv, (64, 128)), (o, (64, 64)), (gate_up, (64, 256)),
                         (down, (128, 64))):
        _x, w_q, w_scale = node.inputs
        assert w_q.dtype == torch.int8 and w_q.shape == (K, N) and w_scale.shape == (N,)
        assert w_q.name.endswith("_q8_KN") and w_scale.name.endswith("_scale_N")
    assert layer0[1].attrs["split_sizes"] == [64, 32, 32]


def test_w8a8_golden_biases_and_decomposed_forms():
    g = _fused(tm.opt)  # biases on every linear (merged QKV biases concatenated)
    assert apply_pass(g, QuantizeW8A8(CALIBRATION)).counts["w8a8_max"] == 8
    assert all(n.attrs["has_bias"] for n in g.nodes() if n.op == "arc.qlinear")
    g = _fused(tm.llama, decomposed=True)  # mm / in_out weights, o_proj as bmm(expand)
    assert apply_pass(g, QuantizeW8A8(CALIBRATION)).counts["w8a8_max"] == 8
    assert not any(op in ops(g) for op in ("aten.bmm", "aten.addmm", "arc.gated_mlp"))
    assert {n.inputs[1].shape for n in g.nodes() if n.op == "arc.qlinear"} == {
        (64, 128), (64, 64), (64, 256), (128, 64)}


# -- quantize_w8a8: numbers -------------------------------------------------------------------
@pytest.mark.parametrize("builder,decomposed", [(tm.llama, False), (tm.opt, False),
                                                (tm.llama, True)],
                         ids=["llama", "opt", "llama-decomposed"])
def test_w8a8_numbers_interpreter_and_ort(tmp_path, builder, decomposed):
    g = _fused(builder, decomposed)
    float_logits = run_graph(g, [X])[0]
    PassManager([SmoothQuant(CALIBRATION), QuantizeW8A8(CALIBRATION)], [VerifyHook()]).run(g)
    ref = run_graph(g, [X])[0]
    got = run_onnx(g, tmp_path, X)  # ORT's optimizations off: Q, DQ, MatMul as written
    assert abs(got - ref.numpy()).max() <= 1e-4
    # and the quantized graph is still the model: a few int8 steps off the float logits
    assert (ref - float_logits).abs().max() <= 0.05 * float_logits.abs().max()


def test_w8a8_cached_engine_through_optimize(tmp_path):
    report = arcompile.optimize(tm.llama(), tmp_path / "w8a8", quantize="w8a8", log=None)
    q = report.quantization
    assert q["mode"] == "w8a8" and q["settings"]["statistic"] == "max"
    assert q["perplexity_increase"] <= 0.03 and q["greedy_agreement"] >= 0.9
    assert abs(q["perplexity_onnxruntime"] / q["perplexity"] - 1) <= 0.02
    manifest = json.loads((tmp_path / "w8a8" / "arcompile.json").read_text())
    names = [p["name"] for p in manifest["passes"]]
    assert names[-3:] == ["smooth_quant", "quantize_w8a8", "dce"]
    smooth = manifest["passes"][-3]
    assert smooth["counts"] == {"norm": 4, "down": 2, "attention": 2}
    assert smooth["settings"]["alpha"] == 0.5 and smooth["max_abs_diff"] <= 1e-4
    ops_run = _optimized_ops(tmp_path / "w8a8" / "model.onnx", tmp_path)
    assert ops_run.count("MatMulIntegerToFloat") == 8  # every quantized linear, in integers
    assert not any(op.startswith("DynamicQuantize") for op in ops_run)
    eng = arcompile.load(tmp_path / "w8a8")
    assert len(eng.generate([5, 17, 42, 8], max_new_tokens=8)) == 8
    with pytest.raises(ArcompileError, match="group-size does not apply"):
        arcompile.optimize(tm.llama(), tmp_path / "bad", quantize="w8a8", group_size=32,
                           log=None)
    assert not (tmp_path / "bad").exists()


# -- the 576-wide layer and outlier channels --------------------------------------------------
class Wide(torch.nn.Module):
    """SmolLM2's width, K = 576, with one input channel ``massive`` times the others."""

    def __init__(self, massive: float = 1.0):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(16, 576)
        with torch.no_grad():
            self.emb.weight[:, 100] *= massive
        self.proj = torch.nn.Linear(576, 96, bias=False)
        self.out = torch.nn.Linear(96, 16)

    def forward(self, ids):
        # tanh, not relu: ORT 1.32 leaves a DQ -> MatMul -> Relu -> Q in float (measured)
        return self.out(torch.tanh(self.proj(self.emb(ids))))


def test_w8a8_576_wide_layer_in_ort_runs_integer_kernels(tmp_path):
    model = Wide().eval()
    g = cleanup(to_ir(model, TOKENS))
    result = apply_pass(g, QuantizeW8A8(CALIBRATION_16, include_lm_head=True))
    assert result.counts == {"w8a8_max": 2} and not result.notes
    proj = next(n for n in g.nodes() if n.op == "arc.qlinear" and n.inputs[1].shape[0] == 576)
    assert proj.inputs[1].shape == (576, 96) and not proj.attrs["has_outliers"]
    ref = run_graph(g, [X])[0]
    assert abs(run_onnx(g, tmp_path, X) - ref.numpy()).max() <= 1e-4
    # ORT's own optimizations: the Q/DQ pairs become integer matmuls, no dynamic quantization
    ops_run = _optimized_ops(tmp_path / "model.onnx", tmp_path)
    assert ops_run.count("MatMulIntegerToFloat") + ops_run.count("QLinearMatMul") == 2, ops_run
    assert not any(op.startswith("DynamicQuantize") for op in ops_run)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    fast = session.run(None, {session.get_inputs()[0].name: X.numpy()})[0]
    assert abs(fast - ref.numpy()).max() <= 1e-3 * ref.abs().max().item()


def test_w8a8_outlier_channel_runs_in_float(tmp_path):
    model = Wide(massive=300.0).eval()
    want = model(X).detach()
    errors = {}
    for ratio in (None, 4.0):
        g = cleanup(to_ir(model, TOKENS))
        counts = apply_pass(g, QuantizeW8A8(CALIBRATION_16, outlier_ratio=ratio)).counts
        assert counts == ({"w8a8_max": 1} if ratio is None
                          else {"w8a8_max": 1, "float_outlier_channels": 1})
        proj = next(n for n in g.nodes() if n.op == "arc.qlinear")
        errors[ratio] = (run_graph(g, [X])[0] - want).abs().max().item()
        if ratio is None:
            assert not proj.attrs["has_outliers"]
            continue
        assert proj.attrs["has_outliers"]
        _x, w_q, _scale, channels, weight_CN = proj.inputs
        assert channels.data.tolist() == [100] and weight_CN.shape == (1, 96)
        assert not w_q.data[100].any()  # the channel's int8 row is zero
        assert torch.equal(weight_CN.data[0], model.proj.weight.data[:, 100])
        ref = run_graph(g, [X])[0]
        assert abs(run_onnx(g, tmp_path, X) - ref.numpy()).max() <= 1e-4
    assert errors[4.0] * 10 < errors[None]


# -- quantize_w8a8: negatives -----------------------------------------------------------------
def test_w8a8_leaves_a_computed_weight_alone():
    class Computed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb = torch.nn.Embedding(16, 32)
            self.w = torch.nn.Parameter(torch.randn(32, 32))

        def forward(self, ids):
            return torch.nn.functional.linear(self.emb(ids), self.w * ids.float().mean())

    g = cleanup(to_ir(Computed().eval(), TOKENS))
    before = [(n.op, n.attrs) for n in g.nodes()]
    result = QuantizeW8A8(CALIBRATION_16, include_lm_head=True).run(g)
    assert not result.changed and [(n.op, n.attrs) for n in g.nodes()] == before
    assert any("is computed, not a constant" in n for n in result.notes), result.notes


# -- the real model: the gate --------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_w8a8_gate_trips_on_a_bad_setting_and_writes_nothing(tmp_path, capsys,
                                                                      monkeypatch):
    """Clipping at the 99.9th percentile and no outlier channels: SmolLM2's first-token
    activations (thousands, in a few channels) are cut, perplexity several times fp32's."""
    from arcompile.cli.main import main
    from arcompile.compiler import quantization
    from arcompile.frontend.load import find_smollm2_gguf

    monkeypatch.setattr(quantization, "W8A8_STATISTIC", "p99.9")
    monkeypatch.setattr(quantization, "W8A8_OUTLIER_RATIO", None)
    out = tmp_path / "w8a8"
    code = main(["optimize", str(find_smollm2_gguf()), "-o", str(out), "--quantize", "w8a8",
                 "--calibration-samples", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "perplexity rose from 12.7" in err and "nothing was written" in err
    assert "beyond --max-ppl-increase 3.00%" in err
    assert not out.exists()
