"""TorchScript archive (``torch.jit.trace(model, tokens).save("model.pt")``) -> ExportedProgram.

``torch.jit.load`` is safe to point at a file in the way ``torch.load`` is not: its data.pkl
goes through torch's restricted C++ unpickler (TorchScript types only) and its code is
TorchScript, compiled by torch, not Python. The converted program is then re-exported from its
``.module()`` so that B and T become dynamic; a trace that baked its example's sizes into the
graph cannot be, and that is said plainly.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import torch
from torch.export import Dim, ExportedProgram

from arcompile.errors import ModelLoadError, first_line
from arcompile.frontend.export import example_tokens

RETRACE = ("trace it with torch.export instead: torch.export.save(torch.export.export(model, "
           "(tokens,), dynamic_shapes=({0: Dim.DYNAMIC, 1: Dim.DYNAMIC},)), 'model.pt2')")


def load_torchscript(path: Path, example_inputs: tuple | None,
                     log: Callable[[str], None]) -> ExportedProgram:
    """Convert a TorchScript archive into a tokens -> logits program with dynamic B and T."""
    try:
        ts = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # torch.jit.load raises RuntimeError for most damage, others too
        raise ModelLoadError(f"{path.name}: torch.jit.load could not read the TorchScript "
                             f"archive: {first_line(e)}") from e
    ts.eval()
    if example_inputs is None:
        vocab = embedding_rows(ts)
        if vocab is None:
            raise ModelLoadError(f"{path.name}: the TorchScript archive has no embedding to take "
                                 "the vocab size from; pass example_inputs=(tokens,)")
        example_inputs = (example_tokens(vocab),)
    log(f"converting TorchScript {path.name} to torch.export ...")
    from torch._export.converter import TS2EPConverter

    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            converted = TS2EPConverter(ts, tuple(example_inputs)).convert()
    except Exception as e:  # the converter raises many types for unsupported TorchScript
        raise ModelLoadError(f"{path.name}: could not convert the TorchScript program at input "
                             f"shape {_shapes(example_inputs)} (a trace can hard-code its "
                             f"example's shapes): {first_line(e)}; {RETRACE}") from e
    log("exporting with dynamic batch and sequence dims ...")
    dynamic = ({0: Dim.DYNAMIC, 1: Dim.DYNAMIC},) + (None,) * (len(example_inputs) - 1)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(converted.module(), tuple(example_inputs),
                                       dynamic_shapes=dynamic, strict=False)
    except Exception as e:  # torch raises many unrelated types here
        raise ModelLoadError(f"{path.name}: the TorchScript program does not work for other "
                             "batch or sequence sizes (the trace hard-coded its example's "
                             f"shapes): {first_line(e)}; {RETRACE}") from e


def embedding_rows(ts: torch.jit.ScriptModule) -> int | None:
    """Rows of the weight the first ``aten::embedding`` in the graph reads: the vocab size."""
    tensors = dict(ts.named_parameters())
    tensors.update(dict(ts.named_buffers()))
    try:
        graph = ts.inlined_graph
    except Exception:  # scripted modules with several methods may not inline; use names then
        graph = None
    for node in graph.nodes() if graph is not None else ():
        if node.kind() == "aten::embedding":
            weight = tensors.get(_attribute_path(next(node.inputs())))
            if weight is not None and weight.dim() == 2:
                return int(weight.shape[0])
    # fall back on names, e.g. transformer.wte.weight or embed_tokens.weight
    for name, t in tensors.items():
        if t.dim() == 2 and any(k in name for k in ("embed", "wte", "tok")):
            return int(t.shape[0])
    return None


def _attribute_path(value: torch._C.Value) -> str:
    """``model.transformer.wte.weight`` for a value read by a chain of prim::GetAttr."""
    names = []
    node = value.node()
    while node.kind() == "prim::GetAttr":
        names.append(node.s("name"))
        node = next(node.inputs()).node()
    return ".".join(reversed(names))


def _shapes(inputs: tuple) -> str:
    return ", ".join(str(list(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__
                     for x in inputs)
