"""What arcompile says when an engine has no KV cache, so losing it never goes unnoticed.

``--kv-cache auto`` (the default) writes the uncached engine when ``insert_kv_cache`` refuses;
``optimize`` then ends with ``warning_block`` on stderr when the model may have causal
attention (a model whose attention is provably bidirectional cannot have a cache: no block).
``require`` fails instead and writes nothing; ``off`` never tries. ``inspect`` and ``run``
show ``describe`` of the manifest.
"""

from __future__ import annotations

from typing import Any

from arcompile.errors import ArcompileError

KV_CACHE_MODES = ("auto", "require", "off")

# measured by `make bench` (README, "Benchmarks"): SmolLM2 uncached against cached decoding
SLOWDOWN = "about 7x slower at context 128 and 57x at 1024 on SmolLM2"


class UncachedEngineWarning(UserWarning):
    """``optimize(kv_cache="auto")`` wrote an engine without a KV cache; the message says why."""


def kv_cache_mode(value: Any) -> str:
    """``optimize(kv_cache=)``: one of KV_CACHE_MODES, or True (auto) / False (off)."""
    if value is True:
        return "auto"
    if value is False or value is None:
        return "off"
    if isinstance(value, str) and value in KV_CACHE_MODES:
        return value
    raise ArcompileError(f"kv_cache must be one of {', '.join(KV_CACHE_MODES)} (or True/False), "
                         f"got {value!r}")


def may_be_causal(graph) -> bool:
    """False only when every attention in ``graph`` is provably bidirectional: fused and not
    causal, or an sdpa with neither a mask nor ``is_causal``. A graph with no attention at
    all has nothing to cache either."""
    for node in graph.nodes():
        if node.op in ("arc.attention", "arc.attention_cached"):
            if node.attrs.get("causal", False):
                return True
        elif node.op == "aten.scaled_dot_product_attention":
            if node.arg("is_causal", False) or node.arg("attn_mask") is not None:
                return True
        elif node.op in ("aten._softmax", "aten.softmax.int", "aten._safe_softmax",
                         "aten.softmax"):
            return True  # decomposed attention whose mask no pass proved: it may be causal
    return False


def warning_block(reason: str) -> str:
    """The lines ``optimize`` ends with when it wrote an uncached engine (``--kv-cache auto``)."""
    return "\n".join([
        "",
        "warning: the engine was written WITHOUT a KV cache.",
        f"  why:    {reason}",
        "  cost:   every new token recomputes the whole prompt and all tokens so far, so",
        f"          decoding slows with the context: {SLOWDOWN}.",
        "  next:   `arcompile optimize ... --explain` lists every pass's refusals;",
        "          `--kv-cache require` makes this an error (exit 2, nothing written);",
        "          `--kv-cache off` (or --no-kv-cache) asks for an uncached engine and",
        "          silences this warning. If the model has causal attention that arcompile",
        "          should have cached, please report it with the `why` line above.",
        "",
    ])


def describe(manifest: dict) -> str:
    """One line for ``inspect`` and ``run``: the engine's cache, or that it has none."""
    layout = manifest.get("kv_cache")
    if layout:
        runtime = layout.get("runtime_cache", "concat")
        return (f"KV cache: on ({layout.get('layers')} layers, {runtime}, max context "
                f"{layout.get('max_context', '?')})")
    why = manifest.get("kv_cache_refused")
    return ("KV cache: none, UNCACHED engine: every token recomputes the whole prefix"
            + (f" ({why})" if why else " (optimized with --kv-cache off)"))
