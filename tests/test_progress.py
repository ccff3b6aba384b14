"""Progress reporting: bars only on a terminal, one plain line per step in a pipe or CI (no
control characters), nothing but errors and the final path with --quiet."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# C0 controls but newline and tab, DEL, C1 controls (ESC starts every terminal sequence)
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    import tiny_models as tm
    import torch

    from arcompile.frontend.export import export_module

    path = tmp_path_factory.mktemp("progress") / "llama.pt2"
    torch.export.save(export_module(tm.llama(), vocab_size=tm.VOCAB), path)
    return path


def _env(**more: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    return {**env, "PYTHONPATH": str(ROOT), **more}


def _optimize(*argv: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "arcompile", "optimize", *argv],
                          capture_output=True, text=True, env=_env(**env), timeout=300)


def test_piped_output_has_no_control_characters(archive, tmp_path):
    out = tmp_path / "engine"
    proc = _optimize(str(archive), "-o", str(out), "--quantize", "int8")
    assert proc.returncode == 0, proc.stderr
    assert not CONTROL.search(proc.stdout) and not CONTROL.search(proc.stderr)
    steps = [line for line in proc.stderr.splitlines() if line.lstrip().startswith("done: ")]
    for name in ("loading llama.pt2", "converting to IR", "lowering to ONNX",
                 "perplexity forward", "ONNX Runtime perplexity"):
        assert any(name in line for line in steps), (name, steps)
    assert all(re.search(r"(: | in )\d+\.\d s", line) for line in steps)  # how long each took
    # the pass manager's own line is each pass's line: no second one per pass
    assert not any("pass fuse_norms" in line for line in steps)
    assert any(line.startswith("  fuse_norms ") for line in proc.stderr.splitlines())
    # the figures on stdout as before, for scripts
    assert proc.stdout.splitlines()[-1].startswith(f"engine: {out}")
    assert "kv cache: on (2 layers)" in proc.stdout and "quantization: int8" in proc.stdout


def test_quiet_prints_only_the_final_path(archive, tmp_path):
    out = tmp_path / "engine"
    proc = _optimize(str(archive), "-o", str(out), "--quiet")
    assert proc.returncode == 0
    assert proc.stdout == f"{out}\n" and proc.stderr == ""
    assert (out / "arcompile.json").is_file()


def test_quiet_still_prints_errors(archive, tmp_path):
    out = tmp_path / "engine"
    out.mkdir()
    (out / "precious.txt").write_text("not an engine")
    proc = _optimize(str(archive), "-o", str(out), "-q")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("arcompile: error: ")


def test_terminal_gets_bars_and_a_summary_table(archive, tmp_path):
    """In a pseudo-terminal: rich's live display (cursor sequences), the finished steps'
    lines, and the figures as tables. With CI set, the same terminal gets plain lines."""
    pexpect = pytest.importorskip("pexpect")

    def run(out: Path, **env: str) -> str:
        child = pexpect.spawn(sys.executable, ["-m", "arcompile", "optimize", str(archive),
                                               "-o", str(out)],
                              env=_env(TERM="xterm", **env), encoding="utf-8", timeout=300,
                              dimensions=(50, 140))
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0, child.before
        return child.before

    shown = run(tmp_path / "tty")
    assert "\x1b[" in shown  # the live display
    plain = CONTROL.sub("", re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown))
    assert "✓ loading llama.pt2" in plain and "✓ lowering to ONNX, writing weights" in plain
    assert re.search(r"passes\s", plain) and re.search(r"fuse_attention\s+\d+ → \d+", plain)
    assert re.search(r"engine\s+" + re.escape(str(tmp_path / "tty")), plain)
    assert "slowest steps" in plain

    ci = run(tmp_path / "ci", CI="true")
    assert "\x1b" not in ci and "done: loading llama.pt2" in ci
    assert f"engine: {tmp_path / 'ci'}" in ci


def test_reporters_through_the_narrow_interface():
    from arcompile import progress

    stream = io.StringIO()
    with progress.reporting(progress.for_stream(stream=stream)) as reporter:
        assert isinstance(reporter, progress.PlainReporter)  # a StringIO is no terminal
        progress.log("a message")
        with progress.step("outer"):
            assert list(progress.track(range(3), "inner", unit="seq")) == [0, 1, 2]
        with progress.step("hidden", echo=False):
            pass
    lines = stream.getvalue().splitlines()
    assert lines[0] == "a message"
    assert re.fullmatch(r"  done: inner: 3/3 seq in \d+\.\d s( \(.* (seq/s|s/seq)\))?", lines[1])
    assert re.fullmatch(r"done: outer: \d+\.\d s", lines[2]) and len(lines) == 3
    assert [s.name for s in reporter.finished] == ["inner", "outer", "hidden"]

    quiet = io.StringIO()
    with progress.reporting(progress.for_stream(quiet=True, stream=quiet)):
        progress.log("not shown")
        list(progress.track([1], "nor this"))
    assert quiet.getvalue() == ""


def test_a_failed_pass_leaves_no_step_open():
    """The pass hook's step ends even when the pass fails (it never reaches ``after``)."""
    from arcompile import progress
    from arcompile.errors import PassError
    from arcompile.passes.base import Pass
    from arcompile.passes.manager import PassManager

    class Broken(Pass):
        name = "broken"

        def run(self, graph):
            raise ValueError("no")

    stream = io.StringIO()
    with progress.reporting(progress.PlainReporter(stream)) as reporter:
        manager = PassManager([Broken()])
        for _ in range(2):
            with pytest.raises(PassError):
                manager.run([])  # a graph is only measured (len) before a pass
        assert len(reporter._open) == 1  # the second failure's, closed by the next pass
    assert stream.getvalue() == ""  # passes leave no "done:" line: the manager logs them
