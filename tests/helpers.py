"""Small helpers the tests share: export a module to IR, lower and run it in ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from arcompile.frontend.export import export_module
from arcompile.frontend.from_export import from_exported_program
from arcompile.ir.graph import Graph


def to_ir(module: torch.nn.Module, example: torch.Tensor, name: str = "test") -> Graph:
    return from_exported_program(export_module(module, example_inputs=(example,)), name)


def run_onnx(graph: Graph, folder: Path, tokens: torch.Tensor) -> np.ndarray:
    """Lower ``graph`` and run it with ONNX Runtime's own graph optimizations switched off."""
    from arcompile.runtimes.onnxruntime.lower import lower_to_onnx
    from arcompile.runtimes.onnxruntime.session import make_session

    folder.mkdir(parents=True, exist_ok=True)
    lower_to_onnx(graph, folder)
    session = make_session(folder / "model.onnx", optimize=False)
    return session.run(None, {session.get_inputs()[0].name: tokens.numpy()})[0]


def ops(graph: Graph) -> list[str]:
    """Op names in graph order, without inputs and constants."""
    return [n.op for n in graph.nodes() if n.op not in ("arc.input", "arc.constant")]


def cleanup(graph: Graph, dce: bool = False) -> Graph:
    """The passes every fusion runs after (remove_noops, constant_folding, cse; dce if asked)."""
    from arcompile.passes import PassManager, build_pipeline

    PassManager(build_pipeline(["remove_noops", "constant_folding", "cse"] +
                               (["dce"] if dce else []))).run(graph)
    return graph


def apply_pass(graph: Graph, p):
    """Run one pass, clear what it disconnected, check the graph; the pass's result."""
    from arcompile.ir import verify
    from arcompile.passes.dce import DeadCodeElimination

    result = p.run(graph)
    DeadCodeElimination().run(graph)
    verify(graph)
    return result
