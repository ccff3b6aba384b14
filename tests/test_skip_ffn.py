"""skip_ffn: golden before/after (gated and written-out MLPs), numbers (flags off: the original
logits; flags on: eager PyTorch with those MLPs zeroed, in the interpreter and in ONNX Runtime
with its optimizations off), negatives left as they were, reproducible choices, and the
lowering's If actually holding the block's work."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import tiny_models as tm
import torch
from helpers import ops, to_ir

from arcompile.ir.cached_step import CachedStep, past_inputs, step_inputs
from arcompile.ir.graph import Graph
from arcompile.ir.interpreter import run_graph
from arcompile.ir.skip_routing import budget_count, choose, flags
from arcompile.passes import PassManager, VerifyHook, build_pipeline
from arcompile.passes.dce import DeadCodeElimination
from arcompile.passes.insert_kv_cache import InsertKVCache
from arcompile.passes.skip_ffn import SkipFFN, rank

EXAMPLE = torch.randint(0, tm.VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
PROMPT = torch.randint(0, tm.VOCAB, (1, 9), generator=torch.Generator().manual_seed(2))


_CACHED: dict[str, Graph] = {}


def cached(module: torch.nn.Module) -> Graph:
    """The default pipeline then the KV cache (concat form), as skip_ffn expects its input:
    built once per model class, a fresh copy (weights shared) each call."""
    key = type(module.model).__name__ if hasattr(module, "model") else type(module).__name__
    if key not in _CACHED:
        graph = to_ir(module, EXAMPLE)
        PassManager(build_pipeline("default") + [InsertKVCache(), DeadCodeElimination()],
                    [VerifyHook()]).run(graph)
        _CACHED[key] = graph
    return (_CACHED[key]).copy()


def route(graph: Graph, budget: float = 0.5, **kw):
    records = PassManager([SkipFFN(budget, vocab=tm.VOCAB, samples=2, length=16, **kw)],
                          [VerifyHook()]).run(graph)
    return records[0]


def run_cached(graph: Graph, tokens: torch.Tensor, skip=None) -> torch.Tensor:
    """Logits of ``tokens`` as one prefill (empty cache), the ``skip`` flags fed."""
    empty = [torch.zeros((tokens.shape[0], v.shape[1], 0, v.shape[3]), dtype=v.dtype)
             for v in past_inputs(graph)]
    return run_graph(graph, step_inputs(graph, tokens, torch.tensor(0), empty,
                                        torch.tensor(0), skip))[0]


def eager_skipping(module: torch.nn.Module, skipped: set[int], tokens: torch.Tensor):
    """The HF model's logits with the MLPs of ``skipped`` layers returning zeros."""
    layers = module.model.model.layers if hasattr(module.model, "model") else \
        module.model.transformer.h
    handles = [layer.mlp.register_forward_hook(lambda m, i, out: torch.zeros_like(out))
               for n, layer in enumerate(layers) if n in skipped]
    try:
        with torch.no_grad():
            return module(tokens)
    finally:
        for h in handles:
            h.remove()


# -- golden ---------------------------------------------------------------------------------
def test_golden_llama_routes_every_gated_mlp():
    graph = cached(tm.llama())
    before = ops(graph)
    record = route(graph, 0.5)
    assert record.counts == {"skip_ffn": 2}
    assert record.max_abs_diff == 0.0
    after = ops(graph)
    assert after.count("arc.skip_ffn") == 2 and len(after) == len(before) + 2
    assert sorted(op for op in after if op != "arc.skip_ffn") == sorted(before)
    # the flags: the last input, bool [blocks]; logits_to_keep stays before it
    assert [v.name for v in graph.inputs][-2:] == ["logits_to_keep", "skip_ffn"]
    assert graph.inputs[-1].dtype == torch.bool and graph.inputs[-1].shape == (2,)
    routed = [n for n in graph.nodes() if n.op == "arc.skip_ffn"]
    for index, node in enumerate(routed):
        flags_in, residual, ffn_out = node.inputs
        assert flags_in is graph.inputs[-1]
        assert ffn_out.producer.op == "arc.gated_mlp"
        assert node.attrs == {"index": index, "block": f"model.model.layers.{index}.mlp"}
        assert node.module == f"model.model.layers.{index}.mlp"
        assert node.origin == "skip_ffn/skip_ffn"
        (reader, port), = node.output.uses()  # the residual add a fused norm took
        assert reader.op == "arc.skip_rms_norm" and residual in reader.inputs
    meta = graph.meta["skip_ffn"]
    assert meta["input"] == "skip_ffn" and meta["route"] == "all" and meta["budget"] == 0.5
    assert [b["module"] for b in meta["blocks"]] == [f"model.model.layers.{i}.mlp"
                                                      for i in range(2)]
    assert sorted(meta["ranking"]) == [0, 1] and len(meta["chosen"]) == 1
    assert meta["chosen"] == meta["ranking"][:1]
    assert meta["calibration"] == "seeded random token ids (no tokenizer)"


