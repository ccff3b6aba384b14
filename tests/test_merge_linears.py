"""merge_linears: golden before/after, numbers against eager (ORT optimizations off), negatives
that must stay as they were (STYLE.md #9), streamed concatenated weights, and SmolLM2's QKV."""

from __future__ import annotations

import onnx
import pytest
import torch
from helpers import apply_pass, cleanup, ops, run_onnx, to_ir
from tiny_models import llama, opt

from arcompile.frontend.export import export_module
from arcompile.frontend.from_export import from_exported_program
from arcompile.ir.graph import Graph
from arcompile.passes import NumericCheckHook, PassManager, VerifyHook
from arcompile.passes.constant_folding import ConstantFolding
from arcompile.passes.cse import CommonSubexpressionElimination
from arcompile.passes.dce import DeadCodeElimination
from arcompile.passes.fuse_mlp import FuseGatedMLP
from arcompile.passes.merge_linears import MergeLinears
from arcompile.passes.remove_noops import RemoveNoOps
from arcompile.runtimes.onnxruntime.weights import ConcatParts, write_weights

TOKENS = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])


class QKV(torch.nn.Module):
    """Three projections of one input, K without a bias (as in Whisper)."""

    def __init__(self, biases=(True, False, True)):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(16, 16)
        self.q = torch.nn.Linear(16, 16, bias=biases[0])
        self.k = torch.nn.Linear(16, 8, bias=biases[1])
        self.v = torch.nn.Linear(16, 8, bias=biases[2])

    def forward(self, ids):
        x = self.emb(ids)  # (B, T, 16)
        q_BTD, k_BTD, v_BTD = self.q(x), self.k(x), self.v(x)
        return q_BTD[..., :8] * k_BTD + v_BTD


def _prep(g):
    return cleanup(g)


def _merge(g):
    return apply_pass(g, MergeLinears())


# -- golden ---------------------------------------------------------------------------------
def test_merge_linears_golden_with_a_missing_bias():
    model = QKV().eval()
    g = _prep(to_ir(model, TOKENS))
    assert ops(g).count("aten.linear") == 3
    assert _merge(g).counts == {"merge": 1}
    assert ops(g) == ["aten.embedding", "arc.concat_weights", "arc.concat_weights",
                      "arc.split_linear", "aten.slice.Tensor", "aten.mul.Tensor",
                      "aten.add.Tensor"]
    split = next(n for n in g.nodes() if n.op == "arc.split_linear")
    assert split.attrs == {"sizes": [16, 8, 8], "weight_layout": "out_in"}
    assert split.origin == "merge_linears/merge"
    assert [v.shape for v in split.outputs] == [("B", "T", 16), ("B", "T", 8), ("B", "T", 8)]
    x, weight, bias = split.inputs
    assert weight.producer.attrs == {"dim": 0} and weight.shape == (32, 16)
    # the concatenation is over the model's own tensors: no copy was made
    assert [v.data.data_ptr() for v in weight.producer.inputs] == [
        w.data_ptr() for w in (model.q.weight, model.k.weight, model.v.weight)]
    q_b, k_b, v_b = bias.producer.inputs
    assert q_b.data.data_ptr() == model.q.bias.data_ptr()
    assert v_b.data.data_ptr() == model.v.bias.data_ptr()
    assert k_b.producer.origin == "merge_linears/merge"
    assert torch.equal(k_b.data, torch.zeros(8))  # zeros only for the one without a bias


def test_merge_linears_golden_no_bias_makes_no_zeros():
    g = _prep(to_ir(QKV(biases=(False, False, False)).eval(), TOKENS))
    assert _merge(g).counts == {"merge": 1}
    assert g.op_count("arc.concat_weights") == 1
    split = next(n for n in g.nodes() if n.op == "arc.split_linear")
    assert len(split.inputs) == 2


def test_merge_linears_golden_decomposed_llama_after_fuse_mlp():
    program = export_module(llama(), example_inputs=(TOKENS,)).run_decompositions()
    g = _prep(from_exported_program(program, "llama"))
    FuseGatedMLP().run(g)
    assert _merge(g).counts == {"merge": 2}  # q/k/v per layer; gate/up are inside gated_mlp
    for split in (n for n in g.nodes() if n.op == "arc.split_linear"):
        assert split.attrs == {"sizes": [64, 32, 32], "weight_layout": "in_out"}
        assert split.inputs[1].producer.attrs == {"dim": 1}
        assert split.inputs[1].shape == (64, 128)
        assert split.module.endswith("self_attn")


