"""The token embedding reading the tied LM head's quantized table (``quantize_weights``'s
``embedding="lm_head"``, ``--embedding lm-head``): golden (the lookup becomes
arc.gather_nbits on the head's own packed constants, the float table goes), numbers
(interpreter == ONNX Runtime's GatherBlockQuantized == eager PyTorch with the tied table
replaced by its dequantized value), the partial last block, the forms it refuses, and the
optimize option (the CLI flag: test_quantize_gate.py)."""

from __future__ import annotations

import pytest
import tiny_models as tm
import torch
from helpers import apply_pass, cleanup, ops, run_onnx, to_ir

import arcompile
from arcompile.errors import ArcompileError
from arcompile.ir import run_graph
from arcompile.ir.quant_math import quantize
from arcompile.passes.quantize_weights import QuantizeWeights
from arcompile.runtimes.onnxruntime.lower import lower_to_onnx
from arcompile.runtimes.onnxruntime.session import make_session

TOKENS = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
X = torch.tensor([[7, 3, 9, 1, 2, 8, 4]])


class TiedWide(torch.nn.Module):
    """A tied embedding / LM head of SmolLM2's width (576: 4.5 blocks of 128)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(16, 576)
        self.mid = torch.nn.Linear(576, 576, bias=False)
        self.head = torch.nn.Linear(576, 16, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.relu(self.mid(self.emb(ids))))


def _eager_with_table(model, table):
    """``model`` with the tied table (embedding and head alike) and ``mid`` replaced by the
    given / their dequantized values: what the quantized graph must compute."""
    import copy

    model = copy.deepcopy(model)
    model.emb.weight = torch.nn.Parameter(table)
    model.head.weight = model.emb.weight
    return model


@pytest.mark.parametrize("bits,block_size,zero_point", [(4, 32, "none"), (4, 64, "int"),
                                                        (4, 128, "int"), (8, 32, "int")])
def test_tied_embedding_reads_the_quantized_head(tmp_path, bits, block_size, zero_point):
    model = TiedWide().eval()
    g = cleanup(to_ir(model, TOKENS))
    rule = f"int{bits}_g{block_size}_{'sym' if zero_point == 'none' else 'asym'}"
    result = apply_pass(g, QuantizeWeights(bits=bits, block_size=block_size,
                                           zero_point=zero_point, include_lm_head=True,
                                           accuracy_level=0, embedding="lm_head"))
    assert result.counts == {rule: 1, f"lm_head_{rule}": 1, f"embedding_{rule}": 1}
    assert "aten.embedding" not in ops(g)
    lookup = next(n for n in g.nodes() if n.op == "arc.gather_nbits")
    head = g.outputs[0].producer
    assert head.op == "arc.matmul_nbits"
    assert lookup.inputs[1] is head.inputs[1] and lookup.inputs[2] is head.inputs[2]
    assert (zero_point == "int") == lookup.attrs["has_zero_points"]
    # the float table is gone
    assert not [c for c in g.constants() if c.dtype == torch.float32 and c.shape == (16, 576)]
    ref = run_graph(g, [X])[0]
    assert abs(run_onnx(g, tmp_path, X) - ref.numpy()).max() <= 1e-4
    want = _eager_with_table(model, quantize(model.emb.weight.data, bits, block_size,
                                             symmetric=zero_point == "none").dequantize())
    want.mid.weight = torch.nn.Parameter(quantize(model.mid.weight.data, bits, block_size,
                                                  symmetric=zero_point == "none").dequantize())
    assert (ref - want(X).detach()).abs().max() <= 1e-4
    assert (ref - model(X).detach()).abs().max() > 1e-4  # and it is quantized


def test_lookup_rows_equal_the_dequantized_table(tmp_path):
    # the lookup alone, through ORT: exactly the rows of dequant(table)
    class Lookup(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(1)
            self.emb = torch.nn.Embedding(16, 96)
            self.head = torch.nn.Linear(96, 16, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(self.emb(ids)), self.emb(ids) * 1.0

    model = Lookup().eval()
    g = cleanup(to_ir(model, TOKENS))
    apply_pass(g, QuantizeWeights(bits=4, block_size=64, zero_point="int", include_lm_head=True,
                                  accuracy_level=0, embedding="lm_head"))
    table = quantize(model.emb.weight.data, 4, 64, symmetric=False).dequantize()  # 1.5 blocks
    rows = run_graph(g, [X])[1]
    assert torch.equal(rows, table[X])
    lower_to_onnx(g, tmp_path)
    session = make_session(tmp_path / "model.onnx", optimize=False)
    got = session.run(None, {session.get_inputs()[0].name: X.numpy()})[1]
    assert abs(got - table[X].numpy()).max() <= 1e-6


def test_float_minimum_head_keeps_the_lookup_float():
    g = cleanup(to_ir(TiedWide().eval(), TOKENS))
    result = apply_pass(g, QuantizeWeights(bits=4, block_size=32, zero_point="float",
                                           include_lm_head=True, embedding="lm_head"))
    assert "aten.embedding" in ops(g) and "arc.gather_nbits" not in ops(g)
    assert any("kept the embedding" in n and "no lookup kernel" in n for n in result.notes)


def test_default_and_untied_tables_stay_float():
    g = cleanup(to_ir(TiedWide().eval(), TOKENS))
    apply_pass(g, QuantizeWeights(bits=4, block_size=32, include_lm_head=True))
    assert "aten.embedding" in ops(g)  # embedding="fp32", the pass's default
    with pytest.raises(ValueError, match="embedding must be one of fp32, lm_head"):
        QuantizeWeights(embedding="int4")


def test_optimize_embedding_option(tmp_path):
    report = arcompile.optimize(tm.llama(), tmp_path / "q", quantize="int4", quant_method="rtn",
                                zero_point="int", lm_head="int4", embedding="lm-head", log=None)
    q = report.quantization
    assert q["settings"]["embedding"] == "lm_head"
    record = next(r for r in report.passes if r.name == "quantize_weights")
    assert record.counts["embedding_int4_g32_asym"] == 1
    assert abs(q["perplexity_onnxruntime"] / q["perplexity"] - 1) <= 0.02
    assert len(arcompile.load(tmp_path / "q").generate([5, 17, 42], max_new_tokens=3)) == 3
    with pytest.raises(ArcompileError, match="--lm-head fp32 keeps the head in float"):
        arcompile.optimize(tm.llama(), tmp_path / "w", quantize="int4", lm_head="fp32",
                           embedding="lm-head", log=None)
    with pytest.raises(ArcompileError, match="embedding without quantize"):
        arcompile.optimize(tm.llama(), tmp_path / "w", embedding="lm-head", log=None)
    with pytest.raises(ArcompileError, match="--embedding applies to --quantize int8 or int4"):
        arcompile.optimize(tm.llama(), tmp_path / "w", quantize="w8a8", embedding="fp32",
                           log=None)
    assert not (tmp_path / "w").exists()
