"""Perplexity of each benchmarked system on the same held-out text, so speed and accuracy are
read side by side.

The text is the one the quantization gate uses (``arcompile.eval.metrics.held_ids``: 512
tokens of the held-out region of ``pydoc_data.topics``), scored as one teacher-forced
forward pass of each system: arcompile's engines through ``Engine.logits``, transformers
eager in this process, llama.cpp in its worker (``llamacpp_decode.py``'s ``score``), and ONNX
Runtime GenAI's model-builder output, a plain ONNX file, here with ONNX Runtime directly, fed
the text with an empty cache as GenAI itself would run a prefill.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def genai_logits(model_dir: str | Path, ids: list[int], threads: int) -> np.ndarray:
    """[T, V] logits of ``ids`` from a model-builder folder: ``model.onnx`` (inputs
    ``input_ids``, ``attention_mask`` and ``past_key_values.N.key|value`` [B, Hkv, P, D], D
    symbolic in the file) and ``genai_config.json`` (which gives D and Hkv)."""
    import json

    import onnxruntime as ort

    decoder = json.loads((Path(model_dir) / "genai_config.json").read_text())["model"]["decoder"]

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(str(Path(model_dir) / "model.onnx"), sess_options=options,
                                   providers=["CPUExecutionProvider"])
    feeds = {"input_ids": np.array([ids], np.int64),
             "attention_mask": np.ones((1, len(ids)), np.int64)}
    for spec in session.get_inputs():
        if spec.name.startswith("past_key_values."):
            feeds[spec.name] = np.zeros(
                (1, decoder["num_key_value_heads"], 0, decoder["head_size"]), np.float32)
    return session.run(["logits"], feeds)[0][0]
