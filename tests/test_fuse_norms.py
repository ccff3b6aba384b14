"""fuse_norms, three tests at least (STYLE.md #9): golden before/after on the tiny models and
on hand-written norms, numbers in ONNX Runtime (its optimizations off, and on) against eager,
and negatives (another dim, no eps, a shared intermediate) that must stay as they were."""

from __future__ import annotations

import numpy as np
import pytest
import tiny_models
import torch
from helpers import ops, run_onnx, to_ir

from arcompile.frontend.export import export_module
from arcompile.frontend.from_export import from_exported_program
from arcompile.ir import run_graph, verify
from arcompile.ir.graph import Graph
from arcompile.passes import NumericCheckHook, PassManager, VerifyHook
from arcompile.passes.constant_folding import ConstantFolding
from arcompile.passes.cse import CommonSubexpressionElimination
from arcompile.passes.dce import DeadCodeElimination
from arcompile.passes.fuse_norms import FuseNorms
from arcompile.passes.remove_noops import RemoveNoOps

TOKENS = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
OTHER_TOKENS = torch.tensor([[7, 1, 8, 2, 8, 1, 8], [2, 8, 4, 5, 9, 0, 4]])
NORM_OPS = ("arc.rms_norm", "arc.layer_norm", "arc.skip_rms_norm", "arc.skip_layer_norm")


def optimize(graph: Graph, tokens: torch.Tensor = TOKENS, check: bool = True):
    """The canonical passes, then fuse_norms, then dce; returns fuse_norms' record.

    ``check=False`` leaves out the numeric hook: in float16 the fused norms (which compute in
    float32, as F.layer_norm does) differ from written-out fp16 maths by more than 1e-4."""
    passes = [RemoveNoOps(), ConstantFolding(), CommonSubexpressionElimination(), FuseNorms(),
              DeadCodeElimination()]
    hooks = [VerifyHook()] + ([NumericCheckHook(graph, [tokens])] if check else [])
    records = PassManager(passes, hooks).run(graph)
    return records[3]


def canonical(graph: Graph) -> Graph:
    PassManager([RemoveNoOps(), ConstantFolding(), CommonSubexpressionElimination(),
                 DeadCodeElimination()]).run(graph)
    return graph


def norms(graph: Graph) -> list:
    return [n for n in graph.nodes() if n.op in NORM_OPS]


# -- hand-written norms ------------------------------------------------------------------------

class Written(torch.nn.Module):
    """Norms as people write them: LLaMA's RMSNorm (optionally computing in float32), an RMSNorm
    with sqrt and a division and no weight, a LayerNorm with mean/var, one with torch.var."""

    def __init__(self, dtype=torch.float32, vocab=16, hidden=8):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, hidden).to(dtype)
        self.w = torch.nn.Parameter(torch.rand(hidden, dtype=dtype) + 0.5)
        self.b = torch.nn.Parameter(torch.rand(hidden, dtype=dtype))
        self.proj = torch.nn.Linear(hidden, hidden).to(dtype)

    def rms_llama(self, x):
        # h = x.to(float32); h * rsqrt(mean(h^2) + eps); weight * h.to(input_dtype)
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.w * h.to(x.dtype)

    def rms_div(self, x):
        # x / sqrt(mean(x*x) + eps), no weight
        return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + 1e-5)

    def ln_meanvar(self, x):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * self.w + self.b

    def ln_var(self, x):
        mu = x.mean(-1, keepdim=True)
        var = x.var(-1, keepdim=True, unbiased=False)
        return (x - mu) * torch.rsqrt(var + 1e-5) * self.w

    def forward(self, ids):
        x = self.emb(ids)
        r1 = x + self.proj(self.rms_llama(x))        # plain RMS (input is the embedding)
        r2 = r1 + self.proj(self.rms_div(r1))        # skip RMS without a weight
        r3 = r2 + self.proj(self.ln_meanvar(r2))     # skip LN with bias
        return self.ln_var(r3 + self.proj(r3))       # skip LN, weight only


