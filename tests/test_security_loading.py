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
import tiny_models  # noqa: E402
import torch  # noqa: E402

from arcompile.cli.main import main  # noqa: E402
from arcompile.errors import EngineError, UnsafeModelError  # noqa: E402
from arcompile.frontend.export import export_module  # noqa: E402
from arcompile.frontend.load import load_model  # noqa: E402

QUIET = dict(log=lambda _msg: None)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *words: str) -> None:
    assert code == 2, err  # 2: an ArcompileError; 1 would be an internal error
    lines = err.strip().splitlines()  # progress lines come first, on stderr too
    assert lines[-1].startswith("arcompile: error: "), err
    assert not any("Traceback" in line or "error" in line for line in lines[:-1]), err
    for word in words:
        assert word in lines[-1], err


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


# --- engines --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(tmp_path_factory, llama_pt2) -> Path:
    """A cached (in-place) engine of the tiny LLaMA; tests copy it before changing it."""
    from arcompile import optimize

    out = tmp_path_factory.mktemp("engines") / "llama"
    optimize(str(llama_pt2), out, log=None)
    return out


def copy_engine(engine: Path, dst: Path) -> Path:
    shutil.copytree(engine, dst)
    return dst


def rewrite_manifest(folder: Path, edit=None, rehash: bool = True) -> dict:
    """Pass the manifest through ``edit(dict)``; ``rehash``: list and hash the folder's files
    anew, as someone who edits an engine on purpose would."""
    from arcompile.runtimes.engine_dir import write_manifest

    manifest = json.loads((folder / "arcompile.json").read_text())
    if edit is not None:
        edit(manifest)
    if rehash:
        manifest.pop("files")
        return write_manifest(folder, manifest)
    (folder / "arcompile.json").write_text(json.dumps(manifest))
    return manifest


def load_engine(folder: Path):
    import arcompile

    return arcompile.load(folder)


# --- 3. tokenizer code on "y" ---------------------------------------------------------------

