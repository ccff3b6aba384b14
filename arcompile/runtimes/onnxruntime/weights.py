"""Writing weights as ONNX external data, one tensor at a time.

A real model's weights (SmolLM2: 540 MB in fp32) must not be copied into protobufs: each
tensor's bytes go straight from the torch tensor (a contiguous view, no copy when it already
is contiguous) into the data file, and its TensorProto only records location, offset and
length. Offsets are aligned so ORT can memory-map the file and kernels get aligned data.
Tensors of a few elements stay inline: an external reference would cost more than they do.
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
            nbytes = t.numel() * t.element_size()
            if nbytes <= INLINE_MAX_BYTES:
                raw = tensor_bytes(t).tobytes() if nbytes else b""
                protos.append(helper.make_tensor(name, onnx_type(t.dtype), dims, raw, raw=True))
                continue
            align = PAGE if nbytes >= PAGE else ALIGN
            pad = -offset % align
            if pad:
                f.write(b"\0" * pad)
                offset += pad
            f.write(tensor_bytes(t))
            protos.append(external_tensor(name, t, location, offset, nbytes))
            offset += nbytes
    return protos


def external_tensor(name: str, t: torch.Tensor, location: str, offset: int,
                    length: int) -> TensorProto:
    """A TensorProto that points at ``length`` bytes at ``offset`` in ``location``."""
    proto = TensorProto(name=name, data_type=onnx_type(t.dtype), dims=list(t.shape))
    proto.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        entry = proto.external_data.add()
        entry.key, entry.value = key, str(value)
    return proto
