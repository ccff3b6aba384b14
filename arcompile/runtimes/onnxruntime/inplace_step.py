"""The in-place cached step on ONNX Runtime (manifest ``kv_cache.runtime_cache == "inplace"``).

One [B, Hkv, capacity, D] buffer pair per layer is allocated when a decode starts
(``buffers``: capacity = the prompt plus the new tokens, at most the engine's max_context) and
bound, with I/O binding, both as the step's pasts and as its presents: GroupQueryAttention
writes the new rows at ``past_length`` .. ``past_length + T - 1`` into them, so nothing of the
cache is copied between steps. Only the logits come back to numpy.
"""

from __future__ import annotations

import numpy as np

from arcompile.errors import DecodeError


class InplaceStep:
    """``step(tokens [B, T], past_length, buffers, keep=0) -> (logits [B, T or keep, V],
    buffers)``; ``keep`` feeds the graph's ``logits_to_keep`` input when it has one."""

    def __init__(self, session, tokens: str, past_length: str, logits: str,
                 pasts: list[str], presents: list[str], max_context: int,
                 logits_to_keep: str | None = None, defaults: dict | None = None):
        self.session, self.tokens, self.past_length = session, tokens, past_length
        self.logits, self.logits_to_keep = logits, logits_to_keep
        self.pasts, self.presents, self.max_context = pasts, presents, max_context
        # more inputs the graph takes (the layer-skip flags), bound when a call does not
        self.defaults = dict(defaults or {})

    def buffers(self, batch: int, capacity: int, shapes: list, dtypes: list) -> list:
        """Zeroed [B, Hkv, capacity, D] OrtValues, one per past (each keeps its numpy array
        alive); capacity is capped at max_context."""
        import onnxruntime as ort

        capacity = min(capacity, self.max_context)
        arrays = [np.zeros((batch, shape[1], capacity, *shape[3:]), dtype=dtype)
                  for shape, dtype in zip(shapes, dtypes)]
        return [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]

    def __call__(self, ids: np.ndarray, past_length: int, buffers: list,
                 keep: int = 0, extra: dict | None = None) -> tuple[np.ndarray, list]:
        """``extra``: more inputs by name (the layer-skip flags), bound as they are."""
        capacity = buffers[0].shape()[2]
        if past_length + ids.shape[1] > capacity:
            raise DecodeError(f"{past_length + ids.shape[1]} tokens exceed the cache capacity of "
                              f"{capacity} allocated for this decode (the engine's max_context "
                              f"is {self.max_context})")
        io = self.session.io_binding()
        io.bind_cpu_input(self.tokens, np.ascontiguousarray(ids, dtype=np.int64))
        io.bind_cpu_input(self.past_length, np.array(past_length, np.int64))
        if self.logits_to_keep is not None:
            io.bind_cpu_input(self.logits_to_keep, np.array(keep, np.int64))
        for name, value in {**self.defaults, **(extra or {})}.items():
            io.bind_cpu_input(name, value)
        io.bind_output(self.logits)  # bound first: get_outputs()[0]
        for past, present, buf in zip(self.pasts, self.presents, buffers):
            io.bind_ortvalue_input(past, buf)
            io.bind_ortvalue_output(present, buf)
        self.session.run_with_iobinding(io)
        return io.get_outputs()[0].numpy(), buffers
