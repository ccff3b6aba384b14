"""fuse_attention, three kinds of tests (STYLE.md #9): golden before/after, numbers against
eager with ONNX Runtime's own optimizations off, and negative cases that must stay as they
were, with the reason noted. Plus one SmolLM2 test covering its two traced forms."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import tiny_models as tm
import torch
import torch.nn.functional as F
from helpers import ops, run_onnx, to_ir

from arcompile.frontend.from_export import from_exported_program
from arcompile.frontend.load import load_model
from arcompile.ir import verify
from arcompile.passes import NumericCheckHook, PassManager, VerifyHook
from arcompile.passes.constant_folding import ConstantFolding
from arcompile.passes.cse import CommonSubexpressionElimination
from arcompile.passes.dce import DeadCodeElimination
from arcompile.passes.fuse_attention import FuseAttention
from arcompile.passes.remove_noops import RemoveNoOps
from arcompile.runtimes.onnxruntime import ops_arc_attention
from arcompile.runtimes.onnxruntime.session import make_session

TOKENS = torch.tensor([[3, 1, 4, 1, 5, 9], [2, 6, 5, 3, 5, 8]])
ATTRS = {"num_heads": 4, "num_kv_heads": 2, "head_dim": 8, "scale": 1 / math.sqrt(8),
         "causal": True, "softmax_dtype": "float32"}


class HandAttention(torch.nn.Module):
    """One hand-written GQA attention: 4 query heads share 2 KV heads (repeat_kv), the
    scale divided in, a causal mask from a tril buffer, and ``mask`` to break it in tests."""

    def __init__(self, mask: str = "tril", share_probs: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(16, 32)
        self.q = torch.nn.Linear(32, 32)
        self.kv = torch.nn.Linear(32, 32)
        self.out = torch.nn.Linear(32, 16)
        self.mask, self.share_probs = mask, share_probs
        full = torch.ones(64, 64)
        tables = {"tril": full.tril(), "window": full.tril() - full.tril(-3), "full": full}
        self.register_buffer("bias", tables.get(mask, full.tril()))

    def forward(self, ids):
        B, T = ids.shape
        x = self.emb(ids)
        q = self.q(x).view(B, T, 4, 8).transpose(1, 2)                  # (B, 4, T, 8)
        k, v = self.kv(x).view(B, T, 4, 8).transpose(1, 2).split(2, 1)  # (B, 2, T, 8)
        k = k[:, :, None].expand(B, 2, 2, T, 8).reshape(B, 4, T, 8)   # repeat_kv
        v = v[:, :, None].expand(B, 2, 2, T, 8).reshape(B, 4, T, 8)
        att = q @ k.transpose(-2, -1) / math.sqrt(8)
        if self.mask == "tokens":  # a padding mask: depends on the token values
            att = att.masked_fill(ids[:, None, None, :] == 0, float("-inf"))
        elif self.mask != "none":
            att = att.masked_fill(self.bias[:T, :T] == 0, float("-inf"))
        probs = F.softmax(att, dim=-1)
        y = (probs @ v).transpose(1, 2).reshape(B, T, 32)
        if self.share_probs:  # another user of an intermediate
            y = y + probs.mean(-1).transpose(1, 2).sum(-1, keepdim=True)
        return self.out(y)


def optimize(graph, sample=TOKENS):
    """The passes before and after fuse_attention, verified and held to their tolerance
    (without the numeric check when ``sample`` is None)."""
    passes = [RemoveNoOps(), ConstantFolding(), CommonSubexpressionElimination(),
              FuseAttention(), DeadCodeElimination()]
    hooks = [VerifyHook()] + ([NumericCheckHook(graph, [sample])] if sample is not None else [])
    return PassManager(passes, hooks).run(graph)


def attention_nodes(graph):
    return [n for n in graph.nodes() if n.op == "arc.attention"]


# -- golden -----------------------------------------------------------------------------

def test_golden_hand_written_gqa_attention():
    g = to_ir(HandAttention().eval(), TOKENS)
    records = optimize(g)
    assert records[3].counts == {"explicit": 1} and records[3].notes == []
    assert ops(g) == ["aten.sym_size.int", "aten.sym_size.int", "aten.embedding", "aten.linear",
                      "aten.view", "aten.transpose.int", "aten.linear", "aten.view",
                      "aten.transpose.int", "aten.split.Tensor", "arc.attention",
                      "aten.transpose.int", "aten.reshape", "aten.linear"]
    (node,) = attention_nodes(g)
    assert node.attrs == {**ATTRS, "mask_kind": "bool"}
    query, key, value = node.inputs
    assert query.shape == ("B", 4, "T", 8) and key.shape == value.shape == ("B", 2, "T", 8)
    assert key.producer.op == value.producer.op == "aten.split.Tensor"  # the KV heads as they are
    assert node.origin == "fuse_attention/explicit"


def test_golden_sdpa_with_repeat_kv():
    g = to_ir(tm.llama(), TOKENS)
    repeats = [n for n in g.nodes() if n.op == "aten.expand" and len(n.output.shape) == 5]
    assert len(repeats) == 4  # K and V repeated for the query heads, in 2 layers
    records = optimize(g)
    assert records[3].counts == {"sdpa": 2}
    assert g.op_count("aten.scaled_dot_product_attention") == 0
    # the KV repeats are gone, and so is the causal mask (with its position ids' expand)
    assert g.op_count("aten.expand") == 0 and g.op_count("aten.cumsum") == 0
    for i, node in enumerate(attention_nodes(g)):
        assert node.attrs == {"num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "scale": 0.25,
                              "causal": True, "mask_kind": "bool", "softmax_dtype": "float32"}
        assert node.inputs[1].shape == ("B", 2, "T", 16)
        assert node.module == f"model.model.layers.{i}.self_attn"


def test_golden_decomposed_sdpa():
    module = tm.llama()
    program = load_model(module, log=lambda _m: None).program.run_decompositions()
    g = from_exported_program(program)
    assert g.op_count("aten._softmax") == 2
    records = optimize(g)
    assert records[3].counts == {"explicit": 2}
    assert not any("softmax" in op for op in ops(g))
    for node in attention_nodes(g):  # sqrt(scale) on q and on k^T, multiplied back
        assert node.attrs == {"num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "scale": 0.25,
                              "causal": True, "mask_kind": "additive",
                              "softmax_dtype": "float32"}


# -- numbers ----------------------------------------------------------------------------

def eager_greedy(module, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(module(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def onnx_greedy(folder: Path, prompt, n):
    session = make_session(folder / "model.onnx", optimize=False)
    name = session.get_inputs()[0].name
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(session.run(None, {name: np.array([ids])})[0][0, -1].argmax()))
    return ids[len(prompt):]


def _graph(name: str, tmp_path: Path):
    builders = {**tm.BUILDERS, **tm.VARIANTS}
    base = name.removesuffix("_decomposed")
    module = builders[base]()
    source = module
    if base.startswith("gpt2"):  # the form many users have: a TorchScript trace
        source = str(tm.trace_torchscript(module, tmp_path / f"{base}.pt"))
    program = load_model(source, log=lambda _m: None).program
    if name.endswith("_decomposed"):
        program = program.run_decompositions()
    return module, from_exported_program(program)


@pytest.mark.parametrize("name", ["gpt2", "gpt2_eager", "gpt_neox", "opt", "nanogpt", "llama",
                                  "llama_decomposed", "nanogpt_decomposed"])
def test_fused_models_match_eager_in_onnxruntime(name, tmp_path):
    module, g = _graph(name, tmp_path)
    sample = torch.randint(0, tm.VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    records = optimize(g, sample)
    assert sum(records[3].counts.values()) == 2, records[3].notes  # one per layer
    assert records[3].max_abs_diff <= FuseAttention.tolerance
    x = torch.randint(0, tm.VOCAB, (2, 11), generator=torch.Generator().manual_seed(2))
    got = run_onnx(g, tmp_path / "onnx", x)
    assert abs(got - module(x).detach().numpy()).max() <= 1e-4
    model = onnx.load(tmp_path / "onnx" / "model.onnx", load_external_data=False)
    kinds = [n.op_type for n in model.graph.node]
    assert "Softmax" not in kinds and kinds.count("Attention") == 2
    prompt = [5, 17, 42, 8, 99, 3]
    assert onnx_greedy(tmp_path / "onnx", prompt, 32) == eager_greedy(module, prompt, 32)


@pytest.mark.parametrize("impl", ops_arc_attention.IMPLEMENTATIONS)
def test_every_lowering_matches_eager(impl, tmp_path, monkeypatch):
    monkeypatch.setattr(ops_arc_attention, "IMPLEMENTATION", impl)
    module = HandAttention().eval()
    g = to_ir(module, TOKENS)
    optimize(g)
    for shape in [(1, 1), (2, 7), (1, 33)]:
        x = torch.randint(0, 16, shape, generator=torch.Generator().manual_seed(3))
        got = run_onnx(g, tmp_path / impl, x)
        assert abs(got - module(x).detach().numpy()).max() <= 1e-5
    kinds = [n.op_type for n in onnx.load(tmp_path / impl / "model.onnx",
                                                  load_external_data=False).graph.node]
    fused = {"attention": "Attention", "gqa": "GroupQueryAttention", "plain": "Softmax"}[impl]
    assert kinds.count(fused) == 1


def test_reference_attention_is_bottom_right_causal():
    from arcompile.ir.opdefs.attention import attention

    q, k, v = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    got = attention(q, k, v, num_heads=4, num_kv_heads=2, head_dim=8, scale=0.3)
    # query row i sits at position i + 2 of 5: it sees keys 0 .. i + 2
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    want = torch.stack([F.softmax(q[:, :, i:i + 1] @ kk[:, :, :i + 3].transpose(-1, -2) * 0.3, -1)
                        @ vv[:, :, :i + 3] for i in range(3)], 2).squeeze(3)
    assert torch.allclose(got, want, atol=1e-6)


# -- negative ---------------------------------------------------------------------------

@pytest.mark.parametrize("mask, share, reason", [
    ("window", False, "mask is not causal"),
    ("full", False, "mask is not causal"),
    ("none", False, "no mask: the attention is bidirectional"),
    ("tokens", False, "mask depends on the input tokens"),
    ("tril", True, "has another user"),
])
def test_not_fused_stays_as_it_was(mask, share, reason):
    g = to_ir(HandAttention(mask, share).eval(), TOKENS)
    for p in (RemoveNoOps(), ConstantFolding(), CommonSubexpressionElimination()):
        p.run(g)
    before = ops(g)
    result = FuseAttention().run(g)
    verify(g)
    assert result.counts == {} and ops(g) == before
    assert len(result.notes) == 1 and reason in result.notes[0], result.notes


def test_sdpa_without_causal_mask_is_not_fused():
    class Bidirectional(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(16, 32)

        def forward(self, ids):
            x = self.emb(ids).view(ids.shape[0], ids.shape[1], 4, 8).transpose(1, 2)
            return F.scaled_dot_product_attention(x, x, x).sum(1)

    g = to_ir(Bidirectional().eval(), TOKENS)
    before = ops(g)
    result = FuseAttention().run(g)
    assert result.counts == {} and ops(g) == before
    assert "bidirectional" in result.notes[0]


# -- the real model ---------------------------------------------------------------------

def test_smollm2_both_forms(smollm2, smollm2_decomposed, tmp_path):
    x = torch.tensor([smollm2.tokenizer("What is the capital of France?")["input_ids"]])
    with torch.no_grad():
        eager = smollm2.module(x).numpy()
    for loaded in (smollm2, smollm2_decomposed):
        g = from_exported_program(loaded.program)
        records = optimize(g, None)  # numbers: checked below, lowered, against eager
        assert sum(records[3].counts.values()) == 30 and records[3].notes == []
        assert not any("softmax" in op for op in ops(g))
        for node in attention_nodes(g):
            assert (node.attrs["num_heads"], node.attrs["num_kv_heads"]) == (9, 3)
            assert node.attrs["head_dim"] == 64 and node.attrs["scale"] == 0.125
    # the decomposed graph lowered: ONNX Runtime (optimizations off) against eager
    got = run_onnx(g, tmp_path / "onnx", x)
    assert abs(got - eager).max() <= 1e-4
    assert (got.argmax(-1) == eager.argmax(-1)).all()  # the greedy token after every prefix
