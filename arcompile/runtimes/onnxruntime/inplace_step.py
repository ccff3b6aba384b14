"""The in-place cached step on ONNX Runtime (manifest ``kv_cache.runtime_cache == "inplace"``).

One [B, Hkv, capacity, D] buffer pair per layer is allocated when a decode starts
(``buffers``: capacity = the prompt plus the new tokens, at most the engine's max_context) and
bound, with I/O binding, both as the step's pasts and as its presents: GroupQueryAttention
writes the new rows at ``past_length`` .. ``past_length + T - 1`` into them, so nothing of the
cache is copied between steps. Only the logits come back to numpy.

The binding itself is kept from one step to the next while the logits' shape stays the same:
only the tokens, ``past_length`` and ``logits_to_keep`` are bound anew, and the logits land in
a preallocated array. Rebuilding the binding, its 2 x layers cache bindings and a fresh logits
output every step cost SmolLM2 about 0.3 ms of a 4 ms int4 step.

Everything a decode mutates belongs to that decode, not to the step (which one Engine shares
between the threads calling it): ``buffers`` returns a ``Buffers`` list that carries its own
bindings (one per step that binds it: a draft engine drafting into the same buffers has its
own session) and its own logits arrays. Concurrent decodes therefore never see each other's
cache, and run in parallel (ONNX Runtime's ``Run`` may be called from several threads); a
decode's bindings go when its buffers do. Sharing the binding on the step instead made 4
threads on one Engine decode wrong tokens or fail in ORT (issue 22).
"""

from __future__ import annotations

import numpy as np

from arcompile.errors import DecodeError

# logits rows up to which a step's output goes into a preallocated array (decode steps and
# speculative verification); more (a full prefill's logits) get a fresh array from ORT
PREALLOCATED_ROWS = 64
ORT_FLOATS = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
              "tensor(double)": np.float64}


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

    def buffers(self, batch: int, capacity: int, shapes: list, dtypes: list) -> "Buffers":
        """Zeroed [B, Hkv, capacity, D] OrtValues, one per past (each keeps its numpy array
        alive), for one decode; capacity is capped at max_context."""
        import onnxruntime as ort

        capacity = min(capacity, self.max_context)
        arrays = [np.zeros((batch, shape[1], capacity, *shape[3:]), dtype=dtype)
                  for shape, dtype in zip(shapes, dtypes)]
        return Buffers(ort.OrtValue.ortvalue_from_numpy(a) for a in arrays)

    def __call__(self, ids: np.ndarray, past_length: int, buffers: list,
                 keep: int = 0, extra: dict | None = None) -> tuple[np.ndarray, list]:
        """``extra``: more inputs by name (the layer-skip flags), bound as they are."""
        capacity = buffers[0].shape()[2]
        if past_length + ids.shape[1] > capacity:
            raise DecodeError(f"{past_length + ids.shape[1]} tokens exceed the cache capacity of "
                              f"{capacity} allocated for this decode (the engine's max_context "
                              f"is {self.max_context})")
        rows = ids.shape[1] if self.logits_to_keep is None or keep <= 0 else min(keep,
                                                                                ids.shape[1])
        io, logits = self._binding(buffers, (ids.shape[0], rows))
        io.bind_cpu_input(self.tokens, np.ascontiguousarray(ids, dtype=np.int64))
        io.bind_cpu_input(self.past_length, np.array(past_length, np.int64))
        if self.logits_to_keep is not None:
            io.bind_cpu_input(self.logits_to_keep, np.array(keep, np.int64))
        for name, value in {**self.defaults, **(extra or {})}.items():
            io.bind_cpu_input(name, value)
        self.session.run_with_iobinding(io)
        if logits is None:  # no preallocated array: the output ORT allocated
            return io.get_outputs()[0].numpy(), buffers
        return logits.copy(), buffers  # the array is the next step's output too

    def _binding(self, buffers: list, shape: tuple[int, int]):
        """(the I/O binding with ``buffers`` bound as pasts and presents, and a preallocated
        logits array [*shape, V] bound as its output, or None where the vocabulary size is
        not static or many rows are asked for: then ORT allocates the output). The binding is
        kept on ``buffers`` (a ``Buffers``; a plain list gets a new one every call); a new
        shape rebinds the output alone (speculative decoding alternates one-row drafting and
        k-row verifying steps)."""
        import onnxruntime as ort

        kept = buffers.bindings if isinstance(buffers, Buffers) else {}
        bound = kept.get(self)
        if bound is None:
            io = self.session.io_binding()
            io.bind_output(self.logits)  # first, so get_outputs()[0] is it (a rebind keeps it)
            for past, present, buf in zip(self.pasts, self.presents, buffers):
                io.bind_ortvalue_input(past, buf)
                io.bind_ortvalue_output(present, buf)
            bound = kept[self] = _Binding(io)
        if shape != bound.shape:
            out = self.session.get_outputs()[0]
            if isinstance(out.shape[-1], int) and shape[1] <= PREALLOCATED_ROWS:
                if shape not in bound.arrays:
                    bound.arrays[shape] = np.zeros(
                        (*shape, out.shape[-1]), dtype=ORT_FLOATS.get(out.type, np.float32))
                bound.io.bind_ortvalue_output(
                    self.logits, ort.OrtValue.ortvalue_from_numpy(bound.arrays[shape]))
            else:
                bound.io.bind_output(self.logits)
            bound.shape = shape
        return bound.io, bound.arrays.get(shape)


class Buffers(list):
    """One decode's cache buffers (OrtValues, one per past) and the I/O bindings that bind
    them, one per ``InplaceStep`` (the engine's, a draft engine's): state of the decode, so
    that threads sharing an Engine never share it."""

    def __init__(self, values=()):
        super().__init__(values)
        self.bindings: dict[InplaceStep, _Binding] = {}


class _Binding:
    """A kept I/O binding: the binding, its logits arrays by [B, rows], the shape bound."""

    def __init__(self, io):
        self.io, self.arrays, self.shape = io, {}, None
