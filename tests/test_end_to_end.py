"""End to end: model file → arcompile.optimize → engine directory → arcompile.load → tokens.

The engine's greedy tokens must equal eager PyTorch's, on the tiny fixtures (GPT-2 from its
TorchScript .pt, GPT-NeoX, OPT, LLaMA, nanoGPT) and on the real SmolLM2 (test_smollm2.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import tiny_models as tm
import torch

import arcompile
from arcompile.frontend.from_export import from_exported_program
from arcompile.frontend.load import load_model
from arcompile.ir import run_graph
from arcompile.serve.decoding import Sampler

PROMPTS = [[5, 17, 42, 8, 99, 3], [7, 300, 12]]


def eager_greedy(module: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by full recomputation in eager PyTorch: the yardstick."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = module(torch.tensor([ids]))
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("name", ["gpt2", "gpt_neox", "opt", "llama", "nanogpt"])
def test_greedy_tokens_equal_eager(name, tmp_path):
    module, source = tm.model_and_source(name, tmp_path)
    report = arcompile.optimize(source, tmp_path / "engine", log=None)
    assert report.lowering_max_abs_diff <= 1e-4
    eng = arcompile.load(tmp_path / "engine")
    for prompt in PROMPTS:
        assert eng.generate(prompt, max_new_tokens=12) == eager_greedy(module, prompt, 12)
    # a batch of two prompts of different lengths gives what each gives alone
    batch = eng.generate(PROMPTS, max_new_tokens=12)
    assert batch == [eager_greedy(module, p, 12) for p in PROMPTS]
    # and the logits of a whole sequence match eager's
    x = torch.tensor([PROMPTS[0]])
    assert abs(eng.logits(x.tolist()) - module(x).detach().numpy()).max() <= 1e-4


@pytest.mark.parametrize("name", ["gpt2", "gpt_neox", "opt", "llama", "nanogpt"])
def test_reference_interpreter_reproduces_eager(name, tmp_path):
    module, source = tm.model_and_source(name, tmp_path)
    graph = from_exported_program(load_model(source, log=lambda _m: None).program)
    for shape in [(1, 1), (2, 9), (1, 40)]:
        x = torch.randint(0, tm.VOCAB, shape, generator=torch.Generator().manual_seed(0))
        got = run_graph(graph, [x])[0]
        assert (got - module(x).detach()).abs().max().item() <= 1e-5


def test_engine_manifest_records_passes_source_and_tools(tmp_path):
    report = arcompile.optimize(tm.nanogpt(), tmp_path / "engine", log=None)
    m = report.manifest
    assert m["format_version"] == 1 and m["runtime"] == "onnxruntime-cpu"
    names = [p["name"] for p in m["passes"]]
    assert names[:3] == ["remove_noops", "constant_folding", "cse"]
    # the cache after the pipeline, then attention packed on the cached step
    assert names[-5:] == ["dce", "insert_kv_cache", "dce", "pack_attention", "dce"]
    assert m["passes"][names.index("fuse_attention")]["counts"] == {"explicit": 2}
    assert m["passes"][names.index("pack_attention")]["counts"] == {"packed": 2}
    proven = m["passes"][:-4] + [m["passes"][-2]]  # the cache and the packing: own proofs
    assert all(p["max_abs_diff"] <= 1e-4 for p in proven)
    # DCE of the cached step: not compared
    assert m["passes"][-3]["max_abs_diff"] is None and m["passes"][-1]["max_abs_diff"] is None
    assert all(p["max_abs_diff"] == 0.0 for p in m["passes"][:3])  # before any fusion: exact
    assert m["source"]["kind"] == "module"
    assert {"torch", "onnx", "onnxruntime", "arcompile"} <= set(m["tools"])
    assert set(m["files"]) == {"model.onnx", "model.onnx.data"}
    assert m["inputs"][0]["shape"] == ["B", "T"]


def test_sampling_is_reproducible_with_a_seed(tmp_path):
    arcompile.optimize(tm.nanogpt(), tmp_path / "engine", log=None)
    eng = arcompile.load(tmp_path / "engine")
    kw = dict(max_new_tokens=10, do_sample=True, temperature=50.0)  # flat: many tokens likely
    a = eng.generate(PROMPTS[0], seed=7, **kw)
    assert a == eng.generate(PROMPTS[0], seed=7, **kw)
    assert a != eng.generate(PROMPTS[0], seed=8, **kw)
    # top_k=1 is greedy whatever the temperature
    assert eng.generate(PROMPTS[0], max_new_tokens=8, do_sample=True, top_k=1, seed=3,
                        temperature=5.0) == eng.generate(PROMPTS[0], max_new_tokens=8)


def test_sampler_top_k_and_top_p_keep_only_their_tokens():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    top_k = Sampler(do_sample=True, top_k=2, seed=0)
    assert {top_k(logits) for _ in range(300)} == {0, 1}
    top_p = Sampler(do_sample=True, top_p=0.9, seed=0)  # 0.5 + 0.3 < 0.9 <= 0.5 + 0.3 + 0.15
    assert {top_p(logits) for _ in range(300)} == {0, 1, 2}
    assert Sampler()(logits) == 0
    with pytest.raises(arcompile.ArcompileError, match="top_p"):
        Sampler(do_sample=True, top_p=0)


def test_generation_stops_at_eos_per_row(tmp_path):
    arcompile.optimize(tm.nanogpt(), tmp_path / "engine", log=None)
    eng = arcompile.load(tmp_path / "engine")
    free = eng.generate(PROMPTS, max_new_tokens=8)
    eos = free[0][2]  # the third token row 0 produces
    out = eng.generate(PROMPTS, max_new_tokens=8, eos_token_id=eos)
    for got, full in zip(out, free):  # each row stops right after its first EOS, kept
        assert got == (full[: full.index(eos) + 1] if eos in full else full)
    assert len(out[0]) <= 3
