"""The ONNX Runtime lowering: numbers against eager PyTorch with ORT's optimizations off,
weights in the external data file (tied ones once), and the unsupported-op error.

Shapes: B=1 T=1 (a decode step), B=2 T=7, and T=20, longer than the export example (T=8).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tiny_models as tm  # noqa: E402

from arcompile.errors import UnsupportedOpError  # noqa: E402
from arcompile.frontend.export import export_module  # noqa: E402
from arcompile.frontend.from_export import from_exported_program  # noqa: E402
from arcompile.ir import Graph  # noqa: E402
from arcompile.runtimes.onnxruntime import lower_to_onnx, make_session, supported_ops  # noqa: E402

SHAPES = [(1, 1), (2, 7), (3, 20)]
TOL = 1e-4


def _tokens(b: int, t: int) -> torch.Tensor:
    return torch.randint(0, tm.VOCAB, (b, t), generator=torch.Generator().manual_seed(10 * b + t))


def _max_error(module: torch.nn.Module, graph: Graph, out_dir: Path, inputs: list[torch.Tensor],
               optimize: bool = False) -> float:
    lower_to_onnx(graph, out_dir)
    session = make_session(out_dir / "model.onnx", threads=1, optimize=optimize)
    worst = 0.0
    for x in inputs:
        (got,) = session.run(None, {graph.inputs[0].name: x.numpy()})
        with torch.no_grad():
            want = module(x).numpy()
        assert got.shape == want.shape
        worst = max(worst, float(np.abs(got - want).max()))
    return worst


@pytest.mark.parametrize("name", sorted(tm.BUILDERS))
def test_tiny_model_matches_eager(name, tmp_path):
    module = tm.BUILDERS[name]()
    graph = from_exported_program(export_module(module, vocab_size=tm.VOCAB))
    error = _max_error(module, graph, tmp_path, [_tokens(b, t) for b, t in SHAPES])
    assert error <= TOL, f"{name}: max |logit difference| {error:.2e}"


# gpt2 is left out: torch's own run_decompositions() fails on its Conv1D view.
@pytest.mark.parametrize("name", ["llama", "gpt_neox"])
def test_decomposed_form_matches_eager(name, tmp_path):
    module = tm.BUILDERS[name]()
    ep = export_module(module, vocab_size=tm.VOCAB).run_decompositions()
    graph = from_exported_program(ep)
    assert graph.op_count("aten.scaled_dot_product_attention") == 0  # really the bmm form
    error = _max_error(module, graph, tmp_path, [_tokens(b, t) for b, t in SHAPES])
    assert error <= TOL, f"{name} decomposed: max |logit difference| {error:.2e}"


def test_ort_optimizations_accept_the_graph(tmp_path):
    module = tm.llama()
    graph = from_exported_program(export_module(module, vocab_size=tm.VOCAB))
    assert _max_error(module, graph, tmp_path, [_tokens(2, 7)], optimize=True) <= TOL


def test_io_description_and_dynamic_dims(tmp_path):
    graph = from_exported_program(export_module(tm.nanogpt(), vocab_size=tm.VOCAB))
    io = lower_to_onnx(graph, tmp_path)
    assert io == {
        "inputs": [{"name": graph.inputs[0].name, "dtype": "int64", "shape": ["B", "T"]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": ["B", "T", tm.VOCAB]}]}
    model = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["B", "T"]
    onnx.checker.check_model(str(tmp_path / "model.onnx"))  # reads the external data too


# -- op-level modules: ops the five fixtures do not reach ----------------------------------
class Indexing(torch.nn.Module):
    """Advanced indexing: one index, adjacent indices after a slice, non-adjacent indices."""

    def forward(self, x):  # x: (B, T, 8)
        b, t = torch.arange(x.shape[0]), torch.arange(x.shape[1])
        one = x[:, t.flip(0)]  # Gather on dim 1
        adjacent = x[:, t[:, None], torch.arange(4)[None, :]]  # (B, T, 4): S stays in place
        apart = x[b, :, b % 8]  # (B, T): S goes first
        picked = x.select(2, -1) + x.narrow(2, 1, 1).squeeze(-1) + x[..., 2]
        return one.sum(-1) + adjacent.sum(-1) + apart + picked


class Attention(torch.nn.Module):
    """sdpa with is_causal + enable_gqa, and with an additive float mask and a scale."""

    def forward(self, x):  # x: (B, T, 8)
        b, t = x.shape[0], x.shape[1]
        query = x.view(b, t, 4, 2).transpose(1, 2)  # (B, 4, T, 2)
        kv = x[..., :4].reshape(b, t, 2, 2).transpose(1, 2)  # (B, 2, T, 2)
        causal = F.scaled_dot_product_attention(query, kv, kv, is_causal=True, enable_gqa=True)
        bias = torch.triu(torch.full((t, t), -1e4), diagonal=1)
        masked = F.scaled_dot_product_attention(query, query, query, attn_mask=bias, scale=0.3)
        return (causal.sum(1) + masked.sum(1)).flatten(1)


class Misc(torch.nn.Module):
    """diff/cumsum/tril/masked_fill, chunk/split/unbind/stack, reductions, integer maths."""

    def forward(self, x):  # x: (B, T, 8)
        b, t = x.shape[0], x.shape[1]
        ids = (x * 10).long()
        steps = torch.diff(ids[..., 0], prepend=ids[:, :1, 0] - 1, dim=-1)
        counts = torch.cumsum(steps != 1, dim=-1).float()
        keep = torch.tril(torch.ones(t, t, dtype=torch.bool))
        filled = x[:, :, :1].expand(-1, -1, t).masked_fill(~keep, 0.0).sum(-1)
        lo, hi = torch.chunk(x, 2, dim=-1)
        p, q, r = torch.split(x, [2, 2, 4], dim=-1)
        act = (F.gelu(lo, approximate="tanh") + F.gelu(hi) + F.silu(p).sum(-1, keepdim=True)
               + F.log_softmax(q, -1).amax(-1, keepdim=True)).sum(-1)
        top = (x.max(dim=-1).values + x.argmax(-1).float() + x.any(-1).float()
               + torch.clamp(x, -0.5, 0.5).sum(-1))
        ints = (torch.remainder(ids, 3) + torch.floor_divide(ids, -4)).float().mean(-1)
        stacked = torch.stack([x[..., 0], x[..., 1]], dim=-1).sum(-1)
        made = torch.where(x > 0, x, torch.zeros_like(x)).sum(-1) + x.new_zeros(b, t)
        made = made + torch.full_like(x[..., 0], 2.0) + torch.arange(t // 2 + 1).float().sum()
        return (act + F.layer_norm(x, (8,)).sum(-1) + top + ints + stacked + made
                + sum(torch.unbind(r, dim=-1)) + counts + filled)


@pytest.mark.parametrize("decompose", [False, True], ids=["traced", "decomposed"])
@pytest.mark.parametrize("module_cls", [Indexing, Attention, Misc])
def test_op_module_matches_eager(module_cls, decompose, tmp_path):
    module = module_cls().eval()
    ep = export_module(module, example_inputs=(torch.randn(3, 5, 8),))
    graph = from_exported_program(ep.run_decompositions() if decompose else ep)
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(b, t, 8, generator=gen) for b, t in [(1, 1), (2, 4), (4, 11)]]
    assert _max_error(module, graph, tmp_path, inputs) <= TOL


# -- weights -------------------------------------------------------------------------------
def _external(model: onnx.ModelProto) -> dict[str, dict[str, str]]:
    return {t.name: {e.key: e.value for e in t.external_data} for t in model.graph.initializer
            if t.data_location == onnx.TensorProto.EXTERNAL}


def test_weights_go_to_the_data_file_and_tied_ones_once(tmp_path):
    graph = from_exported_program(export_module(tm.llama(), vocab_size=tm.VOCAB))
    lower_to_onnx(graph, tmp_path)
    model = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    external = _external(model)
    inline = [t for t in model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    assert all(len(t.raw_data) <= 64 for t in inline)  # only tiny constants stay inline
    assert all(e["location"] == "model.onnx.data" for e in external.values())
    # The tied embedding / lm_head matrix (512 x 64 floats) is one tensor, written once.
    tied = [t for t in model.graph.initializer if list(t.dims) == [tm.VOCAB, 64]]
    assert len(tied) == 1
    weight_bytes = sum(int(e["length"]) for e in external.values())
    data_size = (tmp_path / "model.onnx.data").stat().st_size
    assert weight_bytes <= data_size < weight_bytes + 4096 * len(external)
    assert (tmp_path / "model.onnx").stat().st_size < 64_000  # no weight bytes in the protobuf


def _two_matmuls(op: str = "aten.mm") -> tuple[Graph, torch.Tensor]:
    """x @ w @ w where the two uses of w are two constants holding the same tensor."""
    graph = Graph("tiny")
    x = graph.add_input("x", torch.float32, ("B", 8))
    w = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    first = graph.add_op("aten.mm", {"self": x, "mat2": graph.add_constant(w, "w_a")},
                         [(torch.float32, ("B", 8))], module="model.layers.0.mlp")
    second = graph.add_op(op, {"self": first.output, "mat2": graph.add_constant(w, "w_b")},
                          [(torch.float32, ("B", 8))], module="model.layers.0.mlp")
    graph.outputs.append(second.output)
    return graph, w


def test_constants_sharing_a_tensor_are_written_once(tmp_path):
    graph, w = _two_matmuls()
    lower_to_onnx(graph, tmp_path)
    model = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    assert list(_external(model)) == ["w_a"]
    assert (tmp_path / "model.onnx.data").stat().st_size == w.numel() * 4
    x = torch.randn(3, 8)
    (got,) = make_session(tmp_path / "model.onnx", optimize=False).run(None, {"x": x.numpy()})
    np.testing.assert_allclose(got, (x @ w @ w).numpy(), atol=1e-5)


def test_unsupported_op_names_op_and_module_and_writes_nothing(tmp_path):
    graph, _ = _two_matmuls(op="aten.frobnicate")
    out_dir = tmp_path / "engine"
    with pytest.raises(UnsupportedOpError) as err:
        lower_to_onnx(graph, out_dir)
    assert str(err.value) == ("no ONNX Runtime lowering for op 'aten.frobnicate' "
                              "(from module 'model.layers.0.mlp')")
    assert not out_dir.exists()


def test_supported_ops_lists_the_table():
    ops = supported_ops()
    for op in ("aten.scaled_dot_product_attention", "aten.index.Tensor", "aten.sym_size.int",
               "sym.floordiv", "aten._softmax", "aten.bmm", "arc.constant"):
        assert op in ops
    assert ops == sorted(ops)