def test_written_norms_golden():
    g = to_ir(Written().eval(), TOKENS)
    record = optimize(g)
    assert record.counts == {"rms_norm": 2, "layer_norm": 2, "skip_rms_norm": 1,
                             "skip_layer_norm": 2}
    found = norms(g)
    assert [n.op for n in found] == ["arc.rms_norm", "arc.skip_rms_norm", "arc.skip_layer_norm",
                                     "arc.skip_layer_norm"]
    assert [n.attrs for n in found] == [{"eps": 1e-6}, {"eps": 1e-5}, {"eps": 1e-5},
                                        {"eps": 1e-5}]  # fp32: no compute_dtype cast
    assert [len(n.inputs) for n in found] == [2, 3, 4, 3]  # x, (skip,) weight, (bias)
    assert [len(n.outputs) for n in found] == [1, 2, 2, 2]
    ones = found[1].inputs[2]  # rms_div had no weight: a constant of ones stands in
    assert ones.is_constant and torch.equal(ones.data, torch.ones(8))
    assert {n.origin for n in found} == {"fuse_norms/rms_norm", "fuse_norms/skip_rms_norm",
                                         "fuse_norms/skip_layer_norm"}
    # nothing of the written-out maths is left
    left = set(ops(g))
    assert not left & {"aten.rsqrt", "aten.sqrt", "aten.mean.dim", "aten.var.correction",
                       "aten.pow.Tensor_Scalar", "aten.div.Tensor", "aten.sub.Tensor"}
    # the sums r2, r3 feed the next residual add: s (output 1) is read again; the last is not
    assert not found[3].outputs[1].uses()
    for n in found[1:3]:
        assert any(u.op == "aten.add.Tensor" or u.op in NORM_OPS for u, _ in n.outputs[1].uses())


def test_llama_golden():
    g = to_ir(tiny_models.llama(), TOKENS)
    record = optimize(g)
    assert record.counts == {"rms_norm": 5, "skip_rms_norm": 4}
    found = norms(g)
    assert [n.op for n in found] == ["arc.rms_norm"] + ["arc.skip_rms_norm"] * 4
    assert [n.module for n in found] == [
        "model.model.layers.0.input_layernorm", "model.model.layers.0.post_attention_layernorm",
        "model.model.layers.1.input_layernorm", "model.model.layers.1.post_attention_layernorm",
        "model.model.norm"]
    assert all(n.attrs == {"eps": 1e-6} for n in found)
    assert found[0].inputs[0].producer.op == "aten.embedding"
    assert "aten.rsqrt" not in ops(g)
    # the first norm reads the embedding, not a sum: said so
    assert any("layers.0.input_layernorm" in t and "aten.embedding" in t for t in record.notes)


@pytest.mark.parametrize("name,counts,skip_ops", [
    ("gpt2", {"aten_layer_norm": 5, "skip_layer_norm": 4}, 4),
    # parallel residual: both norms of layer 1 read one sum; the first takes the add
    ("gpt_neox", {"aten_layer_norm": 5, "skip_layer_norm": 2}, 2),
    # OPT reshapes the sum to [B*T, H] before its final_layer_norm: only plain norms there
    ("opt", {"aten_layer_norm": 5, "skip_layer_norm": 1}, 1),
    ("nanogpt", {"aten_layer_norm": 5, "skip_layer_norm": 4}, 4),
])
def test_layer_norm_models_golden(name, counts, skip_ops):
    g = to_ir(tiny_models.BUILDERS[name](), TOKENS)
    record = optimize(g)
    assert record.counts == counts
    found = norms(g)
    assert len(found) == 5 and "aten.layer_norm" not in ops(g)
    assert sum(n.op == "arc.skip_layer_norm" for n in found) == skip_ops
    assert all(n.attrs == {"eps": 1e-5} and len(n.inputs) in (3, 4) for n in found)
    if name == "gpt_neox":
        assert any("already fused there" in t for t in record.notes)
        fused = [n for n in found if n.op == "arc.skip_layer_norm"][0]
        readers = {u.module for u, _ in fused.outputs[1].uses()}
        assert "model.gpt_neox.layers.1.post_attention_layernorm" in readers


def test_native_layer_norm_from_decompositions_golden():
    program = export_module(tiny_models.nanogpt(), example_inputs=(TOKENS,)).run_decompositions()
    g = from_exported_program(program, "nanogpt_decomposed")
    assert "aten.native_layer_norm" in ops(g)
    record = optimize(g)
    assert record.counts == {"native_layer_norm": 5, "skip_layer_norm": 4}
    assert "aten.native_layer_norm" not in ops(g)


