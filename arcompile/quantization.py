"""``optimize(..., quantize=...)``: weight quantization behind an accuracy gate.

Quantization changes the logits by design, so it cannot run under the pass manager's
max|Δlogit| check. It runs after the checked pipeline and the KV cache (``quantize_weights``
then DCE), and is held to a perplexity bound instead:

1. the graph's perplexity on held-out text (``heldtext.HELD``, 512 tokens; seeded random ids
   for a model without a tokenizer) in the reference interpreter, before and after;
2. if it rose by more than ``max_ppl_increase`` (default per mode: int8 1%, int4 8%),
   ``optimize`` stops with the figures and writes nothing;
3. after lowering, ONNX Runtime's perplexity on the same tokens must match the interpreter's
   within ``LOWERING_PPL_RTOL`` (with ``accuracy_level=4`` ORT rounds activations to int8 and
   ties can round differently, so logits are not compared element by element there) and
   must pass the same gate against the unquantized perplexity.

The figures (perplexities, increase, greedy agreement with the unquantized graph: the fraction
of positions where both pick the same next token) go into the manifest and the report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from arcompile.errors import ArcompileError

MODES = {"int8": 8, "int4": 4}
METHODS = ("rtn",)  # round-to-nearest; calibrated methods add their names here
DEFAULT_MAX_PPL_INCREASE = {"int8": 0.01, "int4": 0.08}
# int8: blocks of 32, not the pass's 128: ORT's fast path (accuracy_level 4) rounds the
# activations to int8 per block too, and on SmolLM2 blocks of 128 cost +1.2% perplexity
# against -0.1% (interpreter) / +0.2% (ORT) for 32
DEFAULT_GROUP_SIZE = {"int8": 32}
HELD_TOKENS = 512
LOWERING_PPL_RTOL = 0.02


def held_ids(tokenizer: Any, vocab: int, count: int = HELD_TOKENS) -> tuple[list[int], str]:
    if tokenizer is not None:
        from arcompile import heldtext

        return heldtext.token_ids(tokenizer, heldtext.HELD, count), "held-out pydoc_data text"
    gen = torch.Generator().manual_seed(7)
    return (torch.randint(0, vocab, (count,), generator=gen).tolist(),
            "seeded random token ids (no tokenizer)")


def graph_logits(graph, ids: list[int]) -> np.ndarray:
    """[T, V] logits of ``ids`` in the reference interpreter (a cached graph: empty cache)."""
    from arcompile.calibration import graph_inputs
    from arcompile.ir.interpreter import run_graph

    return run_graph(graph, graph_inputs(graph, ids))[0][0].float().numpy()


def quantize(graph, mode: str, group_size: int | None, max_ppl_increase: float | None,
             tokenizer: Any, vocab: int, say: Callable[[str], None], hooks: Sequence = (),
             method: str = "rtn", calibration_samples: int | None = None,
             max_tokens: int | None = None) -> tuple[list, dict]:
    """Run the mode's passes + DCE on ``graph`` behind the gate; (records, manifest entry).
    ``max_tokens``: the model's context, when shorter than the held-out text."""
    from arcompile.passes import PassManager, VerifyHook
    from arcompile.passes.dce import DeadCodeElimination
    from arcompile.profile_measure import perplexity

    if mode not in MODES:
        raise ArcompileError(f"--quantize {mode!r} is not available in this version "
                             f"(available: {', '.join(MODES)})")
    if method not in METHODS:
        raise ArcompileError(f"quantization method {method!r} is not one of "
                             f"{', '.join(METHODS)}")
    limit = DEFAULT_MAX_PPL_INCREASE[mode] if max_ppl_increase is None else max_ppl_increase
    try:
        passes = mode_passes(graph, mode, group_size, method, calibration_samples, tokenizer,
                             vocab, say)
    except ValueError as e:
        raise ArcompileError(str(e)) from None
    quantizer = passes[0]
    ids, text = held_ids(tokenizer, vocab, min(HELD_TOKENS, max_tokens or HELD_TOKENS))
    say(f"quantizing weights ({mode}), gated at +{limit:.1%} perplexity on {len(ids)} tokens "
        f"of {text}")
    before = graph_logits(graph, ids)
    records = PassManager([*passes, DeadCodeElimination()], [VerifyHook(), *hooks],
                          log=say).run(graph)
    after = graph_logits(graph, ids)
    ppl_before, ppl_after = perplexity(before, ids), perplexity(after, ids)
    increase = ppl_after / ppl_before - 1
    agreement = float(np.mean(before.argmax(-1) == after.argmax(-1)))
    say(f"  perplexity {ppl_before:.3f} -> {ppl_after:.3f} ({increase:+.2%}), greedy "
        f"agreement with the unquantized graph {agreement:.1%}")
    if not records[0].counts:
        raise ArcompileError(f"--quantize {mode}: no linear was quantized: "
                             + "; ".join(records[0].notes[:3]))
    if not increase <= limit:
        raise ArcompileError(
            f"--quantize {mode}: perplexity rose from {ppl_before:.3f} to {ppl_after:.3f} "
            f"({increase:+.2%}) on {len(ids)} tokens of {text}, beyond --max-ppl-increase "
            f"{limit:.2%} (greedy agreement {agreement:.1%}); nothing was written. Try int8, "
            f"a smaller --group-size, or allow more with --max-ppl-increase")
    return records, {"mode": mode, "settings": quantizer.settings(), "text": text,
                     "tokens": len(ids), "perplexity_unquantized": ppl_before,
                     "perplexity": ppl_after, "perplexity_increase": increase,
                     "max_ppl_increase": limit, "greedy_agreement": agreement,
                     "_ids": ids}


def mode_passes(graph, mode: str, group_size: int | None, method: str,
                calibration_samples: int | None, tokenizer: Any, vocab: int,
                say: Callable[[str], None]) -> list:
    """The passes that quantize ``graph`` for ``mode`` / ``method``; the first one's
    ``settings()`` go into the manifest. A ValueError says what setting is wrong."""
    from arcompile.passes.quantize_weights import QuantizeWeights

    return [QuantizeWeights(bits=MODES[mode], block_size=group_size or DEFAULT_GROUP_SIZE.get(mode))]


def check_engine(folder: Path, info: dict) -> float:
    """ONNX Runtime's perplexity against the interpreter's; returns the relative gap."""
    from arcompile.engine import Engine
    from arcompile.profile_measure import perplexity

    ids = info["_ids"]
    eng = Engine(folder, check_hashes=False)
    got = perplexity(eng.logits([ids])[0], ids)
    gap = abs(got / info["perplexity"] - 1)
    if not gap <= LOWERING_PPL_RTOL:
        raise ArcompileError(f"the lowered quantized model's perplexity {got:.3f} differs from "
                             f"the IR's {info['perplexity']:.3f} by {gap:.1%}; this is a "
                             f"lowering bug")
    info["perplexity_onnxruntime"] = got
    increase = got / info["perplexity_unquantized"] - 1
    if not increase <= info["max_ppl_increase"]:  # the gate, on the engine that ships
        raise ArcompileError(
            f"--quantize {info['mode']}: the ONNX Runtime engine's perplexity rose from "
            f"{info['perplexity_unquantized']:.3f} to {got:.3f} ({increase:+.2%}), beyond "
            f"--max-ppl-increase {info['max_ppl_increase']:.2%}; nothing was written")
    return gap
