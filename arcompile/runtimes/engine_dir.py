"""The engine directory: what users deploy, written atomically and checked on load.

Layout::

    OUT/arcompile.json     manifest: format version, runtime, inputs/outputs, passes applied,
                           source hash, tool versions, and the size and sha256 of every file
    OUT/model.onnx         the graph (ONNX Runtime), weights in model.onnx.data
    OUT/tokenizer/         when the source had a tokenizer
    OUT/draft/             with ``--self-draft``: a quantized engine of the same model that
                           drafts for ``speculative="self"`` (``arcompile/compiler/self_draft.py``);
                           its files are in OUT's manifest like the rest

Everything is written into a temporary sibling folder (``.OUT.PID.xxxx.partial``) that is
renamed into place only when complete, so a failure never leaves a half-written engine; an
existing engine at OUT is replaced only then, by an atomic exchange where the OS has one. The
next run removes what a killed run left (``recover``). A folder at OUT that is not an engine is
never overwritten.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from arcompile.errors import EngineError
from arcompile.hashing import sha256_file
from arcompile.runtimes.manifest_schema import MAX_BYTES, parse_manifest, strict_json

FORMAT_VERSION = 1
MANIFEST = "arcompile.json"
DRAFT_FOLDER = "draft"  # a self-draft engine (optimize --self-draft), inside its engine
LEGACY_PARTIAL_AGE_S = 3600  # staging folders without a pid in their name: stale after this


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
    """A temporary folder beside ``out_dir``; moved into place if the block succeeds.

    Crash leftovers of earlier runs (a killed process cannot clean up) are dealt with first:
    see ``recover``."""
    out_dir = Path(out_dir).absolute()
    recover(out_dir)
    check_output_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.{os.getpid()}.", suffix=".partial",
                                dir=out_dir.parent))
    try:
        yield tmp
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def recover(out_dir: Path) -> None:
    """Undo what a run killed while writing ``out_dir`` left beside it.

    ``.OUT.PID.xxxx.partial``: staging folders (or, after an exchange, the replaced engine)
    of a process that no longer runs: removed. ``.OUT.old-PID``: an engine moved aside by the
    two-rename swap (where the atomic exchange is unavailable): put back when OUT is missing,
    else removed. Folders of a process still running are left to it."""
    out_dir = Path(out_dir).absolute()
    if not out_dir.parent.is_dir():
        return
    for p in out_dir.parent.glob(f".{glob.escape(out_dir.name)}.*"):
        rest = p.name[len(out_dir.name) + 2:]
        if rest.endswith(".partial"):
            pid = rest.split(".", 1)[0]
            # an older arcompile named them .OUT.xxxx.partial, without its pid: by age
            stale = (not _alive(int(pid)) if pid.isdigit()
                     else time.time() - p.stat().st_mtime > LEGACY_PARTIAL_AGE_S)
            if stale and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
        elif rest.startswith("old-") and rest[4:].isdigit() and not _alive(int(rest[4:])):
            if not out_dir.exists() and is_engine_dir(p):
                os.replace(p, out_dir)
            elif not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process (or not a pid): leave its folder alone
    return True


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Move the staged engine to ``out_dir``: one rename when there is nothing to replace,
    else one atomic exchange (Linux ``renameat2``), so a kill at any moment leaves either the
    old engine or the new one at OUT. Elsewhere two renames, which ``recover`` undoes on the
    next run if a kill falls between them."""
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    if _exchange(tmp, out_dir):  # tmp now holds the old engine
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # not glibc, or glibc before 2.28
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


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
    full = strict_json({"format": "arcompile-engine", "format_version": FORMAT_VERSION,
                        **manifest, "files": files})
    # strict JSON (no NaN, which other parsers reject): an unmeasured figure is null
    (engine_dir / MANIFEST).write_text(json.dumps(full, indent=2, default=str,
                                                  allow_nan=False) + "\n")
    return full


