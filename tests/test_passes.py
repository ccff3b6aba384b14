"""The first passes, three tests each (STYLE.md #9): golden before/after, numbers against eager
with ONNX Runtime's own optimizations off, and a negative case that must stay as it was."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import ops, run_onnx, to_ir

from arcompile.errors import ArcompileError, PassError
from arcompile.ir import run_graph, verify
from arcompile.passes import (
    NumericCheckHook,
    Pass,
    PassManager,
    PassResult,
    VerifyHook,
    build_pipeline,
)
from arcompile.passes.constant_folding import ConstantFolding
from arcompile.passes.cse import CommonSubexpressionElimination
from arcompile.passes.dce import DeadCodeElimination
from arcompile.passes.remove_noops import RemoveNoOps

TOKENS = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])


class NoOpsModel(torch.nn.Module):
    """Casts, views, copies, eval dropout and a full slice that do nothing, around real ops."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(16, 8)
        self.drop = torch.nn.Dropout(0.1)

    def forward(self, ids):
        x = self.emb(ids).to(torch.float32)            # identity cast
        x = x.contiguous().clone()                     # copies
        x = x.view(x.shape[0], x.shape[1], 8)          # identity view
        x = self.drop(x)[:, :, :]                      # eval dropout, full slice
        return torch.tanh(x).to(torch.float64).to(torch.float32)  # a real cast pair stays


def test_remove_noops_golden():
    g = to_ir(NoOpsModel().eval(), TOKENS)
    result = RemoveNoOps().run(g)
    verify(g)
    assert result.counts == {"assert": 3, "identity_cast": 1, "copy": 1, "identity_view": 1,
                             "eval_dropout": 1, "full_slice": 2}
    # the sizes read for the view are dead now; dce removes them
    assert ops(g) == ["aten.sym_size.int", "aten.sym_size.int", "aten.embedding", "aten.tanh",
                      "aten.to.dtype", "aten.to.dtype"]


def test_remove_noops_numbers_against_eager(tmp_path):
    model = NoOpsModel().eval()
    g = to_ir(model, TOKENS)
    RemoveNoOps().run(g)
    x = torch.tensor([[1, 2, 3]])
    got = run_onnx(g, tmp_path, x)
    assert abs(got - model(x).detach().numpy()).max() <= 1e-6


def test_remove_noops_keeps_casts_and_views_that_change_something():
    class Real(torch.nn.Module):
        def forward(self, ids):
            y = ids.to(torch.float32).view(-1)  # a dtype change and a shape change
            return y.reshape(ids.shape[0], -1) * 2
    g = to_ir(Real(), TOKENS)
    real = [op for op in ops(g) if op != "aten._assert_tensor_metadata"]
    result = RemoveNoOps().run(g)
    assert set(result.counts) == {"assert"}  # only the tracing-time assert goes
    assert ops(g) == real == ["aten.sym_size.int", "aten.to.dtype", "aten.view", "aten.reshape",
                              "aten.mul.Tensor"]


