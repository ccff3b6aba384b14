"""How IR dtypes map to ONNX element types and to the names manifests use.

Symbolic scalars follow one convention everywhere in this backend: a ``symint`` is an int64
tensor of shape [1], a ``symfloat`` a double [1] and a ``symbool`` a bool [1]. Shape [1]
rather than [] because sizes are mostly spliced into shape vectors (Concat, Slice starts);
lowerings that need a true scalar squeeze it (``LowerContext.tensor``).
"""

from __future__ import annotations

from typing import Any

import torch
from onnx import TensorProto

from arcompile.errors import UnsupportedOpError
from arcompile.ir.graph import SYM_BOOL, SYM_FLOAT, SYM_INT

_ONNX_TYPES = {
    torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16,
    torch.bfloat16: TensorProto.BFLOAT16, torch.float64: TensorProto.DOUBLE,
    torch.int64: TensorProto.INT64, torch.int32: TensorProto.INT32,
    torch.int16: TensorProto.INT16, torch.int8: TensorProto.INT8, torch.uint8: TensorProto.UINT8,
    torch.bool: TensorProto.BOOL,
}

# The torch dtype that carries each symbolic scalar kind (see the module docstring).
SYM_TORCH = {SYM_INT: torch.int64, SYM_FLOAT: torch.float64, SYM_BOOL: torch.bool}


def torch_dtype(dtype: Any) -> torch.dtype:
    """The tensor dtype of an IR dtype (symbolic kinds map to their carrier dtype)."""
    return SYM_TORCH.get(dtype, dtype)


def onnx_type(dtype: Any) -> int:
    try:
        return _ONNX_TYPES[torch_dtype(dtype)]
    except KeyError:
        raise UnsupportedOpError(f"dtype {dtype} has no ONNX element type in this "
                                 "backend") from None


def dtype_name(dtype: Any) -> str:
    """``torch.int64`` -> ``"int64"``, as the engine manifest writes dtypes."""
    return str(torch_dtype(dtype)).removeprefix("torch.")


def is_float(dtype: Any) -> bool:
    return torch_dtype(dtype).is_floating_point


# ONNX Runtime's type strings for the names manifests use (engine.py checks one against the other)
ONNX_DTYPE_NAMES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
    "tensor(double)": "float64", "tensor(int64)": "int64", "tensor(int32)": "int32",
    "tensor(int16)": "int16", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}
