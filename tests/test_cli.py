"""The CLI: run and inspect work; bad input gets one clear line on stderr, exit status 2,
no traceback unless --debug, and nothing half-written left behind."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import pytest
import tiny_models as tm
import torch

import arcompile
from arcompile.cli.main import main
from arcompile.errors import EngineError


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    lines = [l for l in err.splitlines() if l.startswith("arcompile: ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "engine"
    arcompile.optimize(tm.nanogpt(), out, log=None)
    return out


def test_missing_model_file(capsys, tmp_path):
    code, _, err = run_cli(capsys, "optimize", str(tmp_path / "nope.pt"), "-o", str(tmp_path / "out"))
    assert code == 2
    assert "nope.pt" in one_line_error(err)
    assert not (tmp_path / "out").exists()


def test_not_a_model_file(capsys, tmp_path):
    bad = tmp_path / "notes.pt"
    bad.write_text("these are my notes, not a model\n")
    code, _, err = run_cli(capsys, "optimize", str(bad), "-o", str(tmp_path / "out"))
    assert code == 2 and "notes.pt" in one_line_error(err)
    assert not (tmp_path / "out").exists()


class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_payload_is_refused_and_creates_nothing(capsys, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "model.pt"
    evil.write_bytes(pickle.dumps(_Payload(str(marker))))
    code, _, err = run_cli(capsys, "optimize", str(evil), "-o", str(tmp_path / "out"))
    assert code == 2
    assert "pickle" in one_line_error(err).lower()
    assert not marker.exists()
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


class _WithOddOp(torch.nn.Module):
    def forward(self, x):
        return torch.special.bessel_j0(x)


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(32, 8)
        self.odd = _WithOddOp()

    def forward(self, ids):
        return self.odd(self.emb(ids))


def test_op_without_lowering_names_op_and_module(capsys, tmp_path):
    from arcompile.frontend.export import export_module

    archive = tmp_path / "odd.pt2"
    torch.export.save(export_module(_Model().eval(), vocab_size=32), archive)
    code, _, err = run_cli(capsys, "optimize", str(archive), "-o", str(tmp_path / "out"))
    line = one_line_error(err)
    assert code == 2
    assert "aten.special_bessel_j0" in line and "odd" in line
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd.pt2"]  # no staging folder left


def test_output_that_is_not_an_engine_is_never_overwritten(capsys, tmp_path):
    out = tmp_path / "important"
    out.mkdir()
    (out / "thesis.txt").write_text("keep me")
    archive = tmp_path / "m.pt2"
    from arcompile.frontend.export import export_module
    torch.export.save(export_module(tm.nanogpt(), vocab_size=tm.VOCAB), archive)
    code, _, err = run_cli(capsys, "optimize", str(archive), "-o", str(out))
    assert code == 2 and "not an arcompile engine" in one_line_error(err)
    assert (out / "thesis.txt").read_text() == "keep me"


def test_run_prints_tokens_and_streams(capsys, engine_dir):
    code, out, _ = run_cli(capsys, "run", str(engine_dir), "--prompt-ids", "1,2,3",
                           "--max-new-tokens", "5")
    assert code == 0
    tokens = [int(t) for t in out.strip().split(",")]
    assert tokens == arcompile.load(engine_dir).generate([1, 2, 3], max_new_tokens=5)
    code, out, _ = run_cli(capsys, "run", str(engine_dir), "--prompt-ids", "1,2,3",
                           "--max-new-tokens", "5", "--stream")
    assert code == 0 and [int(t) for t in out.strip().strip(",").split(",")] == tokens


def test_text_prompt_without_tokenizer_says_how(capsys, engine_dir):
    code, _, err = run_cli(capsys, "run", str(engine_dir), "--prompt", "hello")
    assert code == 2 and "no tokenizer" in one_line_error(err)


def _copy(engine_dir, tmp_path):
    import shutil
    dst = tmp_path / "copy"
    shutil.copytree(engine_dir, dst)
    return dst


def test_engine_with_missing_file(capsys, engine_dir, tmp_path):
    eng = _copy(engine_dir, tmp_path)
    (eng / "model.onnx.data").unlink()
    with pytest.raises(EngineError, match="model.onnx.data is missing"):
        arcompile.load(eng)
    code, _, err = run_cli(capsys, "run", str(eng), "--prompt-ids", "1")
    assert code == 2 and "missing" in one_line_error(err)


def test_engine_with_altered_file(engine_dir, tmp_path):
    eng = _copy(engine_dir, tmp_path)
    data = bytearray((eng / "model.onnx.data").read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    (eng / "model.onnx.data").write_bytes(bytes(data))
    with pytest.raises(EngineError, match="model.onnx.data was altered"):
        arcompile.load(eng)


def test_engine_with_newer_format_version(engine_dir, tmp_path):
    eng = _copy(engine_dir, tmp_path)
    manifest = json.loads((eng / "arcompile.json").read_text())
    manifest["format_version"] = 99
    (eng / "arcompile.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match="format version 99 is newer"):
        arcompile.load(eng)


def test_directory_that_is_not_an_engine(capsys, tmp_path):
    code, _, err = run_cli(capsys, "run", str(tmp_path), "--prompt-ids", "1")
    assert code == 2 and "not an arcompile engine directory" in one_line_error(err)


def test_prompt_beyond_maximum_context_is_refused(engine_dir, tmp_path):
    eng = _copy(engine_dir, tmp_path)
    manifest = json.loads((eng / "arcompile.json").read_text())
    manifest["config"]["max_position_embeddings"] = 8
    (eng / "arcompile.json").write_text(json.dumps(manifest))
    with pytest.raises(arcompile.ArcompileError, match="exceeds the engine's maximum context of 8"):
        arcompile.load(eng).generate(list(range(6)), max_new_tokens=4)


def test_debug_shows_the_traceback(tmp_path):
    cmd = [sys.executable, "-m", "arcompile", "--debug", "run", str(tmp_path), "--prompt-ids", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr
    cmd.remove("--debug")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_inspect_an_engine_and_a_model(capsys, engine_dir, tmp_path):
    code, out, _ = run_cli(capsys, "inspect", str(engine_dir))
    assert code == 0
    assert "runtime onnxruntime-cpu" in out and "input: idx int64['B', 'T']" in out
    assert "remove_noops" in out and "ONNX ops" in out
    from arcompile.frontend.export import export_module
    archive = tmp_path / "nano.pt2"
    torch.export.save(export_module(tm.nanogpt(), vocab_size=tm.VOCAB), archive)
    code, out, _ = run_cli(capsys, "inspect", str(archive), "--limit", "5")
    assert code == 0
    assert "(%idx: i64[B, T]) -> (" in out
    assert "aten.embedding(weight=" in out and "# ... " in out


class _Bidirectional(torch.nn.Module):
    """Attention with no causal mask: fuse_attention must leave it and say why."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(32, 16)

    def forward(self, ids):
        x = self.emb(ids).unsqueeze(1)  # (B, 1, T, 16)
        y = torch.nn.functional.scaled_dot_product_attention(x, x, x)
        return y.squeeze(1)


def test_optimize_explains_what_a_pass_did_not_rewrite(capsys, tmp_path):
    from arcompile.frontend.export import export_module

    archive = tmp_path / "bidi.pt2"
    torch.export.save(export_module(_Bidirectional().eval(), vocab_size=32), archive)
    code, out, err = run_cli(capsys, "optimize", str(archive), "-o", str(tmp_path / "out"),
                             "--explain")
    assert code == 0
    assert "fuse_attention" in err and "1 not applied" in err
    assert any(l.startswith("fuse_attention: ") and "not fused" in l for l in out.splitlines())
