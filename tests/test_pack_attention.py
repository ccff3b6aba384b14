"""pack_attention: after insert_kv_cache (in-place runtime) every cached attention whose q/k/v
are head views of [B, T, n*D] projections becomes one ``arc.attention_cached_packed`` on those
tensors, the rope folded in, lowered to one GroupQueryAttention per layer; the residual add +
RMSNorm lowers to one SkipSimplifiedLayerNormalization. Golden graphs (LLaMA: merged Q/K/V
linear + rotary; GPT-2: the c_attn split; the decomposed export: three permutes, separate
q/k/v), engine logits against eager at every cached step (LLaMA, GPT-2, GPT-NeoX refused,
a GPT-J with interleaved partial rotary from a table), and refusals that leave the graph as it
was: the concat runtime, positions that are not past_length + arange(T), a failed proof."""

from __future__ import annotations

from collections import Counter

import pytest
import tiny_models as tm
import torch
from helpers import ops
from test_end_to_end import eager_greedy
from test_kv_cache_engine import cached_vs_full

import arcompile
from arcompile.frontend.from_export import from_exported_program
from arcompile.frontend.load import load_model
from arcompile.ir import print_graph
from arcompile.ir.graph import Graph
from arcompile.passes import PassManager, VerifyHook, build_pipeline
from arcompile.passes.dce import DeadCodeElimination
from arcompile.passes.insert_kv_cache import InsertKVCache
from arcompile.passes.pack_attention import PackAttention

MAX = 128
PROMPT = [5, 17, 42, 8, 99, 3]
EQUAL = [[5, 17, 42, 8, 99, 3], [7, 300, 12, 64, 2, 250]]


def cached(module: torch.nn.Module, runtime: str = "inplace", decompose: bool = False) -> Graph:
    """The default pipeline, then the KV cache (``runtime``) and DCE: the pass's input."""
    loaded = load_model(module, log=lambda _m: None)
    program = loaded.program.run_decompositions() if decompose else loaded.program
    graph = from_exported_program(program, name="tiny")
    PassManager(build_pipeline("default"), [VerifyHook()]).run(graph)
    PassManager([InsertKVCache(runtime_cache=runtime, max_context=MAX), DeadCodeElimination()],
                [VerifyHook()]).run(graph)
    return graph


def pack(graph: Graph):
    """PackAttention then DCE, verified after each; the pass's record."""
    return PassManager([PackAttention(), DeadCodeElimination()], [VerifyHook()]).run(graph)[0]


def packed_nodes(graph: Graph):
    return [n for n in graph.nodes() if n.op == "arc.attention_cached_packed"]


def gptj_64() -> torch.nn.Module:
    """GPT-J with head dim 64 and interleaved rotary on 16 of them, cos/sin from a table:
    a partial rotary GroupQueryAttention takes (rot / 2 = 8). Q/K/V merge with the parallel
    MLP's fc_in (four outputs), so q, k, v go in separately."""
    return tm._hf("GPTJConfig", "GPTJForCausalLM", n_embd=128, n_inner=128, n_layer=2,
                  n_head=2, n_positions=MAX, rotary_dim=16)


# -- golden ------------------------------------------------------------------------------------
def test_llama_one_packed_op_on_the_merged_projection_rope_folded_in():
    graph = cached(tm.llama())
    before = Counter(ops(graph))
    assert before["arc.attention_cached"] == 2 and before["arc.rope"] == 4
    assert before["arc.split_linear"] == 2 and before["aten.transpose.int"] == 8
    presents = [v.name for v in graph.outputs[1:]]
    record = pack(graph)
    assert record.counts == {"packed_linear": 2, "rotary": 2} and not record.notes
    assert record.max_abs_diff == 0.0  # the proof: same arithmetic, same numbers
    after = Counter(ops(graph))
    for gone in ("arc.attention_cached", "arc.rope", "arc.split_linear", "aten.transpose.int",
                 "aten.view", "aten.reshape", "aten.arange.start", "aten.cos"):
        assert after[gone] == 0, gone
    assert after["arc.attention_cached_packed"] == 2
    assert [v.name for v in graph.outputs[1:]] == presents  # the cache layout's names
    cos_caches = set()
    for i, node in enumerate(packed_nodes(graph)):
        qkv, past_key, past_value, past_length, cos, sin = node.inputs
        assert node.attrs == {"num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "scale": 0.25,
                              "causal": True, "mask_kind": "bool", "softmax_dtype": "float32",
                              "packed": True, "rotary_dim": 16, "rotary_interleaved": False}
        assert node.origin == "pack_attention/packed_linear"
        assert node.module == f"model.model.layers.{i}.self_attn"
        assert (past_key.name, past_value.name) == (f"past_key_{i}", f"past_value_{i}")
        assert past_length.name == "past_length"
        linear = qkv.producer  # one linear over the merged Q/K/V weight: [B, T, (4 + 2 + 2) * 16]
        assert linear.op == "aten.linear" and qkv.shape == ("B", "T", 128)
        assert linear.arg("weight").producer.op == "arc.concat_weights"
        assert node.outputs[0].shape == ("B", "T", 64)
        assert node.outputs[0].uses()[0][0].module.endswith("o_proj")
        cos_caches.add(cos)
        # cos(position * inv_freq) for every position the engine may decode
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 16, 2).float() / 16))
        want = torch.arange(MAX).float()[:, None] * inv_freq
        assert cos.shape == (MAX, 8) and torch.allclose(cos.data, want.cos(), atol=1e-6)
        assert torch.allclose(sin.data, want.sin(), atol=1e-6)
    assert len(cos_caches) == 1  # one pair of caches for every layer


