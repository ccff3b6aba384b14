"""The self-draft: a quantized copy of the engine's own model that drafts for
``speculative="self"``.

``optimize(..., self_draft="int4")`` (``--self-draft int4``) writes a second engine inside the
engine folder, at ``draft/``: the graph being optimized, copied once the KV cache is in and
before layer-skip routing and the engine's own quantization, its weights quantized by
round-to-nearest (no calibration; ``int4`` or ``int8``). Its cache has the engine's layout,
so it drafts into the same buffers, and the full engine verifies every draft, so greedy output
stays the full engine's (``speculative.py``). Its accuracy decides only how many drafts are
accepted, so it is held to a loose gate of its own (``MAX_PPL_INCREASE``, not
``--max-ppl-increase``): a drafter that would lose most drafts fails the build instead of
slowing every decode.

Why it exists: drafting with feed-forward blocks skipped saves too little per step on a small
model (each skipped-block draft costs ~0.9 of a full step on SmolLM2, so it stays below plain
greedy), while an int4 step reads about a third of the fp32 weights and agrees with them on
~98% of greedy tokens (bench/results/speculative.json).

The engine's manifest names it (``self_draft``: folder, mode, perplexity, greedy agreement),
and its files are in the engine's file list, so loading checks them as it checks the rest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from arcompile.compiler import quantization
from arcompile.compiler.options import TransformOptions
from arcompile.compiler.write_engine import write_engine
from arcompile.errors import ArcompileError
from arcompile.runtimes.engine_dir import DRAFT_FOLDER

MODES = ("int8", "int4")
# the draft's perplexity on held-out text may rise by at most this against the model's: RTN
# int4 on SmolLM2 is within 1%, a broken draft is off by multiples
MAX_PPL_INCREASE = 0.5
# weight bits per mode, to refuse a draft no cheaper than the engine (w8a8: 8-bit weights)
_BITS = {None: 32, "w8a8": 8, "int8": 8, "int4": 4}


def check_options(self_draft: str | None, quantize: str | None, kv_cache: bool,
                  kv_cache_dtype: str | None) -> None:
    """ArcompileError when ``self_draft`` cannot go with the rest of optimize's options."""
    if self_draft is None:
        return
    if self_draft not in MODES:
        raise ArcompileError(f"self_draft {self_draft!r} is not one of {', '.join(MODES)}")
    if not kv_cache:
        raise ArcompileError("--self-draft drafts into the engine's KV cache; it cannot go "
                             "with --no-kv-cache")
    if kv_cache_dtype == "int8":
        raise ArcompileError("--self-draft with --kv-cache-dtype int8 is not supported: the "
                             "draft would read the cache with scales calibrated on another "
                             "graph; keep the float cache")
    if _BITS[self_draft] >= _BITS.get(quantize, 32):
        raise ArcompileError(f"--self-draft {self_draft} would be no cheaper than the engine "
                             f"itself (--quantize {quantize}); draft with fewer bits "
                             f"(--self-draft int4) or drop it")


def writer(graph, mode: str, tokenizer: Any, vocab: int, loaded, say: Callable[[str], None],
           max_tokens: int | None = None) -> Callable[[Path], dict]:
    """Copy ``graph`` as it stands now (it is left as it is); return ``write(engine_folder)``,
    which quantizes the copy, writes it as an engine at ``engine_folder / DRAFT_FOLDER`` and returns
    the manifest's ``self_draft`` entry (``write_engine``'s ``nested``)."""
    work = graph.copy()  # shares the weight tensors, which quantizing never changes

    def write(engine_folder: Path) -> dict:
        def note(msg: str) -> None:
            say(f"  [self-draft] {msg.strip()}")

        say(f"self-draft: a copy of the model with {mode} weights (rtn), to draft for "
            f"speculative='self'")
        try:
            options = TransformOptions(quantize=mode, quant_method="rtn",
                                       max_ppl_increase=MAX_PPL_INCREASE)
            records, info = quantization.quantize(work, options, tokenizer, vocab, note,
                                                  max_tokens=max_tokens)
        except ArcompileError as e:
            raise ArcompileError(f"--self-draft {mode} (gated at +{MAX_PPL_INCREASE:.0%} "
                                 f"perplexity, not --max-ppl-increase): {e}") from None

        def check(folder: Path) -> None:  # ORT's perplexity against the IR's, as for any engine
            quantization.check_engine(folder, info)
            info.pop("_ids", None)

        write_engine(work, Path(engine_folder) / DRAFT_FOLDER, loaded, records, log=note,
                     extra={"quantization": info, "self_draft_of": "the engine one folder up"},
                     validate=check)
        entry = {"folder": DRAFT_FOLDER, "mode": mode, "method": "rtn",
                 "built_from": "the model with its KV cache, before layer-skip routing and "
                               "the engine's own quantization",
                 "perplexity_model": info["perplexity_unquantized"],
                 "perplexity": info["perplexity_onnxruntime"],
                 "greedy_agreement": info["greedy_agreement"],
                 "max_ppl_increase": MAX_PPL_INCREASE}
        note(f"perplexity {entry['perplexity_model']:.3f} -> {entry['perplexity']:.3f} (ONNX "
             f"Runtime), greedy agreement {entry['greedy_agreement']:.1%}")
        return {"self_draft": entry}
    return write


def describe(entry: dict) -> str:
    """One line for ``optimize``'s summary and ``inspect``."""
    return (f"{entry['mode']} ({entry['method']}) in {entry['folder']}/, perplexity "
            f"{entry['perplexity_model']:.3f} -> {entry['perplexity']:.3f}, greedy agreement "
            f"{entry['greedy_agreement']:.1%}; drafts for --speculative self")
