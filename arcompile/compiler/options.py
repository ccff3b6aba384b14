"""The options that change what an engine computes (quantization, the int8 KV cache,
layer-skip routing): one list, ``TransformOptions``.

Every other spelling of them is made from it: the command-line flags of ``optimize`` and
``profile`` (``cli.main.add_transform_options``, a loop over the fields: the flag is the
field's name with dashes, its ``metadata["flag"]`` argparse's keywords), the Python keyword
arguments (``optimize(..., quantize="int4")`` builds the object with ``from_keywords``) and
what ``quantization.quantize`` reads (the object itself). The defaults and the checks that
need a mode (which method, which LM head, ...) are ``quantization.py``'s; the object checks
what it can alone, when it is made.

Light on purpose: the CLI imports it to build its parser, before any command runs.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from typing import Any

from arcompile.errors import ArcompileError


def fraction(text: str) -> float:
    """A flag's "8%" or "0.08" as 0.08; not negative."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction or a percentage, got {text!r}")
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def skip_fraction(text: str) -> float:
    """A flag's fraction of the feed-forward blocks, in (0, 1) (``--skip``)."""
    value = fraction(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"a fraction in (0, 1) of the feed-forward blocks, "
                                         f"got {text!r}")
    return value


def _option(help: str, default: Any = None, needs_quantize: bool = False, **flag: Any) -> Any:
    """A field: its default (the flag's too), its flag (``help`` and argparse's other
    keywords: ``choices``, ``type``, ...) and whether it sets a --quantize mode's weights
    (then it does nothing without one)."""
    return field(default=default, metadata={"flag": {"help": help, **flag},
                                            "needs_quantize": needs_quantize})


@dataclass(frozen=True)
class TransformOptions:
    """What ``optimize`` (and ``profile``) are asked to change in what the model computes;
    each field's help is its flag's. None (``gate_fallback``: False) is "not asked for": the
    default applies (``quantization.py``). In Python a field holds what its flag parses to:
    ``max_ppl_increase=0.08`` (the flag takes "8%" too), ``skip=0.25``, ``gate_fallback=True``
    for the bare flag (the mode's fallback format) or "int8" / "fp32"."""

    kv_cache_dtype: str | None = _option(
        "float32 (default) or int8: the in-place cache stored as int8 with per-channel scales "
        "calibrated on calibration text (a quarter of the cache's bytes), held to "
        "--max-ppl-increase (default 1%%)", choices=("float32", "int8"))
    quantize: str | None = _option(
        "quantize linear weights (int8 / int4: MatMulNBits weights; w8a8: SmoothQuant, int8 "
        "weights and statically calibrated int8 activations, Q/DQ), held to "
        "--max-ppl-increase on held-out text", choices=("int8", "int4", "w8a8"))
    group_size: int | None = _option(
        "with --quantize: weights per scale along K (a power of two >= 16; default 32)",
        type=int)
    max_ppl_increase: float | None = _option(
        "with --quantize or --kv-cache-dtype int8: the most perplexity may rise, e.g. 8%% or "
        "0.08 (default int8 1%%, int4 8%%, w8a8 3%%, an int8 KV cache 1%%, added when both); "
        "beyond it optimize fails with the figures and writes nothing", type=fraction)
    quant_method: str | None = _option(
        "with --quantize int8/int4: rtn (round-to-nearest; the int8 default) or gptq "
        "(error-corrected on calibration text; the int4 default)",
        choices=("rtn", "gptq"), needs_quantize=True)
    calibration_samples: int | None = _option(
        "with gptq or w8a8: sequences of 128 tokens of calibration text (pydoc_data, never "
        "the held-out text; default gptq 64, w8a8 16)", type=int, needs_quantize=True)
    lm_head: str | None = _option(
        "with --quantize int8/int4: the LM head's weights (default int4 for int4 with gptq, "
        "else int8)", choices=("fp32", "int8", "int4"), needs_quantize=True)
    embedding: str | None = _option(
        "with --quantize int8/int4: the token embedding; fp32 (default) keeps the float "
        "table; lm-head reads the quantized LM head's table where the two are tied, so the "
        "engine holds those weights once (smaller, and the lookup is quantized too)",
        choices=("lm-head", "fp32"), needs_quantize=True)
    gate_fallback: bool | str = _option(
        "with --quantize int8/int4: when perplexity rises beyond --max-ppl-increase, keep the "
        "modules whose weights quantize worst in a wider format, as few as it takes, instead "
        "of failing (the manifest lists them): int8 (int4's default) or fp32 (int8's)",
        default=False, needs_quantize=True, nargs="?", const=True, choices=("int8", "fp32"))
    weight_format: str | None = _option(
        "with --quantize int8/int4: how the weights are written; matmulnbits (default: ONNX "
        "Runtime's MatMulNBits) or qdq (standard DequantizeLinear -> MatMul, the form "
        "TensorRT reads, with --zero-point none; ONNX Runtime fuses it back into "
        "MatMulNBits)", choices=("matmulnbits", "qdq"), needs_quantize=True)
    zero_point: str | None = _option(
        "with --quantize int8/int4: none (symmetric), int (asymmetric, MatMulNBits' integer "
        "zero point; int4 gptq's default) or float (a float minimum per block, as "
        "llama.cpp's Q4_1; int4 rtn's default)",
        choices=("none", "int", "float"), needs_quantize=True)
    skip: float | None = _option(
        "layer-skip routing: rank the feed-forward blocks by how much skipping each raises "
        "the loss on calibration text, and skip this fraction of them in the lossy mode "
        "(e.g. 0.25 or 25%%); every block gets a run-time flag (`run --skip`, `run "
        "--speculative self`)", type=skip_fraction, metavar="FRACTION")

    def __post_init__(self) -> None:
        given = [f.name for f in fields(self) if f.metadata["needs_quantize"]
                 and getattr(self, f.name) is not None and getattr(self, f.name) is not False]
        if given and not self.quantize:  # settings of a quantization nobody asked for
            raise ArcompileError(f"{', '.join(given)} without quantize (--quantize) does "
                                 f"nothing; pass a --quantize mode")
        dtypes = self.flag("kv_cache_dtype")["choices"]
        if self.kv_cache_dtype not in (None, *dtypes):
            raise ArcompileError(f"kv_cache_dtype {self.kv_cache_dtype!r} is not one of "
                                 f"{', '.join(dtypes)}")

    @staticmethod
    def flag(name: str) -> dict:
        """The field ``name``'s flag: argparse's keywords but its name and default."""
        return next(f.metadata["flag"] for f in fields(TransformOptions) if f.name == name)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TransformOptions:
        """The values of the flags ``add_transform_options`` added."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})

    @classmethod
    def from_keywords(cls, keywords: dict[str, Any], caller: str) -> TransformOptions:
        """``caller``'s keyword arguments (``optimize``'s, ``profile``'s); an unknown one is an
        error that names it."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(keywords) - names)
        if unknown:
            raise ArcompileError(f"unknown option(s) for {caller}: {', '.join(unknown)}")
        return cls(**keywords)

    def given(self) -> dict[str, Any]:
        """The options set to something other than their default, as keyword arguments (what
        ``profile``'s report records)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) != f.default}