def test_gpt2_the_split_input_goes_in_whole():
    graph = cached(tm.gpt2())
    record = pack(graph)
    assert record.counts == {"packed": 2}
    for node in packed_nodes(graph):
        assert len(node.inputs) == 3  # qkv, past_key, past_value: no rotary inputs
        assert node.attrs["packed"] and node.attrs["rotary_dim"] == 0
        qkv = node.inputs[0]
        assert qkv.shape == ("B", "T", 192) and "c_attn" in qkv.producer.module
    assert "aten.split.Tensor" not in ops(graph)


def test_decomposed_export_permute_chain_and_separate_inputs():
    # run_decompositions(): q = permute(view(view(mm))), out through three permutes
    graph = cached(tm.llama(), decompose=True)
    record = pack(graph)
    assert record.counts == {"separate": 2, "rotary": 2}
    for node in packed_nodes(graph):
        q, k, v = node.inputs[:3]
        assert [t.shape for t in (q, k, v)] == [("B", "T", 64), ("B", "T", 32), ("B", "T", 32)]
        assert not node.attrs["packed"] and node.attrs["rotary_dim"] == 16
    assert "aten.permute" not in ops(graph) and "arc.rope" not in ops(graph)


# -- numbers: the engine against eager at every cached step -------------------------------------
@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """name -> (eager module, default engine (in-place, packed), concat engine (unpacked))."""
    builders = {**tm.BUILDERS, "gptj_64": gptj_64}

    def get(name):
        if name not in built:
            folder = tmp_path_factory.mktemp(name)
            module = builders[name]()
            arcompile.optimize(module, folder / "packed", max_context=MAX, log=None)
            arcompile.optimize(module, folder / "concat", max_context=MAX, log=None,
                               kv_cache_runtime="concat")
            built[name] = (module, arcompile.load(folder / "packed"),
                           arcompile.load(folder / "concat"))
        return built[name]
    built: dict = {}
    return get


def onnx_ops(engine) -> Counter:
    import onnx

    model = onnx.load(str(engine.path / "model.onnx"), load_external_data=False)
    return Counter(n.op_type for n in model.graph.node), model


PACKED = {"llama": {"packed_linear": 2, "rotary": 2}, "gpt2": {"packed": 2},
          "gpt_neox": {}, "gptj_64": {"separate": 2, "rotary": 2}}


@pytest.mark.parametrize("name", sorted(PACKED))
def test_engine_logits_at_every_cached_step_equal_eager(name, engines):
    module, packed, concat = engines(name)
    record = {p["name"]: p for p in packed.manifest["passes"]}["pack_attention"]
    assert record["counts"] == PACKED[name]
    if name == "gpt_neox":  # q|k|v interleaved per head, rotary 4 of 16: left as it was
        assert any("not packed" in n for n in record["notes"])

    def eager(seq):
        with torch.no_grad():
            return module(torch.tensor([seq])).numpy()
    # optimize's own check of the lowered step, ORT's graph optimizations off, against the IR
    assert packed.manifest["lowering_max_abs_diff"] <= 1e-4
    worst, tokens = cached_vs_full(packed, eager, PROMPT[:4], 32)
    assert worst <= 1e-4, f"{name}: max |Δlogit| {worst:.3g} over 32 cached steps"
    assert tokens == concat.generate(PROMPT[:4], max_new_tokens=32)

    counts, model = onnx_ops(packed)
    assert counts["GroupQueryAttention"] == 2
    if PACKED[name]:  # one kernel per layer: nothing moves q, k, v or the output around it
        assert counts["RotaryEmbedding"] == 0
        gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
        rotary = {a.name: a.i for a in gqa[0].attribute}.get("do_rotary", 0)
        assert rotary == int("rotary" in PACKED[name])
        if "packed" in PACKED[name] or "packed_linear" in PACKED[name]:
            assert list(gqa[0].input[1:3]) == ["", ""]  # q|k|v packed into the query
        if name == "llama":
            assert_nothing_around_attention(model)


