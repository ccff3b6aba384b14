"""fuse_mlp: golden before/after, numbers against eager (ORT optimizations off), negatives
that must stay as they were (STYLE.md #9), and the counts on the real SmolLM2."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import apply_pass, cleanup, ops, run_onnx, to_ir
from tiny_models import llama, nanogpt

from arcompile.frontend.export import export_module
from arcompile.frontend.from_export import from_exported_program
from arcompile.passes import NumericCheckHook, PassManager, VerifyHook
from arcompile.passes.constant_folding import ConstantFolding
from arcompile.passes.cse import CommonSubexpressionElimination
from arcompile.passes.dce import DeadCodeElimination
from arcompile.passes.fuse_mlp import FuseGatedMLP
from arcompile.passes.remove_noops import RemoveNoOps

TOKENS = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
H, I = 16, 24  # hidden, intermediate

ACTS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}


class GatedMLP(torch.nn.Module):
    """embedding -> down(act(gate(x)) * up(x)); ``swap`` writes the product as up * act(gate)."""

    def __init__(self, act: str = "silu", bias: bool = False, swap: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(16, H)
        self.gate = torch.nn.Linear(H, I, bias=bias)
        self.up = torch.nn.Linear(H, I, bias=bias)
        self.down = torch.nn.Linear(I, H, bias=bias)
        self.act, self.swap = ACTS[act], swap

    def forward(self, ids):
        x = self.emb(ids)  # (B, T, H)
        gate_BTI, up_BTI = self.act(self.gate(x)), self.up(x)
        return self.down(up_BTI * gate_BTI if self.swap else gate_BTI * up_BTI)


def ptr(value) -> int:
    """Where a constant's bytes live: the model's own parameter when nothing was copied."""
    return value.data.data_ptr()


def _prep(g):
    return cleanup(g)


def _fuse(g):
    return apply_pass(g, FuseGatedMLP())


def _decomposed_ir(module, name="test"):
    program = export_module(module, example_inputs=(TOKENS,)).run_decompositions()
    return from_exported_program(program, name)


# -- golden ---------------------------------------------------------------------------------
def test_fuse_mlp_golden_exported_form():
    model = GatedMLP().eval()
    g = _prep(to_ir(model, TOKENS))
    assert ops(g) == ["aten.embedding", "aten.linear", "aten.silu", "aten.linear",
                      "aten.mul.Tensor", "aten.linear"]
    result = _fuse(g)
    assert result.counts == {"gated_mlp": 1}
    assert ops(g) == ["aten.embedding", "arc.gated_mlp"]
    fused = next(n for n in g.nodes() if n.op == "arc.gated_mlp")
    assert fused.attrs == {"activation": "silu", "weight_layout": "out_in",
                           "has_bias": [False, False, False]}
    assert fused.origin == "fuse_mlp/gated_mlp"
    x, w_gate, w_up, w_down = fused.inputs
    assert x.producer.op == "aten.embedding"
    # the very tensors the model holds: nothing was copied
    assert [ptr(v) for v in (w_gate, w_up, w_down)] == [
        t.data_ptr() for t in (model.gate.weight, model.up.weight, model.down.weight)]
    assert fused.output is g.outputs[0] and fused.output.shape == g.outputs[0].shape


@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh"])
def test_fuse_mlp_golden_activations_biases_and_swapped_product(act):
    model = GatedMLP(act, bias=True, swap=True).eval()
    g = _prep(to_ir(model, TOKENS))
    assert _fuse(g).counts == {"gated_mlp": 1}
    fused = next(n for n in g.nodes() if n.op == "arc.gated_mlp")
    assert fused.attrs["activation"] == act and fused.attrs["has_bias"] == [True, True, True]
    assert [ptr(v) for v in fused.inputs[1:]] == [
        t.data_ptr() for t in (model.gate.weight, model.up.weight, model.down.weight,
                               model.gate.bias, model.up.bias, model.down.bias)]


def test_fuse_mlp_activation_on_up_is_the_same_formula_with_roles_swapped():
    class Swapped(GatedMLP):
        def forward(self, ids):  # act(up(x)) * gate(x): the names swap, the maths does not
            x = self.emb(ids)
            return self.down(F.silu(self.up(x)) * self.gate(x))
    model = Swapped().eval()
    g = _prep(to_ir(model, TOKENS))
    assert _fuse(g).counts == {"gated_mlp": 1}
    fused = next(n for n in g.nodes() if n.op == "arc.gated_mlp")
    assert ptr(fused.inputs[1]) == model.up.weight.data_ptr()  # the activated one: "gate"
    assert ptr(fused.inputs[2]) == model.gate.weight.data_ptr()


def test_fuse_mlp_golden_decomposed_llama():
    g = _prep(_decomposed_ir(llama()))
    assert g.op_count("aten.sigmoid") == 2  # silu decomposed: g * sigmoid(g)
    mms = g.op_count("aten.mm")
    result = _fuse(g)
    assert result.counts == {"gated_mlp": 2}
    assert g.op_count("aten.sigmoid") == 0 and g.op_count("aten.mm") == mms - 6
    for i, fused in enumerate(n for n in g.nodes() if n.op == "arc.gated_mlp"):
        assert fused.attrs == {"activation": "silu", "weight_layout": "in_out",
                               "has_bias": [False, False, False]}
        assert fused.module == f"model.model.layers.{i}.mlp"
        assert fused.inputs[0].shape == ("B*T", 64)  # the 2-D view the mm's read
        assert [v.shape for v in fused.inputs[1:]] == [(64, 128), (64, 128), (128, 64)]


# -- numbers --------------------------------------------------------------------------------
@pytest.mark.parametrize("decomposed", [False, True], ids=["exported", "decomposed"])
def test_fuse_mlp_numbers_llama_against_eager(tmp_path, decomposed):
    model = llama()
    g = _decomposed_ir(model) if decomposed else to_ir(model, TOKENS)
    hooks = [VerifyHook(), NumericCheckHook(g, [TOKENS])]
    records = PassManager([RemoveNoOps(), ConstantFolding(), CommonSubexpressionElimination(),
                           FuseGatedMLP(), DeadCodeElimination()], hooks).run(g)
    assert records[3].counts == {"gated_mlp": 2}
    x = torch.tensor([[7, 3, 9, 1, 2, 8, 4]])
    got = run_onnx(g, tmp_path, x)
    assert abs(got - model(x).detach().numpy()).max() <= 1e-4


@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh"])
def test_fuse_mlp_numbers_with_biases_against_eager(tmp_path, act):
    model = GatedMLP(act, bias=True).eval()
    g = _prep(to_ir(model, TOKENS))
    _fuse(g)
    assert "arc.gated_mlp" in ops(g)
    got = run_onnx(g, tmp_path, TOKENS)
    assert abs(got - model(TOKENS).detach().numpy()).max() <= 1e-4


# -- negatives ------------------------------------------------------------------------------
def _unchanged(model, reason: str):
    g = _prep(to_ir(model, TOKENS))
    before = ops(g)
    result = FuseGatedMLP().run(g)
    assert not result.changed and ops(g) == before
    assert any(reason in note for note in result.notes), result.notes


def test_fuse_mlp_refuses_gate_output_with_another_user():
    class Leaky(GatedMLP):
        def forward(self, ids):
            x = self.emb(ids)
            g = self.gate(x)
            return self.down(F.silu(g) * self.up(x)) + g[..., :H]  # gate read elsewhere
    _unchanged(Leaky().eval(), "has another user outside the MLP")


def test_fuse_mlp_refuses_gate_and_up_on_different_inputs():
    class TwoInputs(GatedMLP):
        def forward(self, ids):
            x = self.emb(ids)
            return self.down(F.silu(self.gate(x)) * self.up(x * 2))
    _unchanged(TwoInputs().eval(), "gate and up read different inputs")


def test_fuse_mlp_refuses_unsupported_activation():
    class Relu(GatedMLP):
        def forward(self, ids):
            x = self.emb(ids)
            return self.down(torch.relu(self.gate(x)) * self.up(x))
    _unchanged(Relu().eval(), "aten.relu is not supported")


def test_fuse_mlp_leaves_non_gated_mlp_alone():
    _unchanged(nanogpt(), "non-gated MLP")


# -- the real model -------------------------------------------------------------------------
def test_fuse_mlp_smollm2_both_forms(smollm2, smollm2_decomposed):
    tokens = torch.tensor([[1, 504, 3458, 314, 4649, 30]])
    for loaded, layout in ((smollm2, "out_in"), (smollm2_decomposed, "in_out")):
        g = from_exported_program(loaded.program, "smollm2")
        hooks = [NumericCheckHook(g, [tokens])]
        records = PassManager([RemoveNoOps(), ConstantFolding(), CommonSubexpressionElimination(),
                               FuseGatedMLP(), DeadCodeElimination()], hooks).run(g)
        assert records[3].counts == {"gated_mlp": 30}
        assert records[3].max_abs_diff <= FuseGatedMLP.tolerance
        fused = [n for n in g.nodes() if n.op == "arc.gated_mlp"]
        assert {n.attrs["weight_layout"] for n in fused} == {layout}
        assert {n.attrs["activation"] for n in fused} == {"silu"}


def test_fuse_mlp_refuses_two_activated_factors():
    class BothActivated(GatedMLP):
        def forward(self, ids):
            x = self.emb(ids)
            return self.down(F.silu(self.gate(x)) * F.silu(self.up(x)))
    _unchanged(BothActivated().eval(), "both factors are activations")


def test_fuse_mlp_leaves_decomposed_non_gated_silu_mlp_alone():
    class NonGated(GatedMLP):  # down(silu(up(x))): decomposed, the silu is itself g * sigmoid(g)
        def forward(self, ids):
            return self.down(F.silu(self.up(self.emb(ids))))
    g = _prep(_decomposed_ir(NonGated().eval()))
    before = ops(g)
    result = FuseGatedMLP().run(g)
    assert not result.changed and ops(g) == before
    assert any("non-gated MLP" in note for note in result.notes), result.notes
