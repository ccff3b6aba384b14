"""The report of ``arcompile profile``: a terminal table, the same numbers as JSON, a chart.

The table is computed from the report dict alone, so the JSON and the table cannot disagree.
"""

from __future__ import annotations

import json
from pathlib import Path

from arcompile.errors import ArcompileError

# (header, row key, format); None prints as "-"
COLUMNS = [
    ("pass", "pass", "{}"),
    ("nodes", "nodes", "{:d}"),
    ("compile s", "compile_s", "{:.2f}"),
    ("cache", "kv_cache", "{}"),
    ("prefill ms", "prefill_ms", "{:.1f}"),
    ("decode p50", "decode_ms_p50", "{:.1f}"),
    ("decode p90", "decode_ms_p90", "{:.1f}"),
    ("peak MB", "peak_rss_mb", "{:.0f}"),
    ("engine MB", "engine_mb", "{:.1f}"),
    ("max|Δlogit|", "max_abs_logit_diff", "{:.2g}"),
    ("agree", "greedy_agreement", "{:.3f}"),
    ("same prefix", "greedy_identical_prefix", "{:d}"),
    ("ppl", "perplexity", "{:.3f}"),
]
# the cached rows' other decoding modes (``profile_measure.decoding_modes``): greedy tokens/s
# plain, speculative (acceptance rate, tokens equal to plain greedy's) and lossy layer skip
MODE_COLUMNS = [
    ("pass", "pass", "{}"),
    ("plain tok/s", "plain_tokens_per_s", "{:.1f}"),
    ("ngram tok/s", "spec_ngram_tokens_per_s", "{:.1f}"),
    ("ngram accept", "spec_ngram_acceptance", "{:.2f}"),
    ("ngram same", "spec_ngram_identical", "{}"),
    ("self tok/s", "spec_self_tokens_per_s", "{:.1f}"),
    ("self accept", "spec_self_acceptance", "{:.2f}"),
    ("self same", "spec_self_identical", "{}"),
    ("skip blocks", "skip_blocks", "{:d}"),
    ("skip tok/s", "skip_tokens_per_s", "{:.1f}"),
    ("skip ppl", "skip_perplexity", "{:.3f}"),
]


def format_table(report: dict) -> str:
    """The rows as an aligned text table, with the settings and the reference above it."""
    s = report["settings"]
    head = [f"profile of {report['model']} ({report['source']})",
            f"prompts: {s['prompt_tokens']} tokens; decode: {s['decode_tokens']} tokens "
            f"(ms/token); agreement: {s['agreement_tokens']} greedy tokens; perplexity: "
            f"{s['held_tokens']} held-out tokens; text: {report['text']}",
            f"reference: {report['reference']['system']}, perplexity "
            f"{report['reference']['perplexity']:.3f}"]
    if report.get("kv_cache_refused"):
        head.append(f"kv cache refused: {report['kv_cache_refused']}")
    return "\n".join(head + [""] + _table(COLUMNS, report["rows"]))


def format_modes(report: dict) -> str:
    """The cached rows' decoding modes as a second table ("" when no row has them)."""
    modes = [r for r in report["rows"] if "plain_tokens_per_s" in r]
    if not modes:
        return ""
    return "\n".join(["decoding modes (greedy, the same prompt; tokens/s include the "
                      "prefill):"] + _table(MODE_COLUMNS, modes))


def _table(columns: list, rows: list[dict]) -> list[str]:
    cells = [[h for h, _, _ in columns]]
    for row in rows:
        cells.append([_cell(row.get(key), fmt) for _, key, fmt in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def _cell(value, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return fmt.format(value)


def write_json(report: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(report, indent=2) + "\n")


def plot(report: dict, path: str | Path) -> None:
    """A PNG: latency per pass above (log scale: recomputation and cached decode differ
    tenfold), accuracy per pass below (max |Δlogit| and perplexity against the reference)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ArcompileError("--plot needs matplotlib: pip install 'arcompile[profile]'") from None
    rows = report["rows"]
    names = [r["pass"] for r in rows]
    x = list(range(len(rows)))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(8, 0.8 * len(rows) + 3), 8),
                                      sharex=True)
    for key, label in (("prefill_ms", f"prefill ({report['settings']['prompt_tokens']} "
                                      "tokens), ms"),
                       ("decode_ms_p50", "decode, ms/token (p50)"),
                       ("decode_ms_p90", "decode, ms/token (p90)")):
        top.plot(x, [r.get(key) for r in rows], marker="o", label=label)
    top.set_yscale("log")
    top.set_ylabel("milliseconds (log)")
    top.grid(True, which="both", alpha=0.3)
    top.legend()
    top.set_title(f"arcompile profile: {report['model']} — after each pass "
                  f"({report['created']})")

    diffs = [max(r["max_abs_logit_diff"], 1e-9) for r in rows]
    bottom.plot(x, diffs, marker="s", color="tab:red", label="max |Δlogit| vs reference")
    bottom.set_yscale("log")
    bottom.set_ylabel("max |Δlogit| (log)", color="tab:red")
    bottom.grid(True, which="both", alpha=0.3)
    ppl = bottom.twinx()
    ppl.plot(x, [r["perplexity"] for r in rows], marker="^", color="tab:green",
             label="perplexity")
    ppl.axhline(report["reference"]["perplexity"], color="tab:green", linestyle=":",
                label="reference perplexity")
    ppl.set_ylabel("perplexity (held-out text)", color="tab:green")
    # at least ±2% around the reference, so float noise does not look like a swing
    values = [r["perplexity"] for r in rows] + [report["reference"]["perplexity"]]
    low, high = min(values), max(values)
    ppl.set_ylim(min(low, 0.98 * report["reference"]["perplexity"]) * 0.99,
                 max(high, 1.02 * report["reference"]["perplexity"]) * 1.01)
    ppl.ticklabel_format(axis="y", useOffset=False, style="plain")
    handles = bottom.get_legend_handles_labels()
    more = ppl.get_legend_handles_labels()
    bottom.legend(handles[0] + more[0], handles[1] + more[1], loc="best")
    bottom.set_xticks(x)
    bottom.set_xticklabels(names, rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)
    plt.close(fig)
