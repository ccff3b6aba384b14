"""Load a model from whatever the user has, as a torch.export program tokens -> logits.

``load_model`` accepts a path (torch.export archive, TorchScript archive, Hugging Face folder,
GGUF file; the kind is read from the content, see detect.py), an ``nn.Module`` or an
``ExportedProgram``. It never runs code from a file: full pickles are refused with the class
they name, and export archives are vetted before torch reads them (safe_export.py). Every
program that comes back meets the contract in contract.py (int64 [B, T] -> float [B, T, V],
B and T dynamic) and holds only nodes the IR converter reads.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch.export import ExportedProgram

from arcompile import progress
from arcompile.errors import ModelLoadError
from arcompile.frontend.contract import check_contract, normalize
from arcompile.frontend.detect import Sniffed, sniff
from arcompile.frontend.export import LogitsOnly, export_module
from arcompile.frontend.huggingface import (
    find_smollm2_gguf,
    hf_config,
    load_gguf,
    load_hf_folder,
)
from arcompile.frontend.pickle_scan import refusal
from arcompile.frontend.safe_export import load_export_archive
from arcompile.frontend.torchscript import load_torchscript
from arcompile.hashing import sha256_source

__all__ = ["LoadedModel", "load_model", "find_smollm2_gguf"]

CONFIG_KEYS = ("vocab_size", "eos_token_id", "bos_token_id", "max_position_embeddings",
               "model_type", "name")


@dataclass
class LoadedModel:
    """A program that maps tokens [B, T] to logits [B, T, V] (B, T dynamic), and what is known
    about where it came from. ``config`` always has the keys in CONFIG_KEYS, None if unknown."""

    program: ExportedProgram
    source: str  # the path, or "<nn.Module>" / "<ExportedProgram>"
    source_kind: str  # "torch.export" | "torchscript" | "huggingface" | "gguf" | "module"
    source_sha256: str | None  # of the file; of a folder's files (arcompile/hashing.py); None in memory
    tokenizer: Any | None = None  # a transformers tokenizer when the source had one
    config: dict = field(default_factory=dict)
    # the eager tokens -> logits module that was exported (HF folder, GGUF, nn.Module), the
    # reference for numeric checks; None for archives, which hold no eager code
    module: torch.nn.Module | None = None


def load_model(source: Any, example_inputs: tuple | None = None,
               log: Callable[[str], None] = print) -> LoadedModel:
    """Load ``source`` (path, nn.Module or ExportedProgram) as a tokens -> logits program.

    ``example_inputs`` are used to export an nn.Module or convert a TorchScript archive when the
    vocab size cannot be read from it. ``log`` gets one line before each slow step.
    Raises ModelLoadError (UnsafeModelError for files that would run code) with one line.
    """
    if isinstance(source, ExportedProgram):
        return _finish(source, "<ExportedProgram>", "torch.export", None, None, {}, None, log)
    if isinstance(source, torch.nn.Module):
        return _from_module(source, example_inputs, log)
    if isinstance(source, (str, os.PathLike)):
        return _from_path(Path(source), example_inputs, log)
    raise ModelLoadError(f"cannot load a {type(source).__name__}: pass a path, an nn.Module or "
                         "a torch.export ExportedProgram")


def _from_path(path: Path, example_inputs: tuple | None, log) -> LoadedModel:
    sniffed = sniff(path)
    tokenizer, config, module = None, {}, None
    if sniffed.kind == "pickle":
        raise _pickle_refusal(path, sniffed)
    if sniffed.kind == "torch.export":
        with progress.step(f"loading {path.name}"):
            program = load_export_archive(path, sniffed.root)
        config["name"] = path.stem
    elif sniffed.kind == "torchscript":
        with progress.step(f"converting {path.name} (TorchScript) with torch.export"):
            program = load_torchscript(path, example_inputs, log)
        config["name"] = path.stem
    elif sniffed.kind == "huggingface":
        program, tokenizer, config, module = load_hf_folder(path, log)
    elif sniffed.kind == "gguf":
        program, tokenizer, config, module = load_gguf(path, log)
    else:  # detect.py and this table must agree
        raise AssertionError(f"unhandled model kind {sniffed.kind}")
    return _finish(program, str(path), sniffed.kind, sha256_source(path), tokenizer, config,
                   module, log)


def _from_module(module: torch.nn.Module, example_inputs: tuple | None, log) -> LoadedModel:
    hf = _transformers_model(module)
    if hf is not None and module is hf:
        module = LogitsOnly(hf)  # a bare causal LM returns a ModelOutput, not logits
    config = hf_config(hf, None, type(hf).__name__) if hf is not None else {
        "name": type(module).__name__}
    vocab = None
    if example_inputs is None:
        vocab = config.get("vocab_size") or _embedding_rows(module)
        if vocab is None:
            raise ModelLoadError(f"cannot tell the vocab size of {type(module).__name__} (no "
                                 "nn.Embedding); pass example_inputs=(tokens,)")
    log(f"exporting {type(module).__name__} with torch.export ...")
    with progress.step("exporting with torch.export"):
        program = export_module(module, example_inputs, vocab_size=vocab)
    return _finish(program, "<nn.Module>", "module", None, None, config, module, log)


def _finish(program: ExportedProgram, source: str, kind: str, sha: str | None, tokenizer: Any,
            config: dict, module: torch.nn.Module | None, log) -> LoadedModel:
    name = Path(source).name if not source.startswith("<") else source
    vocab = check_contract(program, name)
    program = normalize(program, name, log)
    config = {key: config.get(key) for key in CONFIG_KEYS}
    config["vocab_size"] = vocab  # the logits' width is what decoding samples from
    return LoadedModel(program, source, kind, sha, tokenizer, config, module)


def _pickle_refusal(path: Path, sniffed: Sniffed) -> ModelLoadError:
    if sniffed.entry:
        with zipfile.ZipFile(path) as zf, zf.open(sniffed.entry) as stream:
            return refusal(path.name, stream, sniffed.what)
    with open(path, "rb") as stream:
        return refusal(path.name, stream, sniffed.what)


def _transformers_model(module: torch.nn.Module) -> torch.nn.Module | None:
    """The transformers model in ``module`` (itself, or wrapped by LogitsOnly), if any."""
    inner = module.model if isinstance(module, LogitsOnly) else module
    is_hf = type(inner).__module__.startswith("transformers.") and hasattr(inner, "config")
    return inner if is_hf else None


def _embedding_rows(module: torch.nn.Module) -> int | None:
    for sub in module.modules():
        if isinstance(sub, torch.nn.Embedding):
            return sub.num_embeddings
    return None