def test_half_precision_rms_keeps_its_float32_compute():
    model = Written(dtype=torch.float16).eval()
    g = to_ir(model, TOKENS)
    optimize(g, check=False)
    first = norms(g)[0]
    assert first.op == "arc.rms_norm"
    assert first.attrs == {"eps": 1e-6, "compute_dtype": torch.float32}
    assert first.inputs[0].dtype == torch.float16 and first.output.dtype == torch.float16
    assert "aten._to_copy" not in ops(g) and "aten.to.dtype" not in ops(g)


# -- numbers -----------------------------------------------------------------------------------

FORMS = {  # graph.meta["onnxruntime.norm_lowering"] -> ONNX ops the norms must lower to
    "fused": {"SimplifiedLayerNormalization", "LayerNormalization"},
    "skip_kernels": {"SkipSimplifiedLayerNormalization", "SkipLayerNormalization"},
    "plain": {"ReduceMean", "LayerNormalization"},
}
NORM_ONNX = {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization",
             "SkipLayerNormalization"}


def onnx_ops(folder) -> set[str]:
    import onnx

    return {n.op_type for n in onnx.load(str(folder / "model.onnx"),
                                         load_external_data=False).graph.node}


def check_both_ways(graph: Graph, folder, tokens: torch.Tensor, want: np.ndarray, tol: float):
    """The lowered graph against ``want``, with ORT's optimizations off, then on."""
    from arcompile.runtimes.onnxruntime.session import make_session

    got = run_onnx(graph, folder, tokens)  # lowers; ORT_DISABLE_ALL
    assert np.abs(got - want).max() <= tol
    session = make_session(folder / "model.onnx", optimize=True)
    opt = session.run(None, {session.get_inputs()[0].name: tokens.numpy()})[0]
    assert np.abs(opt - want).max() <= tol


@pytest.mark.parametrize("name", sorted(tiny_models.BUILDERS))
@pytest.mark.parametrize("form", sorted(FORMS))
def test_numbers_against_eager(name, form, tmp_path):
    model = tiny_models.BUILDERS[name]()
    g = to_ir(model, TOKENS)
    optimize(g)
    g.meta["onnxruntime.norm_lowering"] = form
    check_both_ways(g, tmp_path, OTHER_TOKENS, model(OTHER_TOKENS).detach().numpy(), 1e-4)
    made = onnx_ops(tmp_path)
    assert made & FORMS[form]
    if form == "plain":
        assert not made & NORM_ONNX


@pytest.mark.parametrize("form", sorted(FORMS))
def test_written_norms_numbers(form, tmp_path):
    model = Written().eval()
    g = to_ir(model, TOKENS)
    optimize(g)
    g.meta["onnxruntime.norm_lowering"] = form
    check_both_ways(g, tmp_path, OTHER_TOKENS, model(OTHER_TOKENS).detach().numpy(), 1e-4)
    assert onnx_ops(tmp_path) >= FORMS[form]


def test_half_precision_numbers(tmp_path):
    model = Written(dtype=torch.float16).eval()
    g = to_ir(model, TOKENS)
    optimize(g, check=False)
    want = model(OTHER_TOKENS).detach().float().numpy()
    got = run_graph(g, [OTHER_TOKENS])[0].float().numpy()
    assert np.abs(got - want).max() <= 1e-2  # fp16 rounding of the result, not the fusion
    onnx_out = run_onnx(g, tmp_path, OTHER_TOKENS).astype(np.float32)
    assert np.abs(onnx_out - want).max() <= 1e-2


