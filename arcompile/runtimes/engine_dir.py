"""The engine directory: what users deploy, written atomically and checked on load.

Layout::

    OUT/arcompile.json     manifest: format version, runtime, inputs/outputs, passes applied,
                           source hash, tool versions, and the size and sha256 of every file
    OUT/model.onnx         the graph (ONNX Runtime), weights in model.onnx.data
    OUT/tokenizer/         when the source had a tokenizer
    OUT/draft/             with ``--self-draft``: a quantized engine of the same model that
                           drafts for ``speculative="self"`` (``arcompile/self_draft.py``);
                           its files are in OUT's manifest like the rest

Everything is written into a temporary sibling folder that is renamed into place only when
complete, so a failure never leaves a half-written engine; an existing engine at OUT is
replaced only then. A folder at OUT that is not an engine is never overwritten.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from arcompile.errors import EngineError
from arcompile.frontend.source_hash import sha256_file

FORMAT_VERSION = 1
MANIFEST = "arcompile.json"


def is_engine_dir(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def check_output_dir(out_dir: Path) -> None:
    """EngineError unless ``out_dir`` is free: absent, empty, or an engine to replace."""
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not is_engine_dir(out_dir) and (
            not out_dir.is_dir() or any(out_dir.iterdir())):
        raise EngineError(f"{out_dir} exists and is not an arcompile engine directory; "
                          "choose another output path or remove it")


@contextmanager
def staging_dir(out_dir: Path) -> Iterator[Path]:
    """A temporary folder beside ``out_dir``; moved into place if the block succeeds."""
    out_dir = Path(out_dir).absolute()
    check_output_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        yield tmp
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_manifest(engine_dir: Path, manifest: dict, files: dict | None = None) -> dict:
    """Add format version and file hashes to ``manifest`` and write it. ``files``: the
    hashes of an earlier write of this folder, when its files have not changed since."""
    engine_dir = Path(engine_dir)
    if files is None:
        files = {}
        for p in sorted(engine_dir.rglob("*")):
            rel = p.relative_to(engine_dir).as_posix()
            if p.is_file() and rel != MANIFEST:  # a nested engine's manifest is a file here
                files[rel] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    full = {"format": "arcompile-engine", "format_version": FORMAT_VERSION, **manifest,
            "files": files}
    (engine_dir / MANIFEST).write_text(json.dumps(full, indent=2, default=str) + "\n")
    return full


def read_manifest(engine_dir: Path, check_hashes: bool = True) -> dict:
    """Load and validate an engine's manifest; EngineError says what does not match."""
    engine_dir = Path(engine_dir)
    if not engine_dir.exists():
        raise EngineError(f"engine directory {engine_dir} does not exist")
    path = engine_dir / MANIFEST
    if not path.is_file():
        raise EngineError(f"{engine_dir} is not an arcompile engine directory (no {MANIFEST}); "
                          "create one with `arcompile optimize MODEL -o DIR`")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EngineError(f"{path} is not valid JSON ({e}); the engine is damaged, re-run "
                          "`arcompile optimize`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "arcompile-engine":
        raise EngineError(f"{path} is not an arcompile engine manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise EngineError(f"{path} has no integer format_version")
    if version > FORMAT_VERSION:
        raise EngineError(f"engine format version {version} is newer than this arcompile "
                          f"supports ({FORMAT_VERSION}); upgrade arcompile or re-optimize")
    for rel, info in manifest.get("files", {}).items():
        f = engine_dir / rel
        if not f.is_file():
            raise EngineError(f"engine file {rel} is missing from {engine_dir}")
        if f.stat().st_size != info["bytes"]:
            raise EngineError(f"engine file {rel} was altered: {f.stat().st_size} bytes, "
                              f"manifest says {info['bytes']}")
        if check_hashes and sha256_file(f) != info["sha256"]:
            raise EngineError(f"engine file {rel} was altered (sha256 does not match the manifest)")
    return manifest
