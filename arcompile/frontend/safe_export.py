"""Load a torch.export archive (``torch.export.save``, any extension) without running its code.

Three layers, because torch.export.load trusts its file (see archive_check.py for the paths):
1. archive_check vets the archive's JSON and file list before torch reads any of it: every
   entry torch would parse, read through torch's own zip reader (same names, same bytes);
2. while torch reads it, ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`` makes every ``torch.load`` weights-
   only (torch/serialization.py honours it even where torch passes ``weights_only=False``), and
   the pt2 loader's ``pickle.loads`` / ``torch._C._pickle_load_obj`` are swapped for refusals;
3. the program's ``guards_code`` (Python source that ``.module()`` exec's) is dropped.
We call ``load_pt2`` rather than ``torch.export.load``, which on a RuntimeError falls back to
the pre-2.8 archive format, a second and unvetted reader.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import threading
import zipfile
from pathlib import Path
from typing import Iterator

import torch
from torch.export import ExportedProgram
from torch.export.pt2_archive import _package

from arcompile.errors import (
    ArcompileError,
    ModelLoadError,
    UnsafeModelError,
    first_line,
)
from arcompile.frontend.archive_check import (
    MODELS_DIR,
    check_entry_names,
    check_payload_config,
    check_program_json,
)

FORCE_SAFE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
FORCE_UNSAFE = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
# the environment and torch's module attributes are process-wide: one load at a time
_LOCK = threading.RLock()


def load_export_archive(path: Path, root: str) -> ExportedProgram:
    """The ExportedProgram in a pt2 archive (its entries under one root folder, ``root``)."""
    source = path.name
    vet_archive(path, source)
    try:
        with unpickling_refused(), open(path, "rb") as f:
            contents = _package.load_pt2(f)
    except ArcompileError:
        raise
    except Exception as e:  # torch raises many unrelated types from deep inside
        raise ModelLoadError(f"{source}: torch could not read the export archive: "
                             f"{first_line(e)}") from e
    programs = contents.exported_programs
    if not programs:
        raise ModelLoadError(f"{source} is a torch.export archive with no program in it")
    ep = programs.get("model") or next(iter(programs.values()))
    # torch turns these strings into Python and exec()s them in ep.module(); they only repeat
    # input-shape checks that ep.range_constraints already makes
    ep._guards_code = []
    return ep


@contextlib.contextmanager
def unpickling_refused() -> Iterator[None]:
    """Weights-only ``torch.load`` everywhere, and no object unpickling in the pt2 loader."""
    with _LOCK:
        saved_env = {k: os.environ.get(k) for k in (FORCE_SAFE, FORCE_UNSAFE)}
        saved_pickle, saved_obj_load = _package.pickle, torch._C._pickle_load_obj
        os.environ[FORCE_SAFE] = "1"
        os.environ.pop(FORCE_UNSAFE, None)  # torch raises if both are set
        _package.pickle = _RefusingPickle()
        torch._C._pickle_load_obj = _refuse_unpickling
        try:
            yield
        finally:
            _package.pickle, torch._C._pickle_load_obj = saved_pickle, saved_obj_load
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


class _RefusingPickle:
    """Stands in for the ``pickle`` module inside torch's pt2 loader: loading refuses."""

    loads = load = staticmethod(lambda *a, **k: _refuse_unpickling())

    def __getattr__(self, name: str):
        return getattr(pickle, name)


def _refuse_unpickling(*args, **kwargs):
    raise UnsafeModelError("the export archive holds a pickled Python object; arcompile will "
                           "not unpickle it")


def vet_archive(path: Path, source: str) -> None:
    """Check every entry torch's pt2 loader would parse, read through torch's own reader so
    that what is vetted is byte for byte what torch reads (archive_check.py says which)."""
    try:
        reader = torch._C.PyTorchFileReader(str(path))
        records = list(reader.get_all_records())
        with zipfile.ZipFile(path) as zf:
            listed = zf.namelist()
    except Exception as e:  # not a zip, no root folder, a bad central directory
        raise ModelLoadError(f"{source}: torch could not read the export archive: "
                             f"{first_line(e)}") from e
    check_entry_names(records, listed, source)
    for name in records:
        low = name.lower()
        if low.startswith(MODELS_DIR):
            check_program_json(_read_json(reader, name, source), source)
        elif low.endswith("config.json"):  # weights, constants (and AOTInductor's, refused)
            check_payload_config(_read_json(reader, name, source), source, name)


def _read_json(reader, entry: str, source: str):
    try:
        return json.loads(reader.get_record(entry))
    except Exception as e:  # bad JSON, bad CRC, bad deflate stream: all mean corrupt
        raise ModelLoadError(f"{source}: the export archive entry {entry} is corrupt: "
                             f"{first_line(e)}") from e