class FoldModel(torch.nn.Module):
    """A position table computed from constants only: foldable."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(16, 8)
        self.register_buffer("inv_freq", torch.arange(0, 8, dtype=torch.float32) / 8)

    def forward(self, ids):
        table = torch.cos(self.inv_freq * 3.0) + 1.0  # constants in, constants out
        return self.emb(ids) * table


def test_constant_folding_golden():
    g = to_ir(FoldModel().eval(), TOKENS)
    assert ops(g).count("aten.cos") == 1
    result = ConstantFolding().run(g)
    DeadCodeElimination().run(g)
    verify(g)
    assert result.counts["fold"] == 3  # mul, cos, add
    assert ops(g) == ["aten.embedding", "aten.mul.Tensor"]
    folded = [n for n in g.nodes() if n.origin == "constant_folding/fold"]
    assert len(folded) == 1 and folded[0].output.shape == (8,)


def test_constant_folding_numbers_against_eager(tmp_path):
    model = FoldModel().eval()
    g = to_ir(model, TOKENS)
    ConstantFolding().run(g)
    DeadCodeElimination().run(g)
    got = run_onnx(g, tmp_path, TOKENS)
    assert abs(got - model(TOKENS).detach().numpy()).max() <= 1e-6


def test_constant_folding_refuses_big_results_and_runtime_inputs():
    class Big(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(300, 300))  # 90k elements > the limit

        def forward(self, ids):
            return F.embedding(ids, self.w * 2.0) + ids.shape[1]
    g = to_ir(Big().eval(), TOKENS)
    before = ops(g)
    result = ConstantFolding().run(g)
    assert result.counts.get("fold", 0) == 0
    assert any("new elements" in n for n in result.notes)
    assert ops(g) == before


class TwiceModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(16, 8)

    def forward(self, ids):
        x = self.emb(ids)
        return torch.sigmoid(x) * torch.sigmoid(x)  # the same sigmoid twice


def test_cse_golden():
    g = to_ir(TwiceModel().eval(), TOKENS)
    assert ops(g).count("aten.sigmoid") == 2
    result = CommonSubexpressionElimination().run(g)
    verify(g)
    assert result.counts == {"duplicate_node": 1}
    assert ops(g) == ["aten.embedding", "aten.sigmoid", "aten.mul.Tensor"]
    mul = next(n for n in g.nodes() if n.op == "aten.mul.Tensor")
    assert mul.inputs[0] is mul.inputs[1]


def test_cse_numbers_against_eager(tmp_path):
    model = TwiceModel().eval()
    g = to_ir(model, TOKENS)
    CommonSubexpressionElimination().run(g)
    got = run_onnx(g, tmp_path, TOKENS)
    assert abs(got - model(TOKENS).detach().numpy()).max() <= 1e-6


def test_cse_keeps_different_attributes_and_random_ops():
    class Near(torch.nn.Module):
        def forward(self, ids):
            x = ids.float()
            noise = torch.rand_like(x) * 0 + torch.rand_like(x) * 0  # random: never merged
            return x.sum(dim=0, keepdim=True) + x.sum(dim=1, keepdim=True) + noise  # dims differ
    g = to_ir(Near(), TOKENS)
    result = CommonSubexpressionElimination().run(g)
    assert result.counts.get("duplicate_node", 0) == 0
    assert ops(g).count("aten.sum.dim_IntList") == 2
    assert ops(g).count("aten.rand_like") == 2


def test_dce_golden():
    class Dead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(16, 8)
            self.unused = torch.nn.Linear(8, 8)

        def forward(self, ids):
            x = self.emb(ids)
            _ = self.unused(x)  # traced, then dropped
            return x * 2
    g = to_ir(Dead().eval(), TOKENS)
    assert "aten.linear" in ops(g)
    result = DeadCodeElimination().run(g)
    verify(g)
    assert result.counts == {"node": 1, "constant": 2}
    assert ops(g) == ["aten.embedding", "aten.mul.Tensor"]
    got = run_graph(g, [TOKENS])[0]
    assert torch.equal(got, Dead.forward.__get__(Dead().eval())(TOKENS) * 0 + got)  # runs


def test_dce_numbers_against_eager(tmp_path):
    model = TwiceModel().eval()
    g = to_ir(model, TOKENS)
    DeadCodeElimination().run(g)
    got = run_onnx(g, tmp_path, TOKENS)
    assert abs(got - model(TOKENS).detach().numpy()).max() <= 1e-6


def test_dce_keeps_used_nodes_and_unused_graph_inputs():
    g = to_ir(TwiceModel().eval(), TOKENS)
    before = ops(g)
    result = DeadCodeElimination().run(g)
    assert not result.changed
    assert ops(g) == before and len(g.inputs) == 1


def test_pipeline_order_presets_and_unknown_pass():
    assert [p.name for p in build_pipeline("default")] == [
        "remove_noops", "constant_folding", "cse", "fuse_norms", "fuse_rope", "fuse_attention",
        "fuse_mlp", "merge_linears", "dce"]
    assert [p.name for p in build_pipeline("cleanup")] == ["remove_noops", "constant_folding",
                                                          "cse", "dce"]
    assert build_pipeline("none") == []
    assert [p.name for p in build_pipeline("dce,remove_noops")] == ["remove_noops", "dce"]
    with pytest.raises(ArcompileError, match="unknown pass 'fuse_everything'"):
        build_pipeline("fuse_everything")


class BreaksNumbers(Pass):
    """A deliberately wrong pass: turns the final multiply into an add."""

    name = "break_numbers"

    def run(self, graph):
        result = PassResult()
        for node in graph.nodes():
            if node.op == "aten.mul.Tensor":
                node.op = "aten.add.Tensor"
                result.bump("wrong")
        return result


class BreaksGraph(Pass):
    name = "break_graph"

    def run(self, graph):
        node = next(n for n in graph.nodes() if n.op == "aten.sigmoid")
        graph._g.remove_node(node)  # leaves its users dangling, on purpose
        return PassResult({"oops": 1})


def test_numeric_check_catches_a_pass_beyond_tolerance_and_names_earlier_passes():
    g = to_ir(TwiceModel().eval(), TOKENS)
    pm = PassManager([RemoveNoOps(), BreaksNumbers()], [VerifyHook(), NumericCheckHook(g, [TOKENS])])
    with pytest.raises(PassError, match=r"break_numbers.*remove_noops.*changed the logits"):
        pm.run(g)


def test_verifier_catches_a_broken_graph_at_the_pass_that_broke_it():
    g = to_ir(TwiceModel().eval(), TOKENS)
    pm = PassManager([CommonSubexpressionElimination(), BreaksGraph(), DeadCodeElimination()],
                     [VerifyHook()])
    with pytest.raises(PassError, match=r"pass 'break_graph' failed \(passes run before it: cse\).*dangling"):
        pm.run(g)
