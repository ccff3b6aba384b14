"""The in-place cached step on ONNX Runtime (manifest ``kv_cache.runtime_cache == "inplace"``).

One [B, Hkv, MAX, D] buffer pair per layer is allocated at prefill (``buffers``) and bound, with
I/O binding, both as the step's pasts and as its presents: GroupQueryAttention writes the new
rows at ``past_length`` .. ``past_length + T - 1`` into them, so nothing of the cache is copied
between steps. Only the logits come back to numpy.
"""

from __future__ import annotations

import numpy as np

from arcompile.errors import DecodeError


class InplaceStep:
    """``step(tokens [B, T], past_length, buffers) -> (logits [B, T, V], buffers)``."""

    def __init__(self, session, tokens: str, past_length: str, logits: str,
                 pasts: list[str], presents: list[str], max_context: int):
        self.session, self.tokens, self.past_length = session, tokens, past_length
        self.logits = logits
        self.pasts, self.presents, self.max_context = pasts, presents, max_context

    def buffers(self, batch: int, shapes: list, dtypes: list) -> list:
        """Zeroed [B, Hkv, MAX, D] OrtValues, one per past (each keeps its numpy array alive)."""
        import onnxruntime as ort

        arrays = [np.zeros((batch, shape[1], self.max_context, *shape[3:]), dtype=dtype)
                  for shape, dtype in zip(shapes, dtypes)]
        return [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]

    def __call__(self, ids: np.ndarray, past_length: int, buffers: list) -> tuple[np.ndarray, list]:
        if past_length + ids.shape[1] > self.max_context:
            raise DecodeError(f"{past_length + ids.shape[1]} tokens exceed the engine's cache "
                              f"capacity (max_context) of {self.max_context}")
        io = self.session.io_binding()
        io.bind_cpu_input(self.tokens, np.ascontiguousarray(ids, dtype=np.int64))
        io.bind_cpu_input(self.past_length, np.array(past_length, np.int64))
        io.bind_output(self.logits)  # bound first: get_outputs()[0]
        for past, present, buf in zip(self.pasts, self.presents, buffers):
            io.bind_ortvalue_input(past, buf)
            io.bind_ortvalue_output(present, buf)
        self.session.run_with_iobinding(io)
        return io.get_outputs()[0].numpy(), buffers