def read_manifest(engine_dir: Path, check_hashes: bool = True) -> dict:
    """Load and validate an engine's manifest; EngineError says what does not match.

    Beyond the schema (manifest_schema.py): every path the manifest names stays inside the
    folder, no file or folder in it is a symbolic link, the model file is listed, every file
    in the folder is listed (a ``tokenizer/`` or ``.py`` dropped in later is refused), and
    every listed file has its size and (``check_hashes``) sha256."""
    engine_dir = Path(engine_dir)
    if not engine_dir.exists():
        raise EngineError(f"engine directory {engine_dir} does not exist")
    path = engine_dir / MANIFEST
    if not path.is_file():
        raise EngineError(f"{engine_dir} is not an arcompile engine directory (no {MANIFEST}); "
                          "create one with `arcompile optimize MODEL -o DIR`")
    if path.is_symlink():
        raise EngineError(f"{path} is a symbolic link; an engine's files must be its own")
    with open(path, "rb") as f:
        data = f.read(MAX_BYTES + 1)
    manifest = parse_manifest(data, str(path))
    version = manifest["format_version"]
    if version > FORMAT_VERSION:
        raise EngineError(f"engine format version {version} is newer than this arcompile "
                          f"supports ({FORMAT_VERSION}); upgrade arcompile or re-optimize")
    files = manifest["files"]
    for rel in files:
        inside(engine_dir, rel, f"{path}: field files/{rel[:80]}")
    model = inside(engine_dir, manifest["model_file"], f"{path}: field model_file")
    if manifest["model_file"] not in files:
        raise EngineError(f"{path}: the model file {manifest['model_file']!r} is not among the "
                          "files it lists and hashes; the engine is damaged")
    _refuse_unlisted(engine_dir, files)
    for rel, info in files.items():
        f = engine_dir / rel
        if not f.is_file():
            raise EngineError(f"engine file {rel} is missing from {engine_dir}")
        if f.stat().st_size != info["bytes"]:
            raise EngineError(f"engine file {rel} was altered: {f.stat().st_size} bytes, "
                              f"manifest says {info['bytes']}")
        if check_hashes and sha256_file(f) != info["sha256"]:
            raise EngineError(f"engine file {rel} was altered (sha256 does not match the manifest)")
    if manifest["model_file"].endswith(".onnx"):
        _check_external_data(engine_dir, model, files)
    return manifest


def inside(engine_dir: Path, rel: str, what: str) -> Path:
    """``engine_dir / rel``, EngineError unless ``rel`` is a plain relative path that stays in
    the folder and crosses no symbolic link."""
    parts = rel.split("/")
    if (not rel or "\\" in rel or rel.startswith("/") or ":" in parts[0]
            or any(p in ("", ".", "..") for p in parts)):
        raise EngineError(f"{what}: {rel[:80]!r} is not a path inside the engine folder")
    here = Path(engine_dir)
    for part in parts:
        here = here / part
        if here.is_symlink():
            raise EngineError(f"{what}: {rel[:80]!r} goes through a symbolic link; an "
                              "engine's files must be its own")
    root = Path(engine_dir).resolve()
    if not here.resolve().is_relative_to(root):
        raise EngineError(f"{what}: {rel[:80]!r} is not a path inside the engine folder")
    return here


def _refuse_unlisted(engine_dir: Path, files: dict) -> None:
    for folder, dirs, names in os.walk(engine_dir):
        for name in dirs + names:
            p = Path(folder) / name
            rel = p.relative_to(engine_dir).as_posix()
            if p.is_symlink():
                raise EngineError(f"{engine_dir}: {rel!r} is a symbolic link; an engine's "
                                  "files must be its own")
            if name in names and rel != MANIFEST and rel not in files:
                raise EngineError(f"{engine_dir}: {rel!r} is not one of the files its "
                                  "manifest lists; remove it or re-run `arcompile optimize`")


def _check_external_data(engine_dir: Path, model: Path, files: dict) -> None:
    """The ONNX model's external weights are files the manifest lists (ONNX Runtime would
    otherwise read whatever its ``location`` names)."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    try:
        proto = onnx.load(str(model), load_external_data=False)
    except Exception as e:  # a damaged protobuf raises DecodeError and others
        raise EngineError(f"{model} is not a readable ONNX model ({type(e).__name__}); the "
                          "engine is damaged, re-run `arcompile optimize`") from None
    base = model.parent.relative_to(engine_dir).as_posix()
    for tensor in _get_all_tensors(proto):
        if not uses_external_data(tensor):
            continue
        location = {e.key: e.value for e in tensor.external_data}.get("location", "")
        rel = location if base == "." else f"{base}/{location}"
        if location.startswith(("/", "\\")) or rel not in files:
            raise EngineError(f"{model.name} reads weights from {location[:80]!r}, which is not "
                              f"one of the files its manifest lists and hashes; the engine is "
                              "damaged")
