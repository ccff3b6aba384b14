"""Loading as an attacker would feed it (issue 22, the loading half).

Each test here fails on c12694b and passes now: a hostile ``.pt2`` whose extra ``models/``
entry holds code, tokenizer code run on "y", manifests that point outside the engine or list
less than the model reads, crash leftovers beside an engine, and malformed manifests. The
hostile files try to create a marker file; a test passes only if loading is refused with a
one-line ArcompileError and the marker does not exist afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import zipfile
from pathlib import Path

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(TESTS.parent))

import pytest  # noqa: E402
import torch  # noqa: E402

import tiny_models  # noqa: E402
from arcompile.cli import main  # noqa: E402
from arcompile.errors import ArcompileError, EngineError, UnsafeModelError  # noqa: E402
from arcompile.frontend.export import export_module  # noqa: E402
from arcompile.frontend.load import load_model  # noqa: E402

QUIET = dict(log=lambda _msg: None)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *words: str) -> None:
    assert code == 2, err  # 2: an ArcompileError; 1 would be an internal error
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("arcompile: error: "), err
    for word in words:
        assert word in lines[0], err


@pytest.fixture(scope="module")
def llama_pt2(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("archives") / "llama.pt2"
    torch.export.save(export_module(tiny_models.llama(), vocab_size=tiny_models.VOCAB), path)
    return path


def add_entry(src: Path, dst: Path, name: str, data: bytes) -> Path:
    """Copy an export archive with one more entry, ``name`` under its root folder."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        root = zin.namelist()[0].split("/", 1)[0]
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
        zout.writestr(f"{root}/{name}", data)
    return dst


def program_running(src: Path, marker: Path) -> bytes:
    """The archive's models/model.json with one expr_str that runs ``touch marker``."""
    with zipfile.ZipFile(src) as zf:
        name = next(n for n in zf.namelist() if n.endswith("models/model.json"))
        program = json.loads(zf.read(name))
    values = program["graph_module"]["graph"]["sym_int_values"]
    expr = next(v for v in values.values() if "as_expr" in v)["as_expr"]
    # "Symbol('s72', positive=True, integer=True)" stays the value, so the program still loads
    expr["expr_str"] = f"(__import__('os').system('touch {marker}'), {expr['expr_str']})[1]"
    return json.dumps(program).encode()


# --- 1. a .pt2 whose extra models/ entry holds code -----------------------------------------

@pytest.mark.parametrize("entry", ["models/model_json", "models/model.JSON", "MODELS/model.json",
                                   "models/evil.json"])
def test_extra_program_entry_is_refused_by_optimize_and_inspect(entry, capsys, tmp_path,
                                                                llama_pt2):
    marker = tmp_path / "pwned"
    evil = add_entry(llama_pt2, tmp_path / "evil.pt2", entry, program_running(llama_pt2, marker))
    code, _, err = run_cli(capsys, "optimize", evil, "-o", tmp_path / "out", "--no-kv-cache")
    assert_one_line_error(code, err, "evil.pt2")
    code, _, err = run_cli(capsys, "inspect", evil)
    assert_one_line_error(code, err, "evil.pt2")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_entries_equal_but_for_case_are_refused(tmp_path, llama_pt2):
    """torch looks entries up case-insensitively: which of the two it reads is not ours to
    guess, so neither is read."""
    path = add_entry(llama_pt2, tmp_path / "twice.pt2", "data/weights/Model_Weights_Config.json",
                     b'{"config": {}}')
    with pytest.raises(UnsafeModelError, match="cannot tell apart"):
        load_model(path, **QUIET)


def test_clean_archive_still_loads(llama_pt2):
    assert load_model(llama_pt2, **QUIET).config["vocab_size"] == tiny_models.VOCAB
