"""The QDQ form of the weight-quantized linear (runtimes/onnxruntime/ops_arc_quant_qdq.py):
DequantizeLinear -> MatMul in standard ONNX, chosen with graph.meta["onnxruntime.weight_lowering"].
Golden (the ONNX it writes), numbers (ORT with optimizations off == the interpreter at accuracy
level 0; on, == the MatMulNBits form, which ORT fuses it back into) and negatives."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from helpers import apply_pass, cleanup, run_onnx, to_ir
from test_quantize_weights import TOKENS, Wide, X, _fused
from tiny_models import llama

from arcompile.errors import UnsupportedOpError
from arcompile.ir import run_graph
from arcompile.passes.quantize_weights import QuantizeWeights
from arcompile.runtimes.onnxruntime.lower import lower_to_onnx
from arcompile.runtimes.onnxruntime.ops_arc_quant_qdq import tensorrt_form_issues
from arcompile.runtimes.onnxruntime.session import make_session

META = "onnxruntime.weight_lowering"


class WideSilu(Wide):
    """Wide with SiLU between its linears: ORT leaves a DequantizeLinear -> MatMul whose
    output goes through Relu unfused (module docstring), a SwiGLU model's never does."""

    def forward(self, ids):
        return self.out(torch.nn.functional.silu(self.proj(self.emb(ids))))


def _quantized(setting: dict, builder=None):
    g = (_fused(builder)[1] if builder is not None else
         cleanup(to_ir(WideSilu().eval(), TOKENS)))
    apply_pass(g, QuantizeWeights(include_lm_head=True, **setting))
    return g


def _onnx(g, folder):
    lower_to_onnx(g, folder)
    return onnx.load(str(folder / "model.onnx"), load_external_data=False)


def _run(g, folder, optimize):
    folder.mkdir(parents=True, exist_ok=True)
    lower_to_onnx(g, folder)
    session = make_session(folder / "model.onnx", optimize=optimize)
    return session.run(None, {session.get_inputs()[0].name: X.numpy()})[0]


