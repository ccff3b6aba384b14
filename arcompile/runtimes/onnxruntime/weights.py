"""Writing weights as ONNX external data, one tensor at a time.

A real model's weights (SmolLM2: 540 MB in fp32) must not be copied into protobufs: each
tensor's bytes go straight from the torch tensor (a contiguous view, no copy when it already
is contiguous) into the data file, and its TensorProto only records location, offset and
length. Offsets are aligned so ORT can memory-map the file and kernels get aligned data.
Tensors of a few elements stay inline: an external reference would cost more than they do.
Two stand-ins take a tensor's place where no torch tensor has the bytes as written:
``ConcatParts`` (a concatenation streamed part by part) and ``Nibbles`` (ONNX's 4-bit types,
which torch has no dtype for).
"""

from __future__ import annotations

from pathlib import Path

import torch
from onnx import TensorProto, helper

from arcompile.runtimes.onnxruntime.dtypes import onnx_type

INLINE_MAX_BYTES = 64
PAGE = 4096  # offsets of tensors of a page or more start on a page
ALIGN = 64  # smaller ones on a cache line


def tensor_bytes(t: torch.Tensor):
    """The tensor's bytes as a flat uint8 numpy view (a copy only if it is not contiguous)."""
    flat = t.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy()


def write_weights(weights: dict[str, torch.Tensor], data_path: Path) -> list[TensorProto]:
    """Write ``weights`` (ONNX name -> tensor) to ``data_path``; return their TensorProtos."""
    protos: list[TensorProto] = []
    location = data_path.name  # relative to the model file, which sits beside it
    offset = 0
    with open(data_path, "wb") as f:
        for name, t in weights.items():
            dims = list(t.shape)
            nbytes = _nbytes(t)
            if nbytes <= INLINE_MAX_BYTES:
                if isinstance(t, ConcatParts):
                    t = t.materialize()
                raw = tensor_bytes(t.packed if isinstance(t, Nibbles) else t).tobytes()
                protos.append(helper.make_tensor(name, _element_type(t), dims, raw, raw=True))
                continue
            align = PAGE if nbytes >= PAGE else ALIGN
            pad = -offset % align
            if pad:
                f.write(b"\0" * pad)
                offset += pad
            if isinstance(t, (ConcatParts, Nibbles)):
                t.write(f)
            else:
                f.write(tensor_bytes(t))
            protos.append(external_tensor(name, t, location, offset, nbytes))
            offset += nbytes
    return protos


def external_tensor(name: str, t: torch.Tensor, location: str, offset: int,
                    length: int) -> TensorProto:
    """A TensorProto that points at ``length`` bytes at ``offset`` in ``location``."""
    proto = TensorProto(name=name, data_type=_element_type(t), dims=list(t.shape))
    proto.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        entry = proto.external_data.add()
        entry.key, entry.value = key, str(value)
    return proto


def _nbytes(t) -> int:
    return t.nbytes if isinstance(t, Nibbles) else t.numel() * t.element_size()


def _element_type(t) -> int:
    return t.element_type if isinstance(t, Nibbles) else onnx_type(t.dtype)


class Nibbles:
    """An ONNX INT4 / UINT4 tensor of logical ``shape``: its elements in row-major order,
    two to a byte, the first in the low nibble (ONNX's layout; ``packed`` uint8 holds them,
    the last byte's high nibble zero when the count is odd). Stands in for a tensor in
    ``LowerContext.weights``: the TensorProto gets ``shape`` and the 4-bit type, the data
    file ``packed``'s bytes."""

    def __init__(self, packed: torch.Tensor, shape: tuple[int, ...], signed: bool):
        self.shape = torch.Size(shape)
        if packed.dtype != torch.uint8 or packed.numel() != -(-self.shape.numel() // 2):
            raise ValueError(f"{packed.numel()} {packed.dtype} bytes do not hold a 4-bit "
                             f"tensor of shape {tuple(shape)}")
        self.packed = packed.reshape(-1)
        self.element_type = TensorProto.INT4 if signed else TensorProto.UINT4
        self.nbytes = self.packed.numel()

    def write(self, f) -> None:
        f.write(tensor_bytes(self.packed))


class ConcatParts:
    """Tensors concatenated along ``dim``, written as ONE initializer without ever holding the
    whole concatenation: parts along dim 0 go to the file one after another; along a later dim
    the rows are interleaved a block at a time (at most ``BLOCK_BYTES`` held at once).

    Stands in for a tensor in ``LowerContext.weights`` (shape, dtype, numel, element_size);
    merged Q/K/V and gate/up weights (``arc.concat_weights``, ``arc.gated_mlp``) use it.
    """

    BLOCK_BYTES = 8 << 20

    def __init__(self, parts: list[torch.Tensor], dim: int):
        first = parts[0]
        self.dim = dim % first.dim()
        self.parts = list(parts)
        shape = list(first.shape)
        shape[self.dim] = sum(p.shape[self.dim] for p in parts)
        self.shape = torch.Size(shape)
        self.dtype = first.dtype
        for p in parts:
            same = list(p.shape)
            same[self.dim] = shape[self.dim]
            if same != shape or p.dtype != self.dtype:
                raise ValueError(f"cannot concatenate {tuple(p.shape)} {p.dtype} with "
                                 f"{tuple(first.shape)} {first.dtype} along dim {dim}")

    def numel(self) -> int:
        return self.shape.numel()

    def element_size(self) -> int:
        return self.parts[0].element_size()

    def materialize(self) -> torch.Tensor:
        return torch.cat(self.parts, dim=self.dim)

    def write(self, f) -> None:
        if all(s == 1 for s in self.shape[:self.dim]):  # the parts' bytes simply follow on
            for p in self.parts:
                f.write(tensor_bytes(p))
            return
        outer = self.shape[:self.dim].numel()
        rows = [p.reshape(outer, -1) for p in self.parts]  # a view for weights (2-D, dim 1)
        row_bytes = max(self.numel() // outer * self.element_size(), 1)
        step = max(1, self.BLOCK_BYTES // row_bytes)
        for start in range(0, outer, step):
            block = torch.cat([r[start:start + step] for r in rows], dim=1)
            f.write(tensor_bytes(block))
