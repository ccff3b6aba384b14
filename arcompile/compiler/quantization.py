"""``optimize(..., quantize=...)``: weight quantization behind an accuracy gate.

Quantization changes the logits by design, so it cannot run under the pass manager's
max|Δlogit| check. It runs after the checked pipeline and the KV cache (``quantize_weights``
then DCE), and is held to a perplexity bound instead:

1. the graph's perplexity on held-out text (``heldtext.HELD``, 512 tokens; seeded random ids
   for a model without a tokenizer) in the reference interpreter, before and after;
2. if it rose by more than ``max_ppl_increase`` (default per mode: int8 1%, int4 8%, w8a8 3%),
   ``optimize`` stops with the figures and writes nothing;
3. after lowering, ONNX Runtime's perplexity on the same tokens must match the interpreter's
   within ``LOWERING_PPL_RTOL`` (with ``accuracy_level=4`` ORT rounds activations to int8 and
   ties can round differently, so logits are not compared element by element there) and
   must pass the same gate against the unquantized perplexity.

The figures (perplexities, increase, greedy agreement with the unquantized graph: the fraction
of positions where both pick the same next token) go into the manifest and the report.

int8 / int4 (``weight_only_passes``): ``QuantizeWeights`` with the mode's width and group
size, a method (``DEFAULT_METHOD``: int4 GPTQ with MatMulNBits' integer zero point, int8
round-to-nearest), and the LM head in its own width (``DEFAULT_LM_HEAD``; ``lm_head="fp32"``
keeps it in float; the embedding lookup reads the head's quantized table where the two are
tied, unless ``embedding="fp32"``). GPTQ calibrates on
``calibration_samples`` sequences (default ``GPTQ_SAMPLES``) of ``heldtext.CALIBRATION``
text, never the held-out text the gate measures; the log and the manifest's ``seconds`` say
how long calibration and quantization took. The manifest's ``settings`` record the method,
zero point, LM head format and calibration.

An int8 KV cache (``kv_cache_dtype="int8"``, ``passes/quantize_kv_cache.py``) joins the same
gate: its pass runs after the mode's (its scales are calibrated on the step that ships, on
``KV_CALIBRATION_SAMPLES`` sequences of calibration text), alone when no mode is asked for.
Its default bound is ``DEFAULT_KV_MAX_PPL_INCREASE``, added to the mode's when both run; the
manifest entry's ``kv_cache`` sub-entry holds its own figures (perplexity before and after
the cache alone, greedy agreement). The engine's perplexity is checked the same way: ORT
attends to the dequantized cache as the reference op does, a prompt at once and token by
token alike, so one prefill of the held-out tokens measures what decoding sees.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from arcompile import progress
from arcompile.compiler.options import TransformOptions
from arcompile.compiler.quant_fallback import fall_back
from arcompile.errors import ArcompileError
from arcompile.eval import calibration
from arcompile.eval.metrics import HELD_TOKENS, graph_logits, held_ids, perplexity
from arcompile.passes import PassManager, VerifyHook
from arcompile.passes.dce import DeadCodeElimination
from arcompile.passes.quantize_kv_cache import QuantizeKVCache
from arcompile.passes.quantize_w8a8 import QuantizeW8A8
from arcompile.passes.quantize_weights import QuantizeWeights
from arcompile.passes.smooth_quant import SmoothQuant
from arcompile.runtimes.onnxruntime.ops_arc_quant import META_KEY
from arcompile.runtimes.onnxruntime.ops_arc_quant_qdq import tensorrt_form_issues
from arcompile.serve.engine import Engine

MODES = {"int8": 8, "int4": 4, "w8a8": 8}  # w8a8: int8 activations too (static)
# rtn: round-to-nearest; gptq: error-corrected on calibration text (passes/quant_gptq.py)
METHODS = ("rtn", "gptq")
# the method when none is asked for (int4: see INT4_ZERO_POINT; int8 round-to-nearest is
# already within 0.1% on SmolLM2, nothing for a calibration to win)
DEFAULT_METHOD = {"int8": "rtn", "int4": "gptq", "w8a8": "rtn"}
# int4's zero point per method. SmolLM2 (from a Q4_1 GGUF), perplexity on the 512 held tokens
# in the interpreter at accuracy level 4 (the gate's figure; fp32 12.786), LM head fp32, GPTQ
# on 64 x 128 calibration tokens:
#
#   block   rtn, int zero   gptq, int zero   rtn, float min   gptq, float min
#   32      16.06 (+25.6%)  12.84 (+0.4%)    12.72 (-0.5%)    12.72 (-0.5%)
#   64      18.51 (+44.8%)  13.56 (+6.1%)    16.55 (+29.4%)   13.15 (+2.8%)
#   128     18.35 (+43.5%)  13.48 (+5.4%)    20.32 (+58.9%)   13.65 (+6.8%)
#   (symmetric, 32: rtn 19.24 (+50.5%), gptq 12.98 (+1.5%); float min g32 is exact on Q4_1
#   weights, so GPTQ has nothing to correct there)
#
# rtn keeps the float minimum (exact here, but 4 more kernels per linear at run time: a
# block-sum product, ops_arc_quant); gptq takes MatMulNBits' own integer zero point (one
# kernel per linear) at +0.4%. Decode speed: see the README / bench figures.
INT4_ZERO_POINT = {"rtn": "float", "gptq": "int"}
# GPTQ's default calibration, sequences of 128 tokens: the second moment of a 1536-wide input
# needs more than 16 x 128 tokens (SmolLM2 int4 g32, integer zero point: 16 sequences 13.24,
# 64 sequences 12.84; calibration ~13 s per 16 sequences on an idle machine)
GPTQ_SAMPLES = 64
# the LM head (49152 x 576 on SmolLM2, the largest matmul of a decode step, ~40% of an int4
# step's kernel time in fp32): its own width, or kept in float. SmolLM2, int4 g32 integer
# zero point with GPTQ: head fp32 12.84, int8 12.85, int4 12.90; round-to-nearest's float
# minimum: head fp32 12.72, int8 12.76, int4 13.40 (+4.8%). So int4 with GPTQ (its codes
# are corrected too), int8 otherwise
LM_HEADS = ("fp32", "int8", "int4")
DEFAULT_LM_HEAD = {"int8": {"rtn": "int8", "gptq": "int8"},
                   "int4": {"rtn": "int8", "gptq": "int4"}}
# The token embedding (int8 / int4): "fp32" keeps the float table; "lm-head" reads the tied LM
# head's quantized table, so the engine holds those weights once. SmolLM2 int4 (GPTQ, g32,
# int4 head): data file 202 MB -> 89 MB, perplexity 12.88 -> 13.03 (+0.8% -> +1.9% over
# fp32): the head's GPTQ codes are fitted to its matmul, not to the lookup. Float by default
# (accuracy first; the lookup reads one row per token, so the table costs no speed)
EMBEDDINGS = ("fp32", "lm-head")
DEFAULT_EMBEDDING = "fp32"
# How int8 / int4 weights are written: ORT's MatMulNBits (default), or standard ONNX
# DequantizeLinear -> MatMul, the form TensorRT reads and ORT fuses back into MatMulNBits
# (runtimes/onnxruntime/ops_arc_quant_qdq.py). w8a8 is always Q/DQ.
WEIGHT_FORMATS = ("matmulnbits", "qdq")
# --gate-fallback: what the worst modules are kept in (quant_fallback.py). int4 -> int8 keeps
# much of the speed: SmolLM2, int4 RTN g128 (+60%; the gate refuses it), 60 of 91 modules
# kept (the LM head, int8 already, in float either way): in int8 13.45 (+5.2%), decode 7.5 /
# 9.6 ms per token at contexts 128 / 1024; in fp32 13.39 (+4.7%), 13.5 / 12.3 ms, no faster
# than the fp32 engine's 11.6 / 12.8 (bench/results/fallback, one run, 5 repeats)
FALLBACK_CHOICES = {"int4": ("int8", "fp32"), "int8": ("fp32",)}
FALLBACK_TO = {mode: choices[0] for mode, choices in FALLBACK_CHOICES.items()}
DEFAULT_MAX_PPL_INCREASE = {"int8": 0.01, "int4": 0.08, "w8a8": 0.03}
# int8: blocks of 32, not the pass's 128: ORT's fast path (accuracy_level 4) rounds the
# activations to int8 per block too, and on SmolLM2 blocks of 128 cost +1.2% perplexity
# against -0.1% (interpreter) / +0.2% (ORT) for 32
DEFAULT_GROUP_SIZE = {"int8": 32}
LOWERING_PPL_RTOL = 0.02
DEFAULT_KV_MAX_PPL_INCREASE = 0.01
# SmolLM2, ONNX Runtime perplexity on 512 / 2048 held tokens (float cache 12.786 / 12.707),
# scales from per-channel maxima on calibration sequences of 128 tokens:
#   8 sequences, rotary pair norms, margin 1.0   12.788 / 12.709   (+0.02% at 2048)
#   8 sequences, per-channel maxima only         12.946 / 14.128   (+11%: keys past 128
#                                                                   positions rotate further)
#   8 sequences, pair norms, margin 1.2          12.798 / 12.724
#   2 sequences, pair norms, margin 1.0          12.856 / 12.754
KV_CALIBRATION_SAMPLES = 8
KV_MARGIN = 1.0


def quantize(graph, options: TransformOptions, tokenizer: Any, vocab: int,
             say: Callable[[str], None], hooks: Sequence = (),
             max_tokens: int | None = None) -> tuple[list, dict]:
    """Run the passes ``options`` ask for + DCE on ``graph`` behind the gate; (records,
    manifest entry). ``options.quantize`` None: weights stay float (an int8 KV cache alone).
    ``kv_cache_dtype="int8"``: ``QuantizeKVCache`` after them, inside the same gate.
    An option left None takes its default here: ``quant_method`` the mode's
    (``DEFAULT_METHOD``), ``lm_head`` the mode's (``DEFAULT_LM_HEAD``), ``zero_point`` the
    method's (``INT4_ZERO_POINT``), ``embedding`` ``DEFAULT_EMBEDDING``, ``weight_format`` the
    first of ``WEIGHT_FORMATS`` (with "qdq" the entry names what keeps the weights from
    TensorRT's documented form), ``max_ppl_increase`` ``DEFAULT_MAX_PPL_INCREASE``.
    ``gate_fallback``: when the gate trips, keep the worst-quantized modules in a wider
    format, as few as pass it (``quant_fallback.py``; int8 / int4 weights alone): "int8",
    "fp32", or True for the mode's default (``FALLBACK_TO``).
    ``max_tokens``: the model's context, when shorter than the held-out text."""
    mode, gate_fallback = options.quantize or None, options.gate_fallback
    kv_int8 = options.kv_cache_dtype == "int8"
    if mode is None and not kv_int8:
        raise ArcompileError("nothing to quantize: pass a --quantize mode or "
                             "--kv-cache-dtype int8")
    if mode is None and options.weight_format is not None:
        raise ArcompileError("--weight-format applies to --quantize int8 or int4")
    if gate_fallback and (mode not in DEFAULT_LM_HEAD or kv_int8):
        raise ArcompileError("--gate-fallback widens int8 / int4 weights; it applies to "
                             "--quantize int8 or int4 without --kv-cache-dtype int8")
    fallback_to = FALLBACK_TO.get(mode) if gate_fallback is True else gate_fallback or None
    if fallback_to is not None and fallback_to not in FALLBACK_CHOICES.get(mode, ()):
        raise ArcompileError(f"--gate-fallback {fallback_to!r} for --quantize {mode}: choose "
                             f"{' or '.join(FALLBACK_CHOICES[mode])}")
    flags = describe(mode, kv_int8)
    passes, quantizer, limit = [], None, 0.0
    if mode is not None:
        if mode not in MODES:
            raise ArcompileError(f"--quantize {mode!r} is not available in this version "
                                 f"(available: {', '.join(MODES)})")
        method = options.quant_method or DEFAULT_METHOD[mode]
        if method not in METHODS:
            raise ArcompileError(f"quantization method {method!r} is not one of "
                                 f"{', '.join(METHODS)}")
        try:
            passes = mode_passes(graph, options, method, tokenizer, vocab, say, max_tokens)
        except ValueError as e:
            raise ArcompileError(str(e)) from None
        quantizer = passes[-1]  # the mode's last pass quantizes (w8a8: smooth_quant first)
        limit += DEFAULT_MAX_PPL_INCREASE[mode]
    if kv_int8:
        limit += DEFAULT_KV_MAX_PPL_INCREASE
    limit = limit if options.max_ppl_increase is None else options.max_ppl_increase
    ids, text = held_ids(tokenizer, vocab, min(HELD_TOKENS, max_tokens or HELD_TOKENS))
    what = " and ".join(([f"weights ({mode})"] if mode else []) + (["the KV cache (int8)"]
                                                                   if kv_int8 else []))
    say(f"quantizing {what}, gated at +{limit:.1%} perplexity on {len(ids)} tokens of {text}")
    before = graph_logits(graph, ids)
    records, timings, after, fallback = [], {}, before, None
    if passes:
        if gate_fallback:
            float_graph = graph.copy()
        records = PassManager([*passes, DeadCodeElimination()], [VerifyHook(), *hooks],
                              log=say).run(graph)
        timings = dict(getattr(quantizer, "timings", None) or {})  # weight-only modes
        if "calibration" in timings:
            say(f"  calibration {timings['calibration']:.1f} s, {quantizer.method} "
                f"{timings['quantization']:.1f} s")
        if not records[len(passes) - 1].counts:
            raise ArcompileError(f"--quantize {mode}: no linear was quantized: "
                                 + "; ".join(records[len(passes) - 1].notes[:3]))
        after = graph_logits(graph, ids)
        if gate_fallback:
            _, ppl_quantized, increase, _ = _figures(before, after, ids)
            if not increase <= limit:
                say(f"  perplexity {ppl_quantized:.3f} ({increase:+.2%}) is beyond "
                    f"+{limit:.1%}")
                done = fall_back(graph, float_graph, passes, quantizer, ids, before, limit, say,
                                 to=fallback_to)
                if done is None:
                    say(f"  fallback: no count of modules in {fallback_to} short of all "
                        f"passes the gate")
                else:
                    records, after, fallback = done
    kv_entry = None
    if kv_int8:  # after the weights: its scales are those of the step that ships
        weights_only = after
        kv_pass = kv_cache_passes(tokenizer, vocab, say, max_tokens)
        kv_records = PassManager(kv_pass, [VerifyHook(), *hooks], log=say).run(graph)
        if not kv_records[0].counts:
            raise ArcompileError("--kv-cache-dtype int8: the cache was not quantized: "
                                 + "; ".join(kv_records[0].notes[:3]))
        records += kv_records
        after = graph_logits(graph, ids)
        kv_before, kv_after, kv_increase, kv_agreement = _figures(weights_only, after, ids)
        kv_entry = {"kv_cache_dtype": "int8", "settings": kv_pass[0].settings(),
                    "perplexity_before": kv_before, "perplexity_after": kv_after,
                    "perplexity_increase": kv_increase, "greedy_agreement": kv_agreement}
        if mode is not None:
            say(f"  the int8 KV cache alone: perplexity {kv_entry['perplexity_before']:.3f} -> "
                f"{kv_entry['perplexity_after']:.3f} ({kv_entry['perplexity_increase']:+.2%})")
    ppl_before, ppl_after, increase, agreement = _figures(before, after, ids)
    say(f"  perplexity {ppl_before:.3f} -> {ppl_after:.3f} ({increase:+.2%}), greedy "
        f"agreement with the unquantized graph {agreement:.1%}")
    if not increase <= limit:
        hint = ("Try int8, a smaller --group-size, or allow more with --max-ppl-increase"
                if mode else "Keep the float cache, or allow more with --max-ppl-increase")
        if mode in DEFAULT_LM_HEAD and not kv_int8:
            hint += (f" (--gate-fallback found no count of modules in {fallback_to} short of "
                     f"all that passes)" if gate_fallback else
                     ", or let --gate-fallback keep the worst-quantized modules wider")
        raise ArcompileError(
            f"{flags}: perplexity rose from {ppl_before:.3f} to {ppl_after:.3f} "
            f"({increase:+.2%}) on {len(ids)} tokens of {text}, beyond --max-ppl-increase "
            f"{limit:.2%} (greedy agreement {agreement:.1%}); nothing was written. {hint}")
    formats = {}
    if mode in DEFAULT_LM_HEAD:  # weight-only: how the weights are written
        formats = weight_format_entry(graph, options.weight_format or WEIGHT_FORMATS[0], say)
    return records, {"mode": mode, "settings": quantizer.settings() if quantizer else {},
                     **formats, **({"fallback": fallback} if fallback else {}),
                     "text": text, "tokens": len(ids), "perplexity_unquantized": ppl_before,
                     "perplexity": ppl_after, "perplexity_increase": increase,
                     "max_ppl_increase": limit, "greedy_agreement": agreement,
                     **({"kv_cache": kv_entry} if kv_entry else {}),
                     **({"seconds": timings} if timings else {}), "_ids": ids}


def weight_format_entry(graph, weight_format: str, say: Callable[[str], None]) -> dict:
    """Lower ``graph``'s quantized weights in ``weight_format``; the manifest's record of it
    (with "qdq", what keeps them from TensorRT's documented form, if anything)."""
    if weight_format == "matmulnbits":
        return {"weight_format": weight_format}
    graph.meta[META_KEY] = "qdq"
    issues = tensorrt_form_issues(graph)
    say("  weights as DequantizeLinear -> MatMul (QDQ); "
        + ("not in TensorRT's documented weight-only form: " + "; ".join(issues) if issues
           else "symmetric, in TensorRT's documented weight-only form (not built with "
                "TensorRT here)"))
    return {"weight_format": weight_format, "tensorrt_form_issues": issues}


def describe(mode: str | None, kv_int8: bool) -> str:
    """The flags that asked for this quantization, for messages."""
    return " ".join(([f"--quantize {mode}"] if mode else [])
                    + (["--kv-cache-dtype int8"] if kv_int8 else []))


def _figures(before: np.ndarray, after: np.ndarray, ids: list[int]) -> tuple[float, ...]:
    """(perplexity before, after, relative increase, greedy agreement) of two [T, V] logits."""
    ppl_before, ppl_after = perplexity(before, ids), perplexity(after, ids)
    return (ppl_before, ppl_after, ppl_after / ppl_before - 1,
            float(np.mean(before.argmax(-1) == after.argmax(-1))))


def kv_cache_passes(tokenizer: Any, vocab: int, say: Callable[[str], None],
                    max_tokens: int | None = None) -> list:
    """``[QuantizeKVCache]`` calibrated on ``KV_CALIBRATION_SAMPLES`` sequences of
    ``calibration.DEFAULT_LENGTH`` tokens (shorter for a shorter context)."""
    sequences, text = calibration.calibration_ids(
        tokenizer, vocab, KV_CALIBRATION_SAMPLES,
        min(calibration.DEFAULT_LENGTH, max_tokens or calibration.DEFAULT_LENGTH))
    say(f"calibrating the int8 KV cache on {text}")
    return [QuantizeKVCache(sequences, margin=KV_MARGIN, calibration_text=text)]


def mode_passes(graph, options: TransformOptions, method: str, tokenizer: Any, vocab: int,
                say: Callable[[str], None], max_tokens: int | None = None) -> list:
    """The passes that quantize ``graph`` for ``options.quantize`` with ``method`` (resolved:
    never None); the last one (the quantizer) has its ``settings()`` put into the manifest and
    must have quantized something. A ValueError says what setting is wrong."""
    mode = options.quantize
    for flag, value in (("--lm-head", options.lm_head), ("--zero-point", options.zero_point),
                        ("--embedding", options.embedding),
                        ("--weight-format", options.weight_format)):
        if value is not None and mode not in DEFAULT_LM_HEAD:
            raise ValueError(f"{flag} applies to --quantize {' or '.join(DEFAULT_LM_HEAD)}, "
                             f"not {mode}")
    if options.weight_format not in (None, *WEIGHT_FORMATS):
        raise ValueError(f"--weight-format {options.weight_format!r} is not one of "
                         f"{', '.join(WEIGHT_FORMATS)}")
    if options.weight_format == "qdq" and options.embedding == "lm-head":
        raise ValueError("--embedding lm-head has no QDQ form (the lookup in the quantized "
                         "table is ONNX Runtime's GatherBlockQuantized); use --embedding fp32 "
                         "with --weight-format qdq")
    if mode == "w8a8":
        return w8a8_passes(options, method, tokenizer, vocab, say, max_tokens)
    return weight_only_passes(options, method, tokenizer, vocab, say, max_tokens)


def weight_only_passes(options: TransformOptions, method: str, tokenizer: Any, vocab: int,
                       say: Callable[[str], None], max_tokens: int | None = None) -> list:
    """``[QuantizeWeights]`` for int8 / int4: the mode's width, group size, zero point, LM
    head, and for a calibrated method its calibration sequences (``GPTQ_SAMPLES`` of
    ``calibration.DEFAULT_LENGTH`` tokens unless asked; shorter for a shorter context)."""
    mode, embedding = options.quantize, options.embedding
    calibration_samples = options.calibration_samples
    bits = MODES[mode]
    lm_head = options.lm_head or DEFAULT_LM_HEAD[mode][method]
    if lm_head not in LM_HEADS:
        raise ValueError(f"--lm-head {lm_head!r} is not one of {', '.join(LM_HEADS)}")
    if embedding not in (None, *EMBEDDINGS):
        raise ValueError(f"--embedding {embedding!r} is not one of {', '.join(EMBEDDINGS)}")
    if embedding == "lm-head" and lm_head == "fp32":
        raise ValueError("--embedding lm-head reads the LM head's quantized table, and "
                         "--lm-head fp32 keeps the head in float")
    embedding = embedding or DEFAULT_EMBEDDING
    if calibration_samples is not None and method == "rtn":
        raise ValueError("--calibration-samples applies to a calibrated --quant-method "
                         f"({', '.join(m for m in METHODS if m != 'rtn')}), not rtn")
    if calibration_samples is not None and calibration_samples < 1:
        raise ValueError(f"--calibration-samples must be at least 1, got {calibration_samples}")
    sequences, text = None, None
    if method != "rtn":
        sequences, text = calibration.calibration_ids(
            tokenizer, vocab, calibration_samples or GPTQ_SAMPLES,
            min(calibration.DEFAULT_LENGTH, max_tokens or calibration.DEFAULT_LENGTH))
        say(f"calibrating {method} on {text}")
    return [QuantizeWeights(
        bits=bits, block_size=options.group_size or DEFAULT_GROUP_SIZE.get(mode),
        zero_point=options.zero_point or (INT4_ZERO_POINT[method] if bits == 4 else None),
        include_lm_head=lm_head != "fp32",
        lm_head_bits=None if lm_head == "fp32" else int(lm_head.removeprefix("int")),
        method=method, calibration=sequences, calibration_text=text,
        embedding=embedding.replace("-", "_"))]


# w8a8 (SmoothQuant, then static int8 activations and per-channel int8 weights), chosen on
# SmolLM2's held text (fp32 12.786). alpha, 4 calibration sequences, outlier ratio 4: 0.5
# +0.7%, 0.6 +1.3%, 0.75 +3.4%; ratio 8: 0.3 +3.3%, 0.4 +3.8%, 0.5 -0.3%, 0.6 +0.4%. With 16
# sequences (the default) alpha 0.5 / ratio 4: +0.9%. Statistic, ratio: passes/quantize_w8a8.py
W8A8_ALPHA = 0.5
W8A8_STATISTIC = "max"
W8A8_OUTLIER_RATIO = 4.0


def w8a8_passes(options: TransformOptions, method: str, tokenizer: Any, vocab: int,
                say: Callable[[str], None], max_tokens: int | None = None) -> list:
    """``[SmoothQuant, QuantizeW8A8]`` on ``options.calibration_samples`` sequences (default
    ``calibration.DEFAULT_SAMPLES``) of ``calibration.DEFAULT_LENGTH`` tokens (shorter for a
    shorter context) of calibration text. W8A8 is calibrated by construction: ``method`` must
    be the default."""
    if options.group_size is not None:
        raise ValueError("--quantize w8a8 scales weights per output channel and activations "
                         "per tensor: --group-size does not apply")
    if method != "rtn":
        raise ValueError(f"--quantize w8a8 is SmoothQuant + static calibration; "
                         f"--quant-method {method} does not apply")
    sequences, text = calibration.calibration_ids(
        tokenizer, vocab, options.calibration_samples or calibration.DEFAULT_SAMPLES,
        min(calibration.DEFAULT_LENGTH, max_tokens or calibration.DEFAULT_LENGTH))
    say(f"calibrating w8a8 on {text}")
    return [SmoothQuant(sequences, W8A8_ALPHA, calibration_text=text),
            QuantizeW8A8(sequences, W8A8_STATISTIC, calibration_text=text,
                         outlier_ratio=W8A8_OUTLIER_RATIO)]


def check_engine(folder: Path, info: dict) -> float:
    """ONNX Runtime's perplexity against the interpreter's; returns the relative gap."""
    ids = info["_ids"]
    with progress.step(f"ONNX Runtime perplexity on {len(ids)} tokens"):
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
            f"{describe(info['mode'], 'kv_cache' in info)}: the ONNX Runtime engine's "
            f"perplexity rose from {info['perplexity_unquantized']:.3f} to {got:.3f} "
            f"({increase:+.2%}), beyond "
            f"--max-ppl-increase {info['max_ppl_increase']:.2%}; nothing was written")
    return gap
