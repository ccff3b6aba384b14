"""SHA-256 of a model source, for the engine manifest.

Files are read in 1 MiB chunks (models run to hundreds of MB). A folder's hash covers, for each
file in name order (skipping hidden ones such as .cache/ left by huggingface_hub), its relative
path and its own SHA-256, so renaming or editing any file changes it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_folder(folder: Path) -> str:
    digest = hashlib.sha256()
    files = sorted(p for p in folder.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    for path in files:
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(sha256_file(path).encode() + b"\n")
    return digest.hexdigest()


def sha256_source(path: Path) -> str:
    return sha256_folder(path) if path.is_dir() else sha256_file(path)
