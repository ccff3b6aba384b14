"""``arcompile inspect``: the IR of a model, or the summary of an engine directory."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable

from arcompile.compiler import self_draft, uncached
from arcompile.frontend.from_export import from_exported_program
from arcompile.frontend.load import load_model
from arcompile.ir.printer import print_graph
from arcompile.passes import PassManager, VerifyHook, build_pipeline
from arcompile.runtimes.engine_dir import is_engine_dir, read_manifest


def inspect_path(target: str | Path, show_constants: bool = False, limit: int | None = None,
                 passes: str = "none", log: Callable[[str], None] | None = None) -> str:
    if Path(target).is_dir() and is_engine_dir(Path(target)):
        return describe_engine(Path(target))
    loaded = load_model(str(target), log=log or (lambda _m: None))
    graph = from_exported_program(loaded.program, name=loaded.config.get("name") or "model")
    PassManager(build_pipeline(passes), [VerifyHook()], log=log).run(graph)
    return print_graph(graph, show_constants=show_constants, limit=limit)


def describe_engine(path: Path) -> str:
    import onnx

    m = read_manifest(path)
    lines = [f"engine {path}  (format {m['format_version']}, runtime {m.get('runtime')})"]
    src = m.get("source", {})
    lines.append(f"  source: {src.get('kind')} {src.get('path')}  sha256 {str(src.get('sha256'))[:16]}…")
    lines.append(f"  {uncached.describe(m)}")
    for kind in ("inputs", "outputs"):
        for io in m.get(kind, []):
            lines.append(f"  {kind[:-1]}: {io['name']} {io['dtype']}{io['shape']}")
    lines.append("  passes:")
    for p in m.get("passes", []):
        rules = ", ".join(f"{k}={v}" for k, v in p["counts"].items() if v) or "no change"
        lines.append(f"    {p['name']:<18} {p['nodes_before']} -> {p['nodes_after']} nodes  {rules}")
    if m.get("self_draft"):
        lines.append(f"  self-draft: {self_draft.describe(m['self_draft'])}")
    total = sum(f["bytes"] for f in m.get("files", {}).values())
    lines.append(f"  files: {len(m.get('files', {}))}, {total / 1e6:.1f} MB")
    model = onnx.load(str(path / m["model_file"]), load_external_data=False)
    ops = Counter(n.op_type for n in model.graph.node)
    lines.append(f"  ONNX ops ({sum(ops.values())}): " +
                 ", ".join(f"{k} {v}" for k, v in ops.most_common()))
    return "\n".join(lines)