def remote_code_tokenizer(folder: Path, marker: Path) -> Path:
    """A tokenizer folder whose auto_map names a class in evil.py, which touches ``marker``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", "hello", "world"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                            eos_token="<eos>").save_pretrained(str(folder))
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]}
    config_path.write_text(json.dumps(config))
    (folder / "evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "from transformers import PreTrainedTokenizerFast\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    return folder


def test_optimize_never_runs_tokenizer_code_even_on_y(capsys, monkeypatch, tmp_path, llama_pt2):
    import io

    marker = tmp_path / "pwned"
    folder = remote_code_tokenizer(tmp_path / "tok", marker)
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 10))
    code, _, err = run_cli(capsys, "optimize", llama_pt2, "-o", tmp_path / "out",
                           "--no-kv-cache", "--tokenizer", folder)
    assert_one_line_error(code, err, "tokenizer")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_engine_tokenizer_with_code_is_refused(monkeypatch, tmp_path, engine):
    """Even listed and hashed (someone rewrote the manifest), its code never runs."""
    import io

    marker = tmp_path / "pwned"
    folder = copy_engine(engine, tmp_path / "eng")
    remote_code_tokenizer(folder / "tokenizer", marker)
    rewrite_manifest(folder)
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 10))
    eng = load_engine(folder)
    with pytest.raises(EngineError, match="never runs a tokenizer's own Python code"):
        _ = eng.tokenizer
    assert not marker.exists()


def test_tokenizer_dropped_into_an_engine_is_refused(tmp_path, engine):
    marker = tmp_path / "pwned"
    folder = copy_engine(engine, tmp_path / "eng")
    remote_code_tokenizer(folder / "tokenizer", marker)
    with pytest.raises(EngineError, match="not one of the files its manifest lists"):
        load_engine(folder)
    assert not marker.exists()


def test_model_folder_tokenizer_with_code_is_left_out(monkeypatch, tmp_path):
    """A Hugging Face folder whose tokenizer needs its own code: the model loads, the
    tokenizer is not kept (transformers would quietly load another class and the engine
    would carry the auto_map on)."""
    import io

    marker = tmp_path / "pwned"
    folder = tmp_path / "tiny-llama"
    tiny_models.llama().model.save_pretrained(folder)
    remote_code_tokenizer(folder, marker)
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 10))
    logs = []
    loaded = load_model(folder, log=logs.append)
    assert loaded.tokenizer is None and any("own Python code" in line for line in logs)
    assert not marker.exists()


# --- 4. manifest paths ----------------------------------------------------------------------

@pytest.mark.parametrize("model_file", ["../other/model.onnx", "/etc/passwd",
                                        "sub/../../other/model.onnx"])
def test_model_file_outside_the_folder_is_refused(model_file, tmp_path, engine):
    copy_engine(engine, tmp_path / "other")
    folder = copy_engine(engine, tmp_path / "eng")
    rewrite_manifest(folder, lambda m: m.update(model_file=model_file), rehash=False)
    with pytest.raises(EngineError, match="model_file.*not a path inside"):
        load_engine(folder)


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "./model.onnx"])
def test_files_entries_outside_the_folder_are_refused(name, tmp_path, engine):
    folder = copy_engine(engine, tmp_path / "eng")
    (tmp_path / "x").write_text("x")
    rewrite_manifest(folder, lambda m: m["files"].update(
        {name: {"bytes": 1, "sha256": "0" * 64}}), rehash=False)
    with pytest.raises(EngineError, match="not a path inside"):
        load_engine(folder)


def test_unlisted_model_file_is_refused(tmp_path, engine):
    """``"files": {}`` with the weights zeroed used to load and decode zeros."""
    folder = copy_engine(engine, tmp_path / "eng")
    data = folder / "model.onnx.data"
    data.write_bytes(bytes(data.stat().st_size))
    rewrite_manifest(folder, lambda m: m.update(files={}), rehash=False)
    with pytest.raises(EngineError, match="not among the files it lists"):
        load_engine(folder)


def test_unlisted_weights_are_refused(tmp_path, engine):
    folder = copy_engine(engine, tmp_path / "eng")
    rewrite_manifest(folder, lambda m: m["files"].pop("model.onnx.data"), rehash=False)
    with pytest.raises(EngineError, match="'model.onnx.data' is not one of the files"):
        load_engine(folder)


def test_symlinks_are_refused(tmp_path, engine):
    copy_engine(engine, tmp_path / "other")
    folder = copy_engine(engine, tmp_path / "eng")
    (folder / "model.onnx.data").unlink()
    (folder / "model.onnx.data").symlink_to(tmp_path / "other" / "model.onnx.data")
    with pytest.raises(EngineError, match="symbolic link"):
        load_engine(folder)


def test_external_data_outside_the_listing_is_refused(tmp_path, engine):
    """The ONNX model names its weights file; it must be one the manifest hashes."""
    import onnx

    copy_engine(engine, tmp_path / "other")
    folder = copy_engine(engine, tmp_path / "eng")
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../other/model.onnx.data"
    onnx.save(model, str(folder / "model.onnx"))
    rewrite_manifest(folder)
    with pytest.raises(EngineError, match="reads weights from '../other/model.onnx.data'"):
        load_engine(folder)


def test_unedited_engine_loads_and_decodes(engine):
    assert len(load_engine(engine).generate([1, 2, 3], max_new_tokens=3)) == 3


# --- 8. malformed manifests -----------------------------------------------------------------

def _set(path: str, value):
    def edit(m):
        *keys, last = path.split("/")
        target = m
        for k in keys:
            target = target[int(k)] if isinstance(target, list) else target[k]
        if value is DELETE:
            del target[last]
        else:
            target[int(last) if isinstance(target, list) else last] = value
    return edit


DELETE = object()
MALFORMED = {
    "no model_file": ("model_file", DELETE, "model_file"),
    "no sha256": ("files/model.onnx/sha256", DELETE, "files/model.onnx"),
    "files as a list": ("files", [], "field files"),
    "empty inputs": ("inputs", [], "field inputs"),
    "kv_cache yes": ("kv_cache", "yes", "field kv_cache"),
    "max_context lots": ("kv_cache/max_context", "lots", "kv_cache/max_context"),
    "negative format_version": ("format_version", -1, "format_version"),
    "huge head dim": ("inputs/2/shape/3", 10**12, "inputs/2/shape/3"),
    "dims disagree with the model": ("inputs/2/shape/3", 17, "past_key_0"),
    "unknown cache input": ("kv_cache/past/0/0", "nope", "kv_cache/past/0"),
    "dtype not a dtype": ("inputs/2/dtype", "object", "inputs/2/dtype"),
}


@pytest.mark.parametrize("case", list(MALFORMED), ids=list(MALFORMED))
def test_malformed_manifest_is_a_one_line_error_naming_the_field(case, tmp_path, engine):
    path, value, field = MALFORMED[case]
    folder = copy_engine(engine, tmp_path / "eng")
    rewrite_manifest(folder, _set(path, value), rehash=False)
    with pytest.raises(EngineError) as info:
        load_engine(folder)
    assert field in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("text", ['{"format": "arcompile-engine", "x": ' + "[" * 200_000
                                  + "]" * 200_000 + "}",
                                  '{"format": "arcompile-engine", "format_version": NaN}',
                                  '{"format": "arcompile-engine", "format_version": 1' + "0" * 5000
                                  + "}", "\xff\xfe"])
def test_hostile_manifest_text_is_a_one_line_error(text, tmp_path, engine):
    folder = copy_engine(engine, tmp_path / "eng")
    (folder / "arcompile.json").write_bytes(text.encode("utf-8", "surrogateescape")
                                            if text != "\xff\xfe" else b"\xff\xfe")
    with pytest.raises(EngineError) as info:
        load_engine(folder)
    assert "\n" not in str(info.value)


def test_manifest_is_strict_json_and_old_nan_manifests_load(tmp_path, engine):
    """Quantized engines wrote ``"lowering_max_abs_diff": NaN``, which strict parsers refuse:
    now null; an engine written with NaN still loads."""
    from arcompile.runtimes.engine_dir import write_manifest

    folder = copy_engine(engine, tmp_path / "eng")
    manifest = json.loads((folder / "arcompile.json").read_text())
    manifest.pop("files")
    write_manifest(folder, {**manifest, "lowering_max_abs_diff": float("nan")})
    text = (folder / "arcompile.json").read_text()
    assert "NaN" not in text
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))
    assert json.loads(text)["lowering_max_abs_diff"] is None
    (folder / "arcompile.json").write_text(text.replace('"lowering_max_abs_diff": null',
                                                        '"lowering_max_abs_diff": NaN'))
    assert "NaN" in (folder / "arcompile.json").read_text()
    load_engine(folder)


def test_onnx_runtime_refusal_is_an_engine_error(tmp_path, engine):
    """A model file ONNX Runtime refuses (here: not a model at all) says so in one line,
    instead of "internal error: Fail"."""
    folder = copy_engine(engine, tmp_path / "eng")
    (folder / "model.onnx").write_bytes(b"\x08\x07garbage")
    rewrite_manifest(folder)
    with pytest.raises(EngineError) as info:
        load_engine(folder)
    assert "\n" not in str(info.value)


# --- 7. crash leftovers ---------------------------------------------------------------------

def dead_pid() -> int:
    import subprocess

    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def write_engine_like(out: Path, text: str) -> None:
    """Stage and place a minimal engine folder (what write_engine does, minus the model)."""
    from arcompile.runtimes.engine_dir import staging_dir, write_manifest

    with staging_dir(out) as tmp:
        (tmp / "model.onnx").write_text(text)
        write_manifest(tmp, {"model_file": "model.onnx"})


def test_stale_partials_are_removed_by_the_next_run(tmp_path):
    out = tmp_path / "out"
    stale = tmp_path / f".out.{dead_pid()}.k2j4.partial"  # a run killed while lowering
    legacy = tmp_path / ".out.abc123xy.partial"  # the same, named by an older arcompile
    running = tmp_path / f".out.{os.getpid()}.zz.partial"  # a run still going
    for p in (stale, legacy, running):
        p.mkdir()
        (p / "model.onnx").write_text("half")
    os.utime(legacy, (0, 0))
    write_engine_like(out, "new")
    assert not stale.exists() and not legacy.exists() and running.exists()
    assert (out / "model.onnx").read_text() == "new"


class Killed(BaseException):
    """The process dying (a BaseException, as KeyboardInterrupt is, but not pytest's)."""


def test_replacing_an_engine_never_leaves_out_absent(tmp_path, monkeypatch):
    """A kill between "move OUT aside" and "move the new one in" used to leave no OUT: the
    swap is now one atomic exchange, so a rename that fails (as if killed) never runs."""
    from arcompile.runtimes import engine_dir

    out = tmp_path / "out"
    write_engine_like(out, "old")
    real_replace, calls = os.replace, []

    def killed_at_second_rename(a, b):
        calls.append((a, b))
        if len(calls) == 2:
            raise Killed()
        real_replace(a, b)
    monkeypatch.setattr(engine_dir.os, "replace", killed_at_second_rename)
    write_engine_like(out, "new")
    assert (out / "model.onnx").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_engine_moved_aside_is_restored_by_the_next_run(tmp_path, monkeypatch):
    """Where no atomic exchange exists, the two renames' leftover is put back."""
    from arcompile.runtimes import engine_dir

    out = tmp_path / "out"
    write_engine_like(out, "old")
    os.replace(out, tmp_path / f".out.old-{dead_pid()}")  # killed between the two renames
    monkeypatch.setattr(engine_dir, "_exchange", lambda a, b: False)
    engine_dir.recover(out)
    assert (out / "model.onnx").read_text() == "old"
    write_engine_like(out, "new")
    assert (out / "model.onnx").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
