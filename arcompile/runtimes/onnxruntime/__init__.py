"""The ONNX Runtime backend: lower an IR graph to ONNX (weights as external data) and run it.

    io = lower_to_onnx(graph, Path("out"))          # out/model.onnx + out/model.onnx.data
    sess = make_session("out/model.onnx")
    logits, = sess.run(None, {"input_ids": tokens})

The lowering is a table (``registry.py``) filled by the ``ops_*.py`` files, one per category.
"""

from arcompile.runtimes.onnxruntime.lower import OPSET, check_supported, lower_to_onnx
from arcompile.runtimes.onnxruntime.registry import lowering, supported_ops
from arcompile.runtimes.onnxruntime.session import make_session

__all__ = ["lower_to_onnx", "make_session", "supported_ops", "lowering", "check_supported", "OPSET"]