def test_golden_gpt2_written_out_mlp_routed_by_structure():
    # GPT-2's MLP is addmm -> tanh GELU written out -> addmm over 2-D views: not fused, yet a
    # feed-forward block by structure; the attention blocks are not routed
    graph = cached(tm.gpt2())
    record = route(graph, 0.5)
    assert record.counts == {"skip_ffn": 2}
    routed = [n for n in graph.nodes() if n.op == "arc.skip_ffn"]
    assert [n.attrs["block"] for n in routed] == ["model.transformer.h.0.mlp",
                                                  "model.transformer.h.1.mlp"]
    assert all(n.inputs[2].producer.op == "aten.view" for n in routed)  # [B*T, H] -> [B, T, H]
    assert not [note for note in record.notes if "attention" in note]


def test_ablation_scores_are_the_loss_increase_of_each_block_skipped():
    from arcompile.eval.calibration import calibration_ids

    graph = cached(tm.llama())
    route(graph, 0.5)
    meta = graph.meta["skip_ffn"]
    assert meta["method"] == "ablation" and "loss increase" in meta["score"]
    tokens = torch.tensor(calibration_ids(None, tm.VOCAB, 2, 16)[0])

    def loss(chosen):
        logits = run_cached(graph, tokens, flags(graph, chosen))
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, tm.VOCAB).double(),
                                                 tokens[:, 1:].reshape(-1)).item()

    for block in range(2):
        assert meta["scores"][block] == pytest.approx(loss([block]) - loss([]), abs=2e-6)
    assert meta["ranking"] == rank(meta["scores"])


def test_cosine_method_scores_the_residual_stream():
    graph = cached(tm.llama())
    route(graph, 0.5, method="cosine")
    meta = graph.meta["skip_ffn"]
    assert meta["method"] == "cosine" and all(-1 <= s <= 1 for s in meta["scores"])
    assert meta["ranking"] == rank(meta["scores"], higher_first=True)
    with pytest.raises(ValueError, match="method"):
        SkipFFN(0.5, method="magic")


def test_route_chosen_only_routes_the_budget():
    graph = cached(tm.llama())
    route(graph, 0.5, route="chosen")
    meta = graph.meta["skip_ffn"]
    assert len(meta["blocks"]) == 1 and meta["chosen"] == [0] and meta["ranking"] == [0]
    assert ops(graph).count("arc.skip_ffn") == 1


# -- numbers --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_flags_off_equal_original_and_on_equal_eager_zeroed(name):
    module = tm.BUILDERS[name]()
    graph = cached(module)
    original = run_cached(graph, PROMPT)
    route(graph, 0.5)
    assert (run_cached(graph, PROMPT) - original).abs().max().item() == 0.0
    with torch.no_grad():
        eager = module(PROMPT)
    assert (original - eager).abs().max().item() < 1e-4
    for chosen in ([0], [1], [0, 1]):
        got = run_cached(graph, PROMPT, flags(graph, chosen))
        want = eager_skipping(module, set(chosen), PROMPT)
        assert (got - want).abs().max().item() < 1e-4, chosen
        assert (got - original).abs().max().item() > 1e-3  # skipping changes something


@pytest.mark.parametrize("name", ["llama", "gpt2", "opt", "nanogpt"])
def test_lowered_if_matches_interpreter_flags_off_and_on(name, tmp_path):
    from arcompile.runtimes.onnxruntime.lower import lower_to_onnx
    from arcompile.runtimes.onnxruntime.session import make_session

    graph = cached(tm.BUILDERS[name]())
    route(graph, 0.5)
    lower_to_onnx(graph, tmp_path)
    empty = [np.zeros((1, v.shape[1], 0, v.shape[3]), dtype=np.float32)
             for v in past_inputs(graph)]
    names = [v.name for v in graph.inputs]
    # ORT's own optimizations off (the lowering itself), then on (what engines run: its
    # fusions must not reach across the If)
    for session in (make_session(tmp_path / "model.onnx", optimize=False),
                    make_session(tmp_path / "model.onnx")):
        for chosen in ([], [0], [1], [0, 1]):
            f = flags(graph, chosen)
            want = run_cached(graph, PROMPT, f).numpy()
            feed = dict(zip(names, step_inputs(graph, PROMPT.numpy(), np.array(0), empty,
                                               np.array(0), f.numpy())))
            got = session.run(None, feed)[0]
            assert np.abs(got - want).max() < 1e-4, chosen

    # each routed block's matmuls live in the else-branch of an If: skipping skips them
    model = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    ifs = [n for n in model.graph.node if n.op_type == "If"]
    assert len(ifs) == 2
    for node in ifs:
        branches = {a.name: a.g for a in node.attribute}
        assert [n.op_type for n in branches["then_branch"].node] == ["Shape", "ConstantOfShape"]
        assert sum(n.op_type in ("MatMul", "Gemm") for n in branches["else_branch"].node) >= 2
    top = [n.op_type for n in model.graph.node]
    layers = len(past_inputs(graph)) // 2
    # the main graph keeps the attention projections and the LM head, not the MLPs
    assert top.count("MatMul") + top.count("Gemm") <= 4 * layers + 1


