"""insert_kv_cache: cached decoding equals full recomputation on every tiny architecture
(prefill, then 16 single-token greedy steps with the presents fed back), a golden test of
what the rewrite adds, and refusals that leave the graph exactly as it was."""

from __future__ import annotations

import numpy as np
import tiny_models as tm
import torch
import torch.nn.functional as F
from helpers import ops, to_ir

from arcompile.frontend.from_export import from_exported_program
from arcompile.frontend.load import load_model
from arcompile.ir import print_graph, verify
from arcompile.ir.cached_step import CachedStep, past_inputs, step_inputs
from arcompile.ir.graph import Graph
from arcompile.ir.interpreter import run_graph
from arcompile.passes import PassManager, VerifyHook, build_pipeline
from arcompile.passes.dce import DeadCodeElimination
from arcompile.passes.insert_kv_cache import InsertKVCache

EXAMPLE = torch.randint(0, tm.VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
STEPS = 16


def fused(graph: Graph) -> Graph:
    """The default pipeline (every fusion), as the KV-cache pass expects its input."""
    PassManager(build_pipeline("default"), [VerifyHook()]).run(graph)
    return graph


def cache(graph: Graph):
    """Run the pass then DCE, verifying after each; the pass's record."""
    records = PassManager([InsertKVCache(), DeadCodeElimination()], [VerifyHook()]).run(graph)
    return records[0]


def greedy_cached(graph: Graph, prompt: torch.Tensor, reference) -> None:
    """Prefill ``prompt`` then decode STEPS tokens one at a time with the cached graph; at
    every step the logits equal ``reference`` (full recomputation) within 1e-4 and the greedy
    tokens are identical."""
    pasts = past_inputs(graph)
    state = [torch.zeros((prompt.shape[0], v.shape[1], 0, v.shape[3]), dtype=v.dtype)
             for v in pasts]
    seq, new, done = prompt, prompt, 0
    for step in range(STEPS + 1):
        outs = run_graph(graph, step_inputs(graph, new, torch.tensor(done), state,
                                            torch.tensor(0)))
        logits, state = outs[0], outs[1:]
        assert len(state) == len(pasts)
        assert all(s.shape[2] == seq.shape[1] for s in state)
        with torch.no_grad():
            full = reference(seq)
        assert logits.shape[1] == new.shape[1]
        diff = (logits[:, -1] - full[:, -1]).abs().max().item()
        assert diff < 1e-4, f"step {step}: |Δlogit| {diff:.3g}"
        if step == 0:  # the prefill gives every prompt position, not only the last
            assert (logits - full).abs().max().item() < 1e-4
        token, want = logits[:, -1].argmax(-1), full[:, -1].argmax(-1)
        assert torch.equal(token, want), f"step {step}: greedy tokens differ"
        done = seq.shape[1]
        new = token[:, None]
        seq = torch.cat([seq, new], dim=1)


# -- numbers: cached decoding against eager full recomputation ----------------------------
def _check_architecture(name: str, batch: int) -> None:
    module = getattr(tm, name)()
    graph = fused(to_ir(module, EXAMPLE, name))
    record = cache(graph)
    assert record.counts["attention_cached"] == 2, record.notes
    prompt = torch.randint(3, tm.VOCAB, (batch, 5), generator=torch.Generator().manual_seed(7))
    greedy_cached(graph, prompt, module)


def test_llama_cached_decoding_matches_full_recomputation():
    _check_architecture("llama", 2)


def test_gpt2_cached_decoding_matches_full_recomputation():
    _check_architecture("gpt2", 1)


def test_gpt_neox_cached_decoding_matches_full_recomputation():
    _check_architecture("gpt_neox", 2)


def test_opt_cached_decoding_matches_full_recomputation():
    _check_architecture("opt", 2)


def test_nanogpt_cached_decoding_matches_full_recomputation():
    _check_architecture("nanogpt", 1)


def test_gptj_cached_decoding_matches_full_recomputation():
    # interleaved partial rotary, cos/sin looked up in a table: sliced, not narrowed
    _check_architecture("gptj", 2)


def test_gpt2_torchscript_cached_decoding(tmp_path):
    path = tm.trace_torchscript(tm.gpt2(), tmp_path / "gpt2.pt")
    loaded = load_model(path, log=lambda _m: None)
    graph = fused(from_exported_program(loaded.program, "gpt2_ts"))
    record = cache(graph)
    assert record.counts == {"attention_cached": 2, "position_narrowed": 1,
                             "logits_to_keep": 1}, record.notes
    prompt = torch.randint(3, tm.VOCAB, (2, 4), generator=torch.Generator().manual_seed(3))
    greedy_cached(graph, prompt, tm.gpt2())


# -- golden --------------------------------------------------------------------------------
def test_golden_llama_inputs_outputs_and_ops():
    graph = fused(to_ir(tm.llama(), EXAMPLE, "llama"))
    before = ops(graph)
    attention_attrs = [dict(n.attrs) for n in graph.nodes() if n.op == "arc.attention"]
    record = cache(graph)
    # the position ids (rope's recorded input 3) and the rotary cos and sin, each computed for
    # the new positions only
    assert record.counts == {"attention_cached": 2, "position_narrowed": 3, "logits_to_keep": 1}
    assert [(v.name, str(v.dtype), v.shape) for v in graph.inputs] == [
        ("input_ids", "torch.int64", ("B", "T")),
        ("past_length", "torch.int64", ()),
        ("past_key_0", "torch.float32", ("B", 2, "P", 16)),
        ("past_value_0", "torch.float32", ("B", 2, "P", 16)),
        ("past_key_1", "torch.float32", ("B", 2, "P", 16)),
        ("past_value_1", "torch.float32", ("B", 2, "P", 16)),
        ("logits_to_keep", "torch.int64", ())]
    assert [(v.name, v.shape) for v in graph.outputs[1:]] == [
        ("present_key_0", ("B", 2, "P + T", 16)), ("present_value_0", ("B", 2, "P + T", 16)),
        ("present_key_1", ("B", 2, "P + T", 16)), ("present_value_1", ("B", 2, "P + T", 16))]
    assert graph.outputs[0].shape == ("B", "K", tm.VOCAB)  # the last logits_to_keep rows
    assert graph.meta["kv_cache"] == CachedStep(
        past_length="past_length",
        past=(("past_key_0", "past_value_0"), ("past_key_1", "past_value_1")),
        present=(("present_key_0", "present_value_0"), ("present_key_1", "present_value_1")),
        logits_to_keep="logits_to_keep", runtime_cache="concat", layout="BHSD", concat_dim=2)
    assert graph.meta["symbols"] == ["B", "K", "P", "T"]
    # the LM head reads the last rows of its input: x[:, -logits_to_keep:]
    head = graph.outputs[0].producer
    kept = head.inputs[0].producer
    assert head.op == "aten.linear" and kept.op == "aten.slice.Tensor"
    assert kept.origin == "insert_kv_cache/logits_to_keep" and kept.arg("dim") == 1
    after = ops(graph)
    assert before.count("arc.attention") == 2 and "arc.attention" not in after
    assert after.count("arc.attention_cached") == 2
    cached = [n for n in graph.nodes() if n.op == "arc.attention_cached"]
    assert [dict(n.attrs) for n in cached] == attention_attrs
    assert all(n.origin == "insert_kv_cache/attention_cached" for n in cached)
    assert [n.module for n in cached] == ["model.model.layers.0.self_attn",
                                          "model.model.layers.1.self_attn"]
    assert cached[0].inputs[3] is graph.inputs[2] and cached[0].inputs[4] is graph.inputs[3]
    # positions: arange(0, T) became arange(past_length, past_length + T), nothing sliced
    assert "aten.arange" in before and "aten.arange" not in after
    assert [n.origin for n in graph.nodes() if n.op == "aten.slice.Tensor"] == [
        "insert_kv_cache/logits_to_keep"]
    (arange,) = [n for n in graph.nodes() if n.op == "aten.arange.start"]
    assert arange.origin == "insert_kv_cache/positions" and arange.output.shape == ("T",)
    assert arange.arg("start").producer.op == "aten._local_scalar_dense"
    assert arange.arg("start").producer.inputs[0] is graph.inputs[1]
    end = arange.arg("end").producer
    assert end.op == "sym.add" and end.inputs[0] is arange.arg("start")
    assert end.inputs[1].producer.op == "aten.sym_size.int"
    ropes = [n for n in graph.nodes() if n.op == "arc.rope"]
    positions = ropes[0].inputs[3]  # the ids rope records are the absolute ones now
    assert all(n.inputs[3] is positions for n in ropes)
    assert positions.producer.origin == "insert_kv_cache/positions"
    assert record.notes == [] and 0 <= record.max_abs_diff <= 1e-4  # the proof's figure


def test_golden_opt_cumsum_positions_are_recomputed_and_sliced():
    # OPT: positions = cumsum(ones[B, T], 1) * ones - 1 + 2 (HF's attention-mask positions);
    # cumsum is not position by position, so the table lookup runs for P + T positions and
    # the last T rows are taken
    graph = fused(to_ir(tm.opt(), EXAMPLE, "opt"))
    record = cache(graph)
    assert record.counts == {"attention_cached": 2, "position_sliced": 1, "logits_to_keep": 1}
    (cut,) = [n for n in graph.nodes() if n.op == "aten.slice.Tensor"
              and n.origin == "insert_kv_cache/positions"]
    assert cut.arg("dim") == 1 and cut.output.shape == ("B", "T", 64)
    assert cut.arg("self").producer.op == "aten.embedding"
    assert cut.arg("self").shape == ("B", "(P + T)", 64)
    (cumsum,) = [n for n in graph.nodes() if n.op == "aten.cumsum"]
    assert cumsum.origin == "insert_kv_cache/positions_full"
    assert cumsum.output.shape == ("B", "(P + T)")
    assert [u.op for u, _ in cut.output.uses()] == ["arc.skip_layer_norm"]


# -- refusals: the graph stays exactly as it was, valid, with the reason ---------------------
class TinyAttention(torch.nn.Module):
    """Embedding, learned positions, one sdpa attention, an LM head. ``positions`` picks how
    the position ids are made; ``causal`` False leaves the attention bidirectional, "window"
    makes it a causal sliding window of 3 (neither is fused by fuse_attention)."""

    def __init__(self, causal: bool | str = True, positions: str = "arange"):
        super().__init__()
        torch.manual_seed(0)
        self.causal, self.positions = causal, positions
        self.wte = torch.nn.Embedding(tm.VOCAB, 32)
        self.wpe = torch.nn.Embedding(64, 32)
        self.qkv = torch.nn.Linear(32, 96)
        self.head = torch.nn.Linear(32, tm.VOCAB)

    def forward(self, tokens):
        b, t = tokens.shape
        if self.positions == "arange":
            pos = torch.arange(t, device=tokens.device)
        else:  # from token values: a position source the pass cannot trace
            pos = (tokens * 0 + 1).cumsum(1) - 1
        x = self.wte(tokens) + self.wpe(pos)
        q, k, v = self.qkv(x).view(b, t, 3, 2, 16).permute(2, 0, 3, 1, 4)
        if self.causal == "window":
            keep = torch.ones(t, t, dtype=torch.bool).tril() & ~torch.ones(
                t, t, dtype=torch.bool).tril(-3)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.head(x + y.transpose(1, 2).reshape(b, t, 32))


def _assert_refused(module: torch.nn.Module, reason: str) -> str:
    graph = fused(to_ir(module, EXAMPLE, "tiny"))
    text, inputs, outputs = print_graph(graph), list(graph.inputs), list(graph.outputs)
    meta = dict(graph.meta)
    record = cache(graph)
    assert graph.meta == meta
    verify(graph)
    assert record.counts == {} and print_graph(graph) == text
    assert graph.inputs == inputs and graph.outputs == outputs
    assert any(reason in note and "refused" in note for note in record.notes), record.notes
    torch.testing.assert_close(run_graph(graph, [EXAMPLE])[0], module(EXAMPLE))
    return record.notes[0]


def test_tiny_causal_module_is_cached():
    # the same module the refusals below break, so they fail for their own reason only
    module = TinyAttention()
    graph = fused(to_ir(module, EXAMPLE, "tiny"))
    assert cache(graph).counts == {"attention_cached": 1, "position_narrowed": 1,
                                   "logits_to_keep": 1}
    greedy_cached(graph, EXAMPLE[:, :3], module)


def test_refuses_bidirectional_attention():
    note = _assert_refused(TinyAttention(causal=False), "unfused attention remains")
    assert "scaled_dot_product_attention" in note


def test_refuses_sliding_window_attention():
    _assert_refused(TinyAttention(causal="window"), "unfused attention remains")


def test_refuses_positions_from_token_values():
    _assert_refused(TinyAttention(positions="from_tokens"),
                    "cached decoding differs from full recomputation")


# -- ONNX Runtime: the cached step lowered (plain Concat form), its optimizations off --------
def test_onnx_cached_decoding_matches_eager(tmp_path):
    from arcompile.runtimes.onnxruntime.lower import lower_to_onnx
    from arcompile.runtimes.onnxruntime.session import make_session

    for name in ("llama", "opt"):  # GQA + rotary; learned positions with an offset
        module = tm.BUILDERS[name]()
        graph = fused(to_ir(module, EXAMPLE, name))
        cache(graph)
        io = lower_to_onnx(graph, tmp_path / name)
        assert [i["name"] for i in io["inputs"][1:3]] == ["past_length", "past_key_0"]
        assert io["inputs"][2]["shape"] == ["B", graph.inputs[2].shape[1], "P", 16]
        session = make_session(tmp_path / name / "model.onnx", optimize=False)
        names = [v.name for v in graph.inputs]
        seq = torch.randint(3, tm.VOCAB, (2, 5), generator=torch.Generator().manual_seed(5))
        new, done = seq, 0
        state = [torch.zeros((2, v.shape[1], 0, v.shape[3])).numpy() for v in past_inputs(graph)]
        for step in range(6):
            outs = session.run(None, dict(zip(names, step_inputs(
                graph, new.numpy(), torch.tensor(done).numpy(), state, np.array(1)))))
            logits, state = torch.from_numpy(outs[0]), outs[1:]
            with torch.no_grad():
                full = module(seq)
            assert logits.shape[1] == 1  # logits_to_keep=1: the last position only
            diff = (logits[:, -1] - full[:, -1]).abs().max().item()
            assert diff < 1e-4, f"{name} step {step}: |Δlogit| {diff:.3g}"
            done, new = seq.shape[1], logits[:, -1].argmax(-1)[:, None]
            assert torch.equal(new[:, 0], full[:, -1].argmax(-1))
            seq = torch.cat([seq, new], dim=1)


# -- the real SmolLM2 (session fixture, sdpa form) ---------------------------------------------
def test_smollm2_cached_decoding_matches_full_recomputation(smollm2):
    graph = fused(from_exported_program(smollm2.program, "smollm2"))
    record = cache(graph)
    assert record.counts == {"attention_cached": 30, "position_narrowed": 3,
                             "logits_to_keep": 1}, record.notes
    prompt = smollm2.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    greedy_cached(graph, prompt, smollm2.module)
