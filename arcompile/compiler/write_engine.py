"""Writing an engine directory: the graph lowered to ONNX, checked against the reference
interpreter, and the manifest (``runtimes/engine_dir.py`` holds the folder's layout)."""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any, Callable

import networkx
import onnx
import onnxruntime
import torch

from arcompile import __version__, progress
from arcompile.compiler.lowering_check import check_lowering
from arcompile.ir.cached_step import past_inputs
from arcompile.passes.manager import PassRecord
from arcompile.runtimes.engine_dir import staging_dir, write_manifest
from arcompile.runtimes.onnxruntime.lower import lower_to_onnx


def write_engine(graph, output_dir: str | Path, loaded, records: list[PassRecord],
                 tokenizer: Any = None, sample: torch.Tensor | None = None,
                 refused: str | None = None, log: Callable[[str], None] | None = None,
                 extra: dict | None = None, validate: Callable[[Path], None] | None = None,
                 nested: Callable[[Path], dict] | None = None
                 ) -> tuple[dict, dict | None, float]:
    """Lower ``graph`` as it stands into an engine directory (staged, moved into place).

    With ``sample``, ONNX Runtime (its optimizations off) is checked against the reference
    interpreter on it. Returns (manifest, the manifest's kv_cache entry or None, that check's
    max |Δlogit| or NaN). ``extra``: more manifest entries. ``validate(folder)`` runs on the
    staged engine once its manifest is written (it may update ``extra``; raising leaves
    nothing behind). ``nested(folder)`` writes more into the staged engine before its
    manifest, which then lists those files too, and returns more manifest entries (the
    self-draft). ``optimize`` and ``arcompile profile`` (once per pass) use it.
    """
    say = log or (lambda _msg: None)
    with staging_dir(Path(output_dir)) as tmp:
        say("lowering to ONNX")
        with progress.step("lowering to ONNX, writing weights"):
            io = lower_to_onnx(graph, tmp)
        cache_layout = cache_manifest(graph, io) if graph.meta.get("kv_cache") else None
        with progress.step("checking ONNX Runtime against the interpreter",
                           echo=sample is not None):
            diff = check_lowering(graph, tmp, sample) if sample is not None else float("nan")
        if sample is not None:
            say(f"  ONNX Runtime vs reference interpreter: max|Δlogit| {diff:.2g}")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / "tokenizer"))
        entries = {
            "runtime": "onnxruntime-cpu",
            "model_file": "model.onnx",
            "inputs": io["inputs"],
            "outputs": io["outputs"],
            "padding_side": "right",
            "kv_cache": cache_layout,
            **({"kv_cache_refused": refused} if refused else {}),
            # layer-skip routing (passes/skip_ffn.py): its flags input, blocks and choice
            **({"skip_ffn": graph.meta["skip_ffn"]} if graph.meta.get("skip_ffn") else {}),
            **(nested(tmp) if nested is not None else {}),
            "passes": [r.as_dict() for r in records],
            "lowering_max_abs_diff": diff,
            "source": {"path": loaded.source, "kind": loaded.source_kind,
                       "sha256": loaded.source_sha256},
            "config": {k: v for k, v in loaded.config.items() if v is not None},
            "tools": _tool_versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        manifest = write_manifest(tmp, {**entries, **(extra or {})})
        if validate is not None:  # the files are as they were: only the entries change
            validate(tmp)
            manifest = write_manifest(tmp, {**entries, **(extra or {})}, manifest["files"])
    return manifest, cache_layout, diff


def cache_manifest(graph, io: dict) -> dict:
    """The manifest's ``kv_cache`` entry: the graph's ``CachedStep`` (``ir/cached_step.py``)
    with the lowered names of the tokens and logits and the cache's shape and dtype."""
    step = graph.meta["kv_cache"]
    keys = past_inputs(graph)[::2]  # per layer, its past key [B, Hkv, P, D]
    heads = sorted({v.shape[1] for v in keys})
    dims = sorted({v.shape[3] for v in keys})
    entry = {
        "layout": step.layout, "past_length": step.past_length,
        "past": [list(pair) for pair in step.past],
        "present": [list(pair) for pair in step.present],
        "concat_dim": step.concat_dim, "logits_to_keep": step.logits_to_keep,
        # concat: presents are new arrays, fed back as the next pasts; inplace: past and
        # present are bound to the same [B, Hkv, max_context, D] buffers (I/O binding)
        "runtime_cache": step.runtime_cache,
        **({"max_context": step.max_context} if step.max_context is not None else {}),
        # an int8 cache (passes/quantize_kv_cache.py): dtype sits here in its manifests
        **({"dtype": step.dtype, "kv_quant": step.kv_quant} if step.kv_quant else {}),
    }
    entry.update({
        "logits": io["outputs"][0]["name"],  # the step's first output, [B, T, V]
        "tokens": io["inputs"][0]["name"],
        "layers": len(step.past),
        "num_kv_heads": heads[0] if len(heads) == 1 else [v.shape[1] for v in keys],
        "head_dim": dims[0] if len(dims) == 1 else [v.shape[3] for v in keys],
        "dtype": io["inputs"][2]["dtype"],  # as lowered (the int8 cache's too)
    })
    return entry


def _tool_versions() -> dict:
    return {"arcompile": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "networkx": networkx.__version__,
            "python": platform.python_version()}