def test_merge_linears_merges_gate_and_up_left_outside_a_gated_mlp():
    g = _prep(to_ir(llama(), TOKENS))
    assert _merge(g).counts == {"merge": 4}  # q/k/v and gate/up in each of the 2 layers
    sizes = sorted(n.attrs["sizes"] for n in g.nodes() if n.op == "arc.split_linear")
    assert sizes == [[64, 32, 32], [64, 32, 32], [128, 128], [128, 128]]


# -- numbers --------------------------------------------------------------------------------
@pytest.mark.parametrize("builder", [llama, opt], ids=["llama", "opt"])
@pytest.mark.parametrize("decomposed", [False, True], ids=["exported", "decomposed"])
def test_merge_linears_numbers_against_eager(tmp_path, builder, decomposed):
    model = builder()
    program = export_module(model, example_inputs=(TOKENS,))
    g = from_exported_program(program.run_decompositions() if decomposed else program, "m")
    hooks = [VerifyHook(), NumericCheckHook(g, [TOKENS])]
    records = PassManager([RemoveNoOps(), ConstantFolding(), CommonSubexpressionElimination(),
                           FuseGatedMLP(), MergeLinears(), DeadCodeElimination()], hooks).run(g)
    assert records[4].counts == {"merge": 2}
    x = torch.tensor([[7, 3, 9, 1, 2, 8, 4]])
    got = run_onnx(g, tmp_path, x)
    assert abs(got - model(x).detach().numpy()).max() <= 1e-4
    # each layer's merged Q/K/V weight is one initializer in the data file
    m = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    merged = [tuple(t.dims) for t in m.graph.initializer if t.name.startswith("merged_weight")]
    qkv = 128 if builder is llama else 192  # llama's GQA: 64 + 32 + 32; opt: 3 * 64
    assert merged == [(64, qkv) if decomposed else (qkv, 64)] * 2


@pytest.mark.parametrize("dim", [0, 1])
def test_concatenated_weights_stream_as_one_initializer(tmp_path, dim):
    parts = [torch.randn(5, 7), torch.randn(5, 7), torch.randn(5, 7).t().contiguous().t()]
    ConcatParts.BLOCK_BYTES, saved = 40, ConcatParts.BLOCK_BYTES  # several blocks of rows
    try:
        protos = write_weights({"w": ConcatParts(parts, dim)}, tmp_path / "w.data")
    finally:
        ConcatParts.BLOCK_BYTES = saved
    want = torch.cat(parts, dim)
    assert list(protos[0].dims) == list(want.shape)
    raw = (tmp_path / "w.data").read_bytes()
    assert torch.equal(torch.frombuffer(bytearray(raw), dtype=torch.float32).reshape(want.shape),
                       want)


# -- negatives ------------------------------------------------------------------------------
def test_merge_linears_leaves_linears_on_different_inputs():
    class Apart(QKV):
        def forward(self, ids):
            x = self.emb(ids)
            return self.q(x)[..., :8] * self.k(x * 2) + self.v(x + 1)
    g = _prep(to_ir(Apart().eval(), TOKENS))
    before = ops(g)
    assert not MergeLinears().run(g).changed
    assert ops(g) == before


def test_merge_linears_keeps_different_dtypes_apart():
    g = Graph("dtypes")
    x = g.add_input("x", torch.float32, ("T", 16))
    outs = []
    for i, dtype in enumerate((torch.float32, torch.float16)):
        w = g.add_constant(torch.zeros(8, 16, dtype=dtype), name=f"w{i}")
        node = g.add_op("aten.linear", {"input": x, "weight": w}, [(torch.float32, ("T", 8))])
        outs.append(node.output)
    g.outputs = outs
    result = MergeLinears().run(g)
    assert not result.changed and ops(g) == ["aten.linear", "aten.linear"]
    assert any("differ in form, dtype or input size" in n for n in result.notes)


# -- the real model -------------------------------------------------------------------------
def test_merge_linears_smollm2_qkv(smollm2):
    tokens = torch.tensor([[1, 504, 3458, 314, 4649, 30]])
    g = from_exported_program(smollm2.program, "smollm2")
    hooks = [NumericCheckHook(g, [tokens])]
    records = PassManager([RemoveNoOps(), ConstantFolding(), CommonSubexpressionElimination(),
                           FuseGatedMLP(), MergeLinears(), DeadCodeElimination()], hooks).run(g)
    assert records[3].counts == {"gated_mlp": 30} and records[4].counts == {"merge": 30}
    assert records[4].max_abs_diff <= MergeLinears.tolerance
    splits = [n for n in g.nodes() if n.op == "arc.split_linear"]
    assert {tuple(n.attrs["sizes"]) for n in splits} == {(576, 192, 192)}
    assert g.op_count("aten.linear") == 30 + 1  # o_proj per layer and the tied lm_head
