"""bench/suite.py's outputs: the machine it ran on, and the markdown table of its JSON.

The table is made from the JSON alone (``python bench/suite_report.py suite.json`` remakes
it), so the two cannot disagree.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = None
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])  # MemTotal comes first
        memory_gib = round(kib / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": memory_gib,
            "os": platform.platform(), "python": platform.python_version()}


def versions() -> dict:
    import onnxruntime
    import torch
    import transformers

    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True).stdout.strip()
        commit += " (with uncommitted changes)" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"arcompile_commit": commit, "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "transformers": transformers.__version__}


def _ms(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:.1f}" if x < 1000 else f"{x:,.0f}"


def _load_line(result: dict) -> str:
    loads = [x for pair in result.get("load_average_per_repeat", []) for x in pair]
    if not loads:
        return "Load average during the repeats: not recorded."
    line = (f"Load average (1 min) during the repeats: {min(loads):.1f} to {max(loads):.1f} "
            f"on {result['machine']['cores']} cores.")
    if max(loads) > result["threads"] + 1:  # this run itself keeps about `threads` busy
        line += (" Above the thread count: other processes shared the cores, and the slower "
                 "repeats show it (per-repeat figures and the best repeat are in the JSON).")
    return line


def _ppl(system: dict) -> str:
    if "perplexity" not in system:
        return "—"
    change = system.get("perplexity_vs_arcompile_default")
    shown = change is not None and round(change, 3) != 0  # the baseline, or fp32 alike
    return f"{system['perplexity']:.2f}" + (f" ({change:+.1%})" if shown else "")


def markdown(result: dict) -> str:
    contexts = [str(c) for c in result["contexts"]]
    pre = str(result["prefill_context"])
    m = result["machine"]
    lines = [
        f"# {result['model']}: decode on CPU, one run of `make bench`",
        "",
        f"{result['date']} · {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB · "
        f"{result['threads']} threads for every system · "
        f"arcompile {result['versions']['arcompile_commit']}",
        "",
        f"Same prompts for all (text from `pydoc_data.topics`), greedy, {result['new_tokens']} new "
        f"tokens ({result['uncached_new_tokens']} for the uncached systems); each figure is the "
        f"median over {result['repeats']} repeats of the median step, systems alternated "
        "within every repeat. Decode excludes the prefill. Ratios are the figures to read; "
        "absolute times drift on shared machines.",
        "",
        _load_line(result),
        "",
        "| System | Precision | Prefill ms, T=" + pre + " | "
        + " | ".join(f"Decode ms/token, ctx {c}" for c in contexts)
        + " | Decode time ÷ arcompile default's (" + " / ".join(contexts) + ")"
        + " | Same greedy tokens as eager (" + " / ".join(contexts) + ")"
        + " | Perplexity, held-out text (vs arcompile default) |",
        "|---|---|---:|" + "---:|" * len(contexts) + "---:|---:|---:|",
    ]
    notes = []
    for key, s in result["systems"].items():
        if s["status"] != "measured":
            lines.append(f"| {s['label']} | {s['precision']} | {s['status']}: {s['reason']} |"
                         + " — |" * (len(contexts) + 3))
            continue
        per = s["contexts"]
        ratio = s.get("decode_vs_arcompile_default") or {}
        lines.append(
            f"| {s['label']} | {s['precision']} | {_ms(per.get(pre, {}).get('first_token_ms'))} | "
            + " | ".join(_ms(per[c]["decode_ms_per_token"]) for c in contexts) + " | "
            + " / ".join(f"{ratio[c]:.2f}×" if c in ratio else "—" for c in contexts) + " | "
            + " / ".join(per[c].get("greedy_match_vs_eager", "—") for c in contexts) + " | "
            + _ppl(s) + " |")
        if s.get("note"):
            notes.append(f"- {s['label']}: {s['note']}")
    lines += ["", "Prefill is the time to the first new token (the prompt's forward pass and "
              "choosing one token), as each system's API gives it.",
              "Greedy tokens: the leading new tokens equal to transformers eager's, of those "
              "generated; 4-bit systems are expected to part from fp32 early.",
              "Perplexity: " + result.get("perplexity_text", "held-out text") + "; — where "
              "a system's API gives no logits (the JSON says why).", ""]
    paired = [_paired_line(s, result["systems"], contexts)
              for s in result["systems"].values() if s.get("faster_than_in_repeats")]
    if paired:
        lines += ["Paired repeats (the systems alternate within each repeat; ctx "
                  + " / ".join(contexts) + "):", *paired, ""]
    if notes:
        lines += ["Notes:", *notes, ""]
    return "\n".join(lines)


def _paired_line(system: dict, systems: dict, contexts: list[str]) -> str:
    parts = [f"{systems[peer]['label']} in "
             + " / ".join(wins.get(c, "—") for c in contexts)
             for peer, wins in system["faster_than_in_repeats"].items()]
    return f"- {system['label']}: decoded faster than " + "; than ".join(parts) + " repeats"


if __name__ == "__main__":
    print(markdown(json.loads(Path(sys.argv[1]).read_text())))