def test_quantized_blocks_are_skipped_too(tmp_path):
    # routing comes before quantization: the int4 MLP (MatMulNBits and the ops around it)
    # is what the If's else-branch holds; plain and skipped decoding still run
    import arcompile

    arcompile.optimize(tm.llama(), tmp_path / "e", log=None, skip=0.5, quantize="int4",
                       quant_method="rtn", max_ppl_increase=10.0)
    model = onnx.load(str(tmp_path / "e" / "model.onnx"), load_external_data=False)
    ifs = [n for n in model.graph.node if n.op_type == "If"]
    assert len(ifs) == 2
    for node in ifs:
        body = next(a.g for a in node.attribute if a.name == "else_branch")
        assert sum(n.op_type == "MatMulNBits" for n in body.node) == 2
    eng = arcompile.load(tmp_path / "e")
    prompt = PROMPT[0].tolist()
    assert eng.generate(prompt, max_new_tokens=6, speculative="self") == \
        eng.generate(prompt, max_new_tokens=6)
    assert len(eng.generate(prompt, max_new_tokens=6, skip=True)) == 6


# -- choices --------------------------------------------------------------------------------
def test_router_choice_is_reproducible():
    # two graphs built independently from the same model and text: the same choice
    a, b = cached(tm.llama()), to_ir(tm.llama(), EXAMPLE)
    PassManager(build_pipeline("default") + [InsertKVCache(), DeadCodeElimination()],
                [VerifyHook()]).run(b)
    route(a, 0.5)
    route(b, 0.5)
    assert a.meta["skip_ffn"] == b.meta["skip_ffn"]
    for budget in (0.25, 0.75):  # and another budget takes the top of the same ranking
        c = cached(tm.llama())
        route(c, budget)
        meta = c.meta["skip_ffn"]
        assert meta["ranking"] == a.meta["skip_ffn"]["ranking"]
        assert meta["chosen"] == sorted(meta["ranking"][:budget_count(budget, 2)])


def test_ranking_budget_and_choose():
    # the lowest loss increase first; cos(h, h + ffn): the highest first; ties: earlier block
    assert rank([0.9, 0.95, 0.9, 0.99]) == [0, 2, 1, 3]
    assert rank([0.9, 0.95, 0.9, 0.99], higher_first=True) == [3, 1, 0, 2]
    assert rank([0.1, 0.1 + 1e-9]) == [0, 1] and rank([0.1 + 1e-9, 0.1]) == [0, 1]
    assert [budget_count(b, 30) for b in (0.1, 0.2, 0.25, 0.3, 0.01, 0.99)] == \
        [3, 6, 8, 9, 1, 30]
    meta = {"scores": [0.9, 0.95, 0.9, 0.99], "ranking": [3, 1, 0, 2], "chosen": [3],
            "blocks": [{}] * 4}
    assert choose(meta, True) == [3]
    assert choose(meta, 0.5) == [1, 3]
    for bad in (0, 1, 1.5, -0.1, "0.5", False):
        with pytest.raises(ValueError):
            choose(meta, bad)
    assert flags(meta, [1, 3]).tolist() == [False, True, False, True]


# -- negatives ------------------------------------------------------------------------------
class SharedMLP(torch.nn.Module):
    """Residual blocks whose MLP output is also read elsewhere (a second head): skipping it
    would change more than the residual stream, so nothing may be routed."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(tm.VOCAB, 16)
        self.up, self.down = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)
        self.head = torch.nn.Linear(16, tm.VOCAB)

    def forward(self, ids):
        h = self.emb(ids)
        ffn = self.down(torch.relu(self.up(h)))
        return self.head(h + ffn) + self.head(ffn)


def test_negative_ffn_output_with_another_reader_is_not_routed():
    graph = to_ir(SharedMLP().eval(), EXAMPLE)
    PassManager(build_pipeline("default"), [VerifyHook()]).run(graph)
    # as if cached: the check comes later
    graph.meta["kv_cache"] = CachedStep(past_length="past_length", past=(), present=())
    before = ops(graph)
    record = route(graph, 0.5)
    assert record.counts == {}
    assert ops(graph) == before and "skip_ffn" not in graph.meta
    assert any("another reader" in n for n in record.notes), record.notes
    assert any("refused" in n and "no feed-forward block" in n for n in record.notes)


def test_negative_uncached_and_already_routed_graphs_are_refused():
    graph = to_ir(tm.llama(), EXAMPLE)
    PassManager(build_pipeline("default"), [VerifyHook()]).run(graph)
    record = route(graph, 0.5)
    assert record.counts == {} and "no KV cache" in record.notes[0]
    graph = cached(tm.llama())
    route(graph, 0.5)
    before = ops(graph)
    record = route(graph, 0.5)
    assert record.counts == {} and "already has layer-skip routing" in record.notes[0]
    assert ops(graph) == before


@pytest.mark.parametrize("budget", [0, 1, -0.25, 1.5])
def test_budget_outside_zero_one_is_an_error(budget):
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        SkipFFN(budget)