def test_gpt2_from_torchscript(tmp_path):
    from arcompile.frontend.load import load_model

    model = tiny_models.gpt2()
    path = tiny_models.trace_torchscript(model, tmp_path / "gpt2.pt")
    g = from_exported_program(load_model(str(path), log=lambda _m: None).program, "ts")
    tokens = torch.randint(0, tiny_models.VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    record = optimize(g, tokens)
    assert record.counts == {"aten_layer_norm": 5, "skip_layer_norm": 4}
    assert all(n.attrs == {"eps": 1e-5} for n in norms(g))  # TorchScript leaves eps default
    got = run_onnx(g, tmp_path / "onnx", tokens)
    assert np.abs(got - model(tokens).detach().numpy()).max() <= 1e-4


# -- negatives ---------------------------------------------------------------------------------

class NearMisses(torch.nn.Module):
    """Four norm look-alikes that must not fuse."""

    def __init__(self, variant: str):
        super().__init__()
        self.variant = variant
        self.emb = torch.nn.Embedding(16, 8)
        self.w = torch.nn.Parameter(torch.rand(8) + 0.5)

    def forward(self, ids):
        x = self.emb(ids)  # (B, T, 8)
        if self.variant == "other_dim":      # mean over the sequence, not the hidden dim
            return self.w * (x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-6))
        if self.variant == "no_eps":
            return self.w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True)))
        if self.variant == "rsqrt_reused":   # the rsqrt also scales the output
            r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
            return self.w * (x * r) + r
        if self.variant == "variance_reused":  # LayerNorm whose variance is also returned
            mu = x.mean(-1, keepdim=True)
            var = ((x - mu) ** 2).mean(-1, keepdim=True)
            return (x - mu) / torch.sqrt(var + 1e-5) * self.w + var
        raise ValueError(self.variant)


@pytest.mark.parametrize("variant,reason", [
    ("other_dim", "not the last dim"),
    ("no_eps", "no eps added"),
    ("rsqrt_reused", "the rsqrt"),
    ("variance_reused", "the variance"),
])
def test_near_misses_stay(variant, reason):
    g = canonical(to_ir(NearMisses(variant).eval(), TOKENS))
    before = ops(g)
    result = FuseNorms().run(g)
    verify(g)
    assert result.counts == {}
    assert ops(g) == before
    assert len(result.notes) == 1 and reason in result.notes[0], result.notes


def test_skip_refused_for_a_broadcast_add():
    # gpt2's first norm reads token + position embeddings, whose second operand is [1, T, H]
    g = canonical(to_ir(tiny_models.gpt2(), TOKENS))
    result = FuseNorms().run(g)
    first = norms(g)[0]
    assert first.op == "arc.layer_norm" and first.inputs[0].producer.op == "aten.add.Tensor"
    assert any("h.0.ln_1" in t and "sum's shape" in t for t in result.notes)


# -- the real model ----------------------------------------------------------------------------

def test_smollm2_both_forms(smollm2, smollm2_decomposed, tmp_path):
    """61 RMSNorms (2 per layer + final): the first reads the embedding, the other 60 a sum."""
    tokens = smollm2.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    want = smollm2.module(tokens).detach().numpy()
    for loaded in (smollm2, smollm2_decomposed):
        g = from_exported_program(loaded.program, "smollm2")
        record = optimize(g, tokens)
        assert record.counts == {"rms_norm": 61, "skip_rms_norm": 60}
        assert [n.op for n in norms(g)] == ["arc.rms_norm"] + ["arc.skip_rms_norm"] * 60
        assert record.max_abs_diff <= FuseNorms.tolerance
    got = run_onnx(g, tmp_path, tokens)  # the decomposed form, ORT optimizations off
    assert np.abs(got - want).max() <= 1e-3




class TorchRMSNorm(torch.nn.Module):
    """torch.nn.RMSNorm (traced as aten.rms_norm) behind a residual add, eps left default."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(16, 8)
        self.proj = torch.nn.Linear(8, 8)
        self.norm = torch.nn.RMSNorm(8)

    def forward(self, ids):
        x = self.emb(ids)
        return self.norm(x + self.proj(x))


def test_aten_rms_norm(tmp_path):
    model = TorchRMSNorm().eval()
    g = to_ir(model, TOKENS)
    assert "aten.rms_norm" in ops(g)
    record = optimize(g)
    assert record.counts == {"aten_rms_norm": 1, "skip_rms_norm": 1}
    (norm,) = norms(g)
    assert norm.op == "arc.skip_rms_norm" and norm.module == "norm"
    assert norm.attrs == {"eps": torch.finfo(torch.float32).eps}
    check_both_ways(g, tmp_path, OTHER_TOKENS, model(OTHER_TOKENS).detach().numpy(), 1e-4)
