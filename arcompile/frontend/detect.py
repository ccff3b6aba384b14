"""What kind of model a path holds, decided by its content, never by its extension.

Users name torch.export archives ``.pt`` and TorchScript archives ``.pt2``; both are zips, as is
``torch.save(model)``, and only the entries inside tell them apart:
- torch.export archive: ``archive_format`` / ``models/<name>.json`` under one root folder;
- TorchScript archive: ``data.pkl`` plus ``code/`` (TorchScript source, not Python);
- torch.save zip: ``data.pkl`` alone, a full pickle (refused by the caller).
Other files: GGUF (magic ``GGUF``), pickles (PROTO opcode), and a folder with ``config.json``
for Hugging Face. Everything else is a ModelLoadError that says what the file looks like.
"""

from __future__ import annotations

import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

from arcompile.errors import ModelLoadError, first_line
from arcompile.frontend.pickle_scan import looks_like_pickle

EXPECTED = ("arcompile reads torch.export archives (torch.export.save), TorchScript archives "
            "(torch.jit.trace(...).save), GGUF files and Hugging Face model folders")
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
HF_WEIGHTS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json")


@dataclass(frozen=True)
class Sniffed:
    """kind: "torch.export" | "torchscript" | "huggingface" | "gguf" | "pickle"."""

    kind: str
    root: str = ""  # zips: the folder the archive's entries live under ("" for none)
    what: str = ""  # pickles: how to name the file in the refusal
    entry: str = ""  # pickles inside a zip: the zip entry holding the pickle


def sniff(path: Path) -> Sniffed:
    """Classify ``path``; raise ModelLoadError for what is missing, broken or not a model."""
    if not path.exists():
        raise ModelLoadError(f"no such file or folder: {path}")
    if path.is_dir():
        return _sniff_folder(path)
    size = path.stat().st_size
    if size == 0:
        raise ModelLoadError(f"{path.name} is an empty file; {EXPECTED}")
    with open(path, "rb") as f:
        head = f.read(65536)
    if head.startswith(b"GGUF"):
        return Sniffed("gguf")
    if head.startswith(ZIP_MAGIC):
        return _sniff_zip(path)
    if looks_like_pickle(head):
        # legacy (pre-1.6) torch.save files begin with a pickled magic number
        legacy = head.startswith(b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19")
        return Sniffed("pickle", what="a legacy torch.save file" if legacy else "a pickle file")
    if _is_safetensors(head, size):
        raise ModelLoadError(f"{path.name} is a safetensors file: weights without a model "
                             "definition; put it in a Hugging Face folder with its config.json")
    if _is_text(head):
        raise ModelLoadError(f"{path.name} is a text file, not a model; {EXPECTED}")
    raise ModelLoadError(f"{path.name} is not a model file arcompile knows (it starts with "
                         f"bytes {head[:8].hex()}); {EXPECTED}")


def _sniff_folder(path: Path) -> Sniffed:
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"folder {path} is not a Hugging Face model folder (it has no "
                             f"config.json); {EXPECTED}")
    if not any(next(path.glob(pattern), None) for pattern in HF_WEIGHTS):
        raise ModelLoadError(f"folder {path} has config.json but no weights (*.safetensors or "
                             "pytorch_model.bin)")
    return Sniffed("huggingface")


def _sniff_zip(path: Path) -> Sniffed:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise ModelLoadError(f"{path.name} is a truncated or corrupt zip archive "
                             f"({first_line(e)}); save or copy it again") from e
    root, rel = split_root(names)
    if "archive_format" in rel or any(n.startswith("models/") and n.endswith(".json")
                                      for n in rel):
        return Sniffed("torch.export", root=root)
    if "serialized_exported_program.json" in rel:
        raise ModelLoadError(f"{path.name} is a torch.export archive in the pre-2.8 format; "
                             "save it again with this torch's torch.export.save")
    if "data.pkl" in rel and any(n.startswith("code/") for n in rel):
        return Sniffed("torchscript", root=root)
    if "data.pkl" in rel:
        entry = f"{root}/data.pkl" if root else "data.pkl"
        return Sniffed("pickle", root=root, what="a torch.save zip archive", entry=entry)
    shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    raise ModelLoadError(f"{path.name} is a zip archive of other files ({shown or 'empty'}), "
                         f"not a model; {EXPECTED}")


def split_root(names: list[str]) -> tuple[str, list[str]]:
    """PyTorch writes every zip entry under one folder named after the file; strip it."""
    roots = {n.split("/", 1)[0] for n in names}
    if len(roots) == 1 and all("/" in n for n in names):
        root = roots.pop()
        return root, [n[len(root) + 1:] for n in names]
    return "", list(names)


def _is_safetensors(head: bytes, size: int) -> bool:
    # an 8-byte little-endian header length, then the JSON header itself
    if len(head) < 10:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 0 < n < size and head[8:9] == b"{"


def _is_text(head: bytes) -> bool:
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start >= len(head) - 3  # a multi-byte character cut at the end of the sample
    return True