def _ort_ops(folder) -> list[str]:
    """The ops of ``folder``'s model after ONNX Runtime's graph optimizations."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(folder / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(folder / "optimized.onnx"),
                                         load_external_data=False).graph.node]


# -- golden ---------------------------------------------------------------------------------
def test_qdq_golden_signed_int4_blocks_without_zero_points(tmp_path):
    g = _quantized(dict(bits=4, block_size=64, zero_point="none"))
    g.meta[META] = "qdq"
    m = _onnx(g, tmp_path)
    types = [n.op_type for n in m.graph.node]
    assert "MatMulNBits" not in types and all(n.domain in ("", "ai.onnx") for n in m.graph.node)
    dqs = [n for n in m.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dqs) == 2 and all(len(n.input) == 2 for n in dqs)  # no zero-point input
    inits = {t.name: t for t in m.graph.initializer}
    proj = next(n for n in dqs if list(inits[n.input[0]].dims) == [576, 96])
    assert {a.name: a.i for a in proj.attribute} == {"axis": 0, "block_size": 64}
    assert inits[proj.input[0]].data_type == onnx.TensorProto.INT4
    assert list(inits[proj.input[1]].dims) == [9, 96]  # 576 = 9 blocks of 64
    consumer = next(n for n in m.graph.node if proj.output[0] in n.input)
    assert consumer.op_type == "MatMul"
    # the data file holds the codes at half a byte each, not the float weights
    codes = (576 * 96 + 96 * 16) // 2
    assert codes <= (tmp_path / "model.onnx.data").stat().st_size < codes + 4 * 576 * 16 + 8192
    assert tensorrt_form_issues(g) == []


def test_qdq_golden_zero_points_and_per_channel_int8(tmp_path):
    g = _quantized(dict(bits=4, block_size=128, zero_point="int"))
    g.meta[META] = "qdq"
    m = _onnx(g, tmp_path / "int4")
    inits = {t.name: t for t in m.graph.initializer}
    proj = next(n for n in m.graph.node if n.op_type == "DequantizeLinear"
                and list(inits[n.input[0]].dims) == [576, 96])
    assert [inits[i].data_type for i in proj.input] == [
        onnx.TensorProto.UINT4, onnx.TensorProto.FLOAT, onnx.TensorProto.UINT4]
    assert list(inits[proj.input[2]].dims) == [5, 96]  # 4.5 blocks of 128: ceil
    assert tensorrt_form_issues(g) == [
        "integer zero points (TensorRT dequantizes with zero points of 0 only: "
        "--zero-point none)"]  # the head's too: not the head's alone
    # one block across K (576 in a block of 1024): int8 per channel, the per-axis form
    g = _quantized(dict(bits=8, block_size=1024, zero_point="none"))
    g.meta[META] = "qdq"
    m = _onnx(g, tmp_path / "int8")
    inits = {t.name: t for t in m.graph.initializer}
    for dq in (n for n in m.graph.node if n.op_type == "DequantizeLinear"):
        assert {a.name: a.i for a in dq.attribute} == {"axis": 1}
        assert inits[dq.input[0]].data_type == onnx.TensorProto.INT8
        assert len(inits[dq.input[1]].dims) == 1
    assert tensorrt_form_issues(g) == []
    g = _quantized(dict(bits=8, block_size=32, zero_point="none"))
    assert tensorrt_form_issues(g) == [
        "int8 weights in blocks (TensorRT documents int8 weights per channel: one block "
        "across K)"]
    g = cleanup(to_ir(WideSilu().eval(), TOKENS))  # int4 body, an int8 head in blocks
    apply_pass(g, QuantizeWeights(bits=4, block_size=32, zero_point="none",
                                  include_lm_head=True, lm_head_bits=8))
    assert tensorrt_form_issues(g)[0].endswith("the LM head takes its own format: "
                                               "--lm-head int4 or fp32)")


# -- numbers --------------------------------------------------------------------------------
SETTINGS = [dict(bits=4, block_size=32, zero_point="none"),
            dict(bits=4, block_size=128, zero_point="int"),
            dict(bits=4, block_size=64, zero_point="float"),
            dict(bits=8, block_size=32, zero_point="int"),
            dict(bits=8, block_size=1024, zero_point="none")]


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "-".join(map(str, s.values())))
def test_qdq_numbers_576_wide(tmp_path, setting):
    g = _quantized(dict(setting, accuracy_level=0))
    ref = run_graph(g, [X])[0].numpy()
    g.meta[META] = "qdq"
    # optimizations off: ORT dequantizes and multiplies in float, the IR op at level 0
    assert abs(_run(g, tmp_path / "off", optimize=False) - ref).max() <= 1e-4
    # on, at level 4 like the pass's default: ORT fuses it into the MatMulNBits form's kernel
    g = _quantized(setting)
    nbits = _run(g, tmp_path / "nbits", optimize=True)
    g.meta[META] = "qdq"
    qdq = _run(g, tmp_path / "qdq", optimize=True)
    assert _ort_ops(tmp_path / "qdq").count("MatMulNBits") == 2
    assert "DequantizeLinear" not in _ort_ops(tmp_path / "qdq")
    if setting["block_size"] < 576:  # the same kernel: the same logits
        assert abs(qdq - nbits).max() <= 1e-6
        assert abs(qdq - run_graph(g, [X])[0].numpy()).max() <= 1e-6
    else:  # int8 per channel: fused with activations rounded per 32, not across K
        assert 1e-5 < abs(qdq - nbits).max() <= 2e-2 * abs(ref).max()
        assert abs(qdq - ref).max() < abs(nbits - ref).max()  # finer: nearer to float


def test_qdq_numbers_whole_model_with_a_tied_head(tmp_path):
    g = _quantized(dict(bits=4, block_size=32, zero_point="none", accuracy_level=0), llama)
    g.meta[META] = "qdq"
    ref = run_graph(g, [X])[0].numpy()
    assert abs(run_onnx(g, tmp_path, X) - ref).max() <= 1e-4


def test_qdq_empty_block_gets_a_positive_scale(tmp_path):
    model = Wide().eval()
    with torch.no_grad():
        model.proj.weight[:, 64:128] = 0  # a whole block of zeros in every row
    g = cleanup(to_ir(model, TOKENS))
    apply_pass(g, QuantizeWeights(bits=4, block_size=64, zero_point="none", accuracy_level=0,
                                  include_lm_head=True))
    ref = run_graph(g, [X])[0].numpy()
    g.meta[META] = "qdq"
    m = _onnx(g, tmp_path)
    from onnx import numpy_helper

    scales = [numpy_helper.to_array(t, base_dir=str(tmp_path)) for t in
              onnx.load(str(tmp_path / "model.onnx")).graph.initializer if t.name.endswith(
                  ".scales")]
    assert scales and all((s > 0).all() for s in scales)
    assert any(n.op_type == "DequantizeLinear" for n in m.graph.node)
    assert abs(run_onnx(g, tmp_path / "run", X) - ref).max() <= 1e-4


# -- negatives ------------------------------------------------------------------------------
def test_qdq_refuses_the_quantized_embedding_lookup_and_unknown_forms(tmp_path):
    _, g = _fused(llama)
    apply_pass(g, QuantizeWeights(bits=4, block_size=32, zero_point="none",
                                  include_lm_head=True, embedding="lm_head"))
    assert any(n.op == "arc.gather_nbits" for n in g.nodes())
    assert any("GatherBlockQuantized" in line for line in tensorrt_form_issues(g))
    g.meta[META] = "qdq"
    with pytest.raises(UnsupportedOpError, match="no QDQ form.*--embedding fp32"):
        lower_to_onnx(g, tmp_path / "qdq")
    g.meta[META] = "fp8"
    with pytest.raises(UnsupportedOpError, match="'fp8'; expected one of"):
        lower_to_onnx(g, tmp_path / "fp8")
    assert not np.any([p.exists() for p in (tmp_path / "qdq" / "model.onnx",
                                            tmp_path / "fp8" / "model.onnx")])
