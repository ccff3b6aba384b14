"""``arcompile profile`` on a tiny model: a row before the first pass and after every pass
(the KV cache included), every field measured, accuracy against eager PyTorch, and the JSON,
the table and the chart telling the same story."""

from __future__ import annotations

import json

import pytest
import tiny_models as tm

from arcompile.cli.main import main
from arcompile.cli.profile_measure import peak_rss_mb
from arcompile.cli.profile_report import COLUMNS, format_table
from arcompile.cli.profiling import profile
from arcompile.errors import ArcompileError
from arcompile.passes import build_pipeline

SMALL = ["--prompt-tokens", "12", "--decode-tokens", "6", "--agreement-tokens", "6",
         "--held-tokens", "24", "--repeats", "1", "--threads", "1"]
FIELDS = ["nodes", "compile_s", "prefill_ms", "decode_ms_p50", "decode_ms_p90", "peak_rss_mb",
          "engine_mb", "max_abs_logit_diff", "greedy_agreement", "greedy_identical_prefix",
          "perplexity"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The CLI on a TorchScript GPT-2 (no eager module in the file: the reference is the
    traced graph in the interpreter) with --json and --plot; (report, stdout, folder)."""
    folder = tmp_path_factory.mktemp("profile")
    source = tm.trace_torchscript(tm.gpt2(), folder / "gpt2.pt")
    code = main(["profile", str(source), "--json", str(folder / "p.json"),
                 "--plot", str(folder / "p.png"), "-o", str(folder / "engine"), *SMALL])
    assert code == 0
    return json.loads((folder / "p.json").read_text()), folder


def test_a_row_before_the_first_pass_and_after_every_pass(run):
    report, _ = run
    names = [r["pass"] for r in report["rows"]]
    pipeline = [p.name for p in build_pipeline("default")]
    assert names == ["traced", *pipeline, "insert_kv_cache", "dce", "pack_attention", "dce"]
    assert [r["kv_cache"] for r in report["rows"]] == [False] * (len(pipeline) + 1) + [True] * 4
    for row in report["rows"]:
        for field in FIELDS:
            assert isinstance(row[field], (int, float)) and row[field] >= 0, (row["pass"], field)
        assert row["decode_ms_p90"] >= row["decode_ms_p50"]
    # each row's peak memory is its own measuring process's, not this (larger) one's, which
    # a forked child's ru_maxrss would report
    assert all(row["peak_rss_mb"] < peak_rss_mb() for row in report["rows"])
    # the fusions and DCE shrink the graph; the cache pass adds its inputs and position ops
    assert report["rows"][-3]["nodes"] < report["rows"][0]["nodes"]


def test_accuracy_against_the_reference(run):
    report, _ = run
    assert "reference interpreter" in report["reference"]["system"]
    assert report["text"].startswith("seeded random token ids")
    ref = report["reference"]["perplexity"]
    for row in report["rows"]:
        assert row["max_abs_logit_diff"] <= 1e-4, row["pass"]
        assert row["greedy_agreement"] == 1.0 and row["greedy_identical_prefix"] == 6
        assert abs(row["perplexity"] - ref) <= 1e-4 * ref, row["pass"]


def test_json_matches_the_table_and_the_chart_is_a_png(run, capsys):
    report, folder = run
    table = format_table(report).splitlines()
    header = table.index(next(line for line in table if line.startswith("pass ")))
    rows = table[header + 2:]
    assert len(rows) == len(report["rows"])
    for line, row in zip(rows, report["rows"]):
        cells = line.split()
        assert cells[0] == row["pass"] and int(cells[1]) == row["nodes"]
        assert cells[[h for h, _, _ in COLUMNS].index("ppl")] == f"{row['perplexity']:.3f}"
        assert float(cells[4]) == pytest.approx(row["prefill_ms"], abs=0.051)
    png = (folder / "p.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert (folder / "engine" / "arcompile.json").is_file()  # -o keeps the final engine


def test_bad_settings_are_clear_errors(tmp_path):
    with pytest.raises(ArcompileError, match="decode_tokens must be at least 2"):
        profile(tm.nanogpt(), decode_tokens=1, log=None)
    assert main(["profile", "missing.pt", "--json", str(tmp_path / "x.json")]) == 2
    assert not (tmp_path / "x.json").exists()


def test_cli_profile_takes_the_quantization_and_skip_options(tmp_path, capsys):
    """`profile --quantize int8 --kv-cache-dtype int8 --skip 0.5`: the quantizing passes and
    the routing get rows of their own, the gate's figures go into the report, and the
    decoding-modes table measures the lossy and self-speculative modes."""
    source = tm.trace_torchscript(tm.gpt2(), tmp_path / "gpt2.pt")
    code = main(["profile", str(source), "--json", str(tmp_path / "p.json"), "--quantize",
                 "int8", "--kv-cache-dtype", "int8", "--skip", "0.5", *SMALL])
    assert code == 0
    report = json.loads((tmp_path / "p.json").read_text())
    names = [r["pass"] for r in report["rows"]]
    assert names[-4:] == ["skip_ffn", "quantize_weights", "dce", "quantize_kv_cache"]
    q = report["quantization"]
    assert q["mode"] == "int8" and 0 <= q["greedy_agreement"] <= 1 and q["perplexity"] > 0
    assert q["kv_cache"]["kv_cache_dtype"] == "int8"
    last = report["rows"][-1]
    assert last["spec_self_identical"] is True and last["skip_blocks"] == 1
    assert "self tok/s" in capsys.readouterr().out


def test_learned_position_table_caps_the_context(tmp_path):
    """A TorchScript GPT-2 carries no config: its 128-row position table bounds the engine's
    context, and asking for more is refused."""
    import arcompile

    source = tm.trace_torchscript(tm.gpt2(), tmp_path / "gpt2.pt")
    report = arcompile.optimize(str(source), tmp_path / "e", log=None)
    assert report.manifest["kv_cache"]["max_context"] == 128
    with pytest.raises(ArcompileError, match="beyond the model's 128 positions"):
        arcompile.optimize(str(source), tmp_path / "f", max_context=256, log=None)
    assert not (tmp_path / "f").exists()
