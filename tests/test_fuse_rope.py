"""fuse_rope: golden before/after, numbers against eager (ORT optimizations off), negatives
that must stay as they were (STYLE.md #9), and the counts on the real SmolLM2."""

from __future__ import annotations

import pytest
import torch
from helpers import apply_pass, cleanup, ops, run_onnx, to_ir
from tiny_models import gpt_neox, gptj, llama

from arcompile.frontend.export import export_module
from arcompile.frontend.from_export import from_exported_program
from arcompile.ir.interpreter import run_graph
from arcompile.ir.opdefs.rope import rope as rope_reference
from arcompile.passes.constant_folding import ConstantFolding
from arcompile.passes.cse import CommonSubexpressionElimination
from arcompile.passes.dce import DeadCodeElimination
from arcompile.passes.fuse_rope import FuseRope
from arcompile.passes.manager import NumericCheckHook, PassManager, VerifyHook
from arcompile.passes.remove_noops import RemoveNoOps

TOKENS = torch.tensor([[3, 1, 4, 1, 5, 9], [2, 6, 5, 3, 5, 8]])
NH, D = 2, 8  # heads, head dim


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rotate_every_two(x):
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


class Rotary(torch.nn.Module):
    """embedding -> heads (B, nh, T, hs) -> rope on the first ``rot`` dims -> (B, T, nh * hs).

    ``variant`` bends one piece of the formula for the negative tests."""

    def __init__(self, interleaved=False, rot=D, variant=None):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(16, NH * D)
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, rot, 2).float() / rot),
                             persistent=False)
        self.interleaved, self.rot, self.variant = interleaved, rot, variant

    def forward(self, ids):
        B, T = ids.shape
        x_BhTd = self.emb(ids).view(B, T, NH, D).transpose(1, 2)
        pos = torch.arange(T)
        freqs_Tr = pos[:, None].float() * self.inv_freq  # (T, rot/2)
        if self.interleaved:
            angles = freqs_Tr.repeat_interleave(2, dim=-1)
        else:
            angles = torch.cat((freqs_Tr, freqs_Tr), dim=-1)
        cos, sin = angles.cos(), angles.sin()
        if self.variant == "other_angles":
            sin = (angles * 2).sin()
        x_rot, x_pass = x_BhTd[..., : self.rot], x_BhTd[..., self.rot:]
        rotated = rotate_every_two(x_rot) if self.interleaved else rotate_half(x_rot)
        if self.variant == "swapped":  # cat(-x[..., :d/2], x[..., d/2:]): the wrong way round
            h = self.rot // 2
            rotated = torch.cat((-x_rot[..., :h], x_rot[..., h:]), dim=-1)
        x_cos = x_rot * cos
        out = x_cos + rotated * sin
        if self.rot < D:
            out = torch.cat((out, x_pass), dim=-1)
        out = out.transpose(1, 2).reshape(B, T, NH * D)
        if self.variant == "reuse":  # x * cos feeds something else too
            out = out + x_cos.transpose(1, 2).reshape(B, T, NH * self.rot).sum(-1, keepdim=True)
        return out


def _prep(g):
    return cleanup(g, dce=True)


def _fuse(g):
    return apply_pass(g, FuseRope())


def _rope_nodes(g):
    return [n for n in g.nodes() if n.op == "arc.rope"]


# -- golden -------------------------------------------------------------------------------

def test_golden_rotate_half():
    g = _prep(to_ir(Rotary(), TOKENS))
    before = ops(g)
    assert before.count("aten.neg") == 1 and "aten.cat" in before
    result = _fuse(g)

    assert result.counts == {"rotate_half": 1} and result.notes == []
    # the rope's slices, neg, cat, two muls and add became one arc.rope
    assert ops(g) == ["aten.sym_size.int", "aten.sym_size.int", "aten.embedding", "aten.view",
                      "aten.transpose.int", "aten.arange", "aten.unsqueeze", "aten.to.dtype",
                      "aten.mul.Tensor", "aten.cat", "aten.cos", "aten.sin", "arc.rope",
                      "aten.transpose.int", "aten.reshape"]
    (node,) = _rope_nodes(g)
    assert node.attrs == {"rotary_dim": D, "interleaved": False, "position_source": "inv_freq",
                          "attention_scaling": 1.0}
    assert node.origin == "fuse_rope/rotate_half"
    x, cos, sin, pos, inv_freq = node.inputs
    assert x.producer.op == "aten.transpose.int" and x.shape == ("B", NH, "T", D)
    assert cos.producer.op == "aten.cos" and sin.producer.op == "aten.sin"
    assert pos.producer.op == "aten.arange" and pos.dtype == torch.int64
    assert inv_freq.is_constant and tuple(inv_freq.shape) == (D // 2,)
    assert torch.allclose(run_graph(g, [TOKENS])[0], Rotary()(TOKENS), atol=0, rtol=0)


def test_golden_interleaved_partial_both_traced_forms():
    module = Rotary(interleaved=True, rot=4)
    for program in (export_module(module, example_inputs=(TOKENS,)),
                    export_module(module, example_inputs=(TOKENS,)).run_decompositions()):
        g = _prep(from_exported_program(program, "test"))
        result = _fuse(g)
        assert result.counts == {"interleaved_partial": 1} and result.notes == []
        (node,) = _rope_nodes(g)
        assert node.attrs == {"rotary_dim": 4, "interleaved": True, "position_source": "inv_freq",
                              "attention_scaling": 1.0}
        assert node.inputs[0].shape == ("B", NH, "T", D)  # the pass-through part is inside
        assert not {"aten.neg", "aten.stack", "aten.flatten.using_ints"} & set(ops(g))
        assert torch.equal(run_graph(g, [TOKENS])[0], module(TOKENS))


def test_reference_matches_the_formulas():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 12)
    cos, sin = torch.randn(5, 8), torch.randn(5, 8)
    want = torch.cat((x[..., :8] * cos + rotate_half(x[..., :8]) * sin, x[..., 8:]), -1)
    assert torch.equal(rope_reference(x, cos, sin, rotary_dim=8, interleaved=False), want)
    cos, sin = torch.randn(5, 12), torch.randn(5, 12)
    want = x * cos + rotate_every_two(x) * sin
    assert torch.equal(rope_reference(x, cos, sin, rotary_dim=12, interleaved=True), want)