@pytest.mark.parametrize("name", ["llama", "gptj_64"])
def test_batch_of_prompts(name, engines):
    module, packed, _ = engines(name)
    assert packed.generate(EQUAL, max_new_tokens=12) == [eager_greedy(module, p, 12)
                                                         for p in EQUAL]


def test_residual_add_and_rms_norm_are_one_kernel(engines):
    _, packed, concat = engines("llama")
    for engine in (packed, concat):  # the norm lowering does not depend on the cache
        counts, _ = onnx_ops(engine)
        # 2 layers x 2 residual norms, the final norm included; the first is a plain RMSNorm
        assert counts["SkipSimplifiedLayerNormalization"] == 4
        assert counts["SimplifiedLayerNormalization"] == 1


# -- negative ----------------------------------------------------------------------------------
def test_concat_runtime_is_left_as_it_was():
    graph = cached(tm.llama(), runtime="concat")
    before = print_graph(graph)
    record = pack(graph)
    assert not record.counts and "'concat'" in record.notes[0]
    assert print_graph(graph) == before


def test_positions_not_past_plus_arange_are_refused():
    # the ropes' recorded positions shifted by one: GroupQueryAttention would rotate at P + i
    graph = cached(tm.llama())
    ropes = [n for n in graph.nodes() if n.op == "arc.rope"]
    pos = ropes[0].inputs[3]
    shifted = graph.add_op("aten.add.Tensor", {"self": pos, "other": 1},
                           [(pos.dtype, pos.shape)], names=["shifted_positions"]).output
    for rope in ropes:
        graph.set_input(rope, 3, shifted)
    before = print_graph(graph)
    record = pack(graph)
    assert not record.counts and len(record.notes) == 2
    assert "not provably past_length + arange(T)" in record.notes[0]
    assert print_graph(graph) == before


def test_a_failed_proof_adopts_nothing(monkeypatch):
    from arcompile.ir import ops as registry

    right = registry.reference_impl("arc.attention_cached_packed")

    def wrong(*inputs, **attrs):  # off by 0.01 in every output element
        out, key, value = right(*inputs, **attrs)
        return [out + 0.01, key, value]
    monkeypatch.setitem(registry._REFERENCE, "arc.attention_cached_packed", wrong)
    graph = cached(tm.llama())
    before = print_graph(graph)
    record = pack(graph)
    assert not record.counts and "differs from the unpacked one" in record.notes[0]
    assert print_graph(graph) == before


# -- SmolLM2 (the session's engine, built with the defaults) -----------------------------------
def test_smollm2_one_attention_kernel_per_layer(smollm2_engine):
    engine = arcompile.load(smollm2_engine)
    record = {p["name"]: p for p in engine.manifest["passes"]}["pack_attention"]
    assert record["counts"] == {"packed_linear": 30, "rotary": 30}
    assert record["max_abs_diff"] <= 1e-4
    counts, model = onnx_ops(engine)
    assert counts["GroupQueryAttention"] == 30 and counts["RotaryEmbedding"] == 0
    assert counts["SkipSimplifiedLayerNormalization"] == 60
    assert_nothing_around_attention(model)


def assert_nothing_around_attention(model) -> None:
    """Each GroupQueryAttention reads the Q/K/V MatMul and feeds the output projection's."""
    made = {o: n for n in model.graph.node for o in n.output}
    for gqa in (n for n in model.graph.node if n.op_type == "GroupQueryAttention"):
        assert made[gqa.input[0]].op_type == "MatMul"
        readers = [n for n in model.graph.node if gqa.output[0] in n.input]
        assert [n.op_type for n in readers] == ["MatMul"]