# -- numbers: tiny models in both traced forms, ONNX Runtime against eager --------------------

CASES = {
    "llama": (llama, {"rotate_half": 4}, "inv_freq"),
    "gpt_neox": (gpt_neox, {"rotate_half_partial": 4}, "inv_freq"),
    "gptj": (gptj, {"interleaved_partial": 4}, "table"),
}


@pytest.mark.parametrize("decomposed", [False, True], ids=["exported", "decomposed"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_tiny_models_against_eager(name, decomposed, tmp_path):
    build, counts, source = CASES[name]
    module = build()
    program = export_module(module, example_inputs=(TOKENS,))
    if decomposed:
        program = program.run_decompositions()
    g = from_exported_program(program, name)
    records = PassManager([RemoveNoOps(), ConstantFolding(), CommonSubexpressionElimination(),
                           FuseRope(), DeadCodeElimination()],
                          [VerifyHook(), NumericCheckHook(g, [TOKENS])]).run(g)
    fuse = next(r for r in records if r.name == "fuse_rope")
    assert fuse.counts == counts and fuse.notes == []
    assert fuse.max_abs_diff == 0.0  # same arithmetic, same order
    assert {n.attrs["position_source"] for n in _rope_nodes(g)} == {source}
    assert "aten.neg" not in ops(g)

    with torch.no_grad():
        want = module(TOKENS).numpy()
    # proven position source: ORT's com.microsoft RotaryEmbedding with cos/sin caches
    got = run_onnx(g, tmp_path / "kernel", TOKENS)
    assert _onnx_ops(tmp_path / "kernel") >= {"RotaryEmbedding"}
    assert abs(got - want).max() < 1e-4
    # unproven: the plain Slice/Neg/Concat/Mul/Add form, same numbers
    for node in _rope_nodes(g):
        node.attrs["position_source"] = "unproven"
    got = run_onnx(g, tmp_path / "plain", TOKENS)
    assert "RotaryEmbedding" not in _onnx_ops(tmp_path / "plain")
    assert abs(got - want).max() < 1e-4


def _onnx_ops(folder):
    import onnx

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    return {n.op_type for n in model.graph.node}


def test_gptj_tables_are_the_cos_sin_caches():
    g = _prep(to_ir(gptj(), TOKENS))
    _fuse(g)
    node = _rope_nodes(g)[0]
    x, cos, sin, pos, cos_table, sin_table = node.inputs
    assert tuple(cos_table.shape) == tuple(sin_table.shape) == (128, 2)  # [max_pos, rot/2]
    angles = torch.arange(128).float()[:, None] * (1.0 / 10000 ** (torch.arange(0, 4, 2) / 4))
    assert torch.allclose(cos_table.data, angles.cos()) and torch.allclose(sin_table.data, angles.sin())
    assert pos.dtype == torch.int64


# -- negatives -------------------------------------------------------------------------------

@pytest.mark.parametrize("variant, reason", [
    ("swapped", "halves in the wrong places: cat(-x[..., 0:4], x[..., 4:8])"),
    ("other_angles", "cos and sin are not of the same angles"),
    ("reuse", "has another user"),
])
def test_negative_stays_unfused_with_reason(variant, reason):
    module = Rotary(variant=variant)
    g = _prep(to_ir(module, TOKENS))
    before = [(n.op, n.attrs) for n in g.nodes()]
    result = _fuse(g)
    assert result.counts == {}
    assert [(n.op, n.attrs) for n in g.nodes()] == before
    assert any(reason in note for note in result.notes), result.notes
    assert torch.equal(run_graph(g, [TOKENS])[0], module(TOKENS))


def test_negative_interleaved_lanes_swapped():
    module = Rotary(interleaved=True)
    g = _prep(to_ir(module, TOKENS))
    # point the stack at (x[..., ::2], -x[..., 1::2]): pairs in the wrong order
    stack = next(n for n in g.nodes() if n.op == "aten.stack")
    neg_in, plain_in = stack.inputs
    stack.graph.set_input(stack, 0, plain_in)
    stack.graph.set_input(stack, 1, neg_in)
    before = [(n.op, n.attrs) for n in g.nodes()]
    result = _fuse(g)
    assert result.counts == {}
    assert [(n.op, n.attrs) for n in g.nodes()] == before
    assert any("pairs in the wrong order" in note for note in result.notes), result.notes


# -- the real model --------------------------------------------------------------------------

def test_smollm2_both_forms(smollm2, smollm2_decomposed):
    """60 ropes (q and k in 30 layers) in either traced form, logits unchanged."""
    ids = torch.tensor([smollm2.tokenizer.encode("The capital of France is")])
    for loaded in (smollm2, smollm2_decomposed):
        g = _prep(from_exported_program(loaded.program, "smollm2"))
        want = run_graph(g, [ids])[0]
        result = _fuse(g)
        assert result.counts == {"rotate_half": 60} and result.notes == []
        assert {n.attrs["position_source"] for n in _rope_nodes(g)} == {"inv_freq"}
        assert torch.equal(run_graph(g, [ids])[0], want)
