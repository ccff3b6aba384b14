"""The engine manifest (``arcompile.json``) as a JSON Schema, and its strict parser.

``parse_manifest`` turns bytes into a validated dict or raises EngineError with one line that
names the field. What it bounds before ``json.loads`` can hurt: the file's size and the
nesting depth (a 200k-deep document would otherwise end in RecursionError), and it reads
NaN / Infinity as null (strict JSON has neither; engines before issue 22 wrote
``"lowering_max_abs_diff": NaN``), so a NaN where a number is required is refused by name.

The schema requires only what engines of format version 1 have always written, so every
engine written before it still loads; fields this version does not know are left alone.
What a schema cannot say (that the names in ``kv_cache`` are inputs and outputs the manifest
lists) is checked in ``cross_references``.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from arcompile.errors import EngineError

MAX_BYTES = 64 << 20  # manifests are kilobytes; a SmolLM2 int4 engine's is under 100 KB
MAX_DEPTH = 32  # the deepest a written manifest nests is 6
MAX_DIM = 1 << 24  # any static dim (vocab, heads, head size) or context length beyond is absurd
DTYPES = ["float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8",
          "uint8", "bool"]

# no control characters in names and paths: errors quote them on one line
# ("not" a search, because Python's "$" also matches before a final newline)
_PRINTABLE = {"not": {"pattern": "[\\x00-\\x1f\\x7f]"}}
_NAME = {"type": "string", "minLength": 1, "maxLength": 256, **_PRINTABLE}
_COUNT = {"type": "integer", "minimum": 0, "maximum": MAX_DIM}
_POSITIVE = {"type": "integer", "minimum": 1, "maximum": MAX_DIM}
_TOKEN = {"type": "integer", "minimum": 0, "maximum": MAX_DIM}
_TOKENS = {"anyOf": [{"type": "null"}, _TOKEN, {"type": "array", "items": _TOKEN,
                                                 "maxItems": 1024}]}
_NUMBER_OR_NULL = {"type": ["number", "null"]}
_DIM = {"anyOf": [_COUNT, {"type": "string", "maxLength": 256}, {"type": "null"}]}
_IO = {
    "type": "object",
    "required": ["name", "dtype", "shape"],
    "properties": {"name": _NAME, "dtype": {"enum": DTYPES},
                   "shape": {"type": "array", "maxItems": 8, "items": _DIM}},
}
_PAIR = {"type": "array", "items": _NAME, "minItems": 2, "maxItems": 2}
_PER_LAYER = {"anyOf": [_POSITIVE, {"type": "array", "items": _POSITIVE, "maxItems": 4096}]}
_KV_CACHE = {
    "type": "object",
    "required": ["past_length", "past", "present", "logits"],
    "properties": {
        "past_length": _NAME,
        "past": {"type": "array", "items": _PAIR, "minItems": 1, "maxItems": 4096},
        "present": {"type": "array", "items": _PAIR, "minItems": 1, "maxItems": 4096},
        "logits": _NAME,
        "tokens": _NAME,
        "logits_to_keep": {"anyOf": [{"type": "null"}, _NAME]},
        "runtime_cache": {"enum": ["concat", "inplace"]},
        "max_context": _POSITIVE,
        "layers": _POSITIVE,
        "num_kv_heads": _PER_LAYER,
        "head_dim": _PER_LAYER,
        "dtype": {"type": "string"},
        "concat_dim": _COUNT,
    },
    # the in-place runtime sizes its buffers from max_context
    "if": {"properties": {"runtime_cache": {"const": "inplace"}},
           "required": ["runtime_cache"]},
    "then": {"required": ["max_context"]},
}
_SKIP_FFN = {
    "type": "object",
    "required": ["input", "blocks"],
    "properties": {
        "input": _NAME,
        "blocks": {"type": "array", "items": {"type": "object"}, "minItems": 1,
                   "maxItems": 4096},
        "chosen": {"type": "array", "items": _COUNT, "maxItems": 4096},
        "ranking": {"type": "array", "items": _COUNT, "maxItems": 4096},
        "scores": {"type": "array", "items": _NUMBER_OR_NULL, "maxItems": 4096},
    },
}
_SELF_DRAFT = {
    "type": "object",
    "required": ["mode", "method", "folder", "perplexity_model", "perplexity",
                 "greedy_agreement"],
    "properties": {"mode": _NAME, "method": _NAME, "folder": _NAME,
                   "perplexity_model": _NUMBER_OR_NULL, "perplexity": _NUMBER_OR_NULL,
                   "greedy_agreement": _NUMBER_OR_NULL},
}
_FILE = {
    "type": "object",
    "required": ["bytes", "sha256"],
    "properties": {"bytes": {"type": "integer", "minimum": 0},
                   "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"}},
}
_PASS = {
    "type": "object",
    "required": ["name", "nodes_before", "nodes_after", "counts"],
    "properties": {"name": _NAME, "nodes_before": {"type": "integer"},
                   "nodes_after": {"type": "integer"},
                   "counts": {"type": "object", "additionalProperties": {"type": "number"}}},
}
SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["format", "format_version", "runtime", "model_file", "inputs", "outputs",
                 "files"],
    "properties": {
        "format": {"const": "arcompile-engine"},
        "format_version": {"type": "integer", "minimum": 1},
        "runtime": {"type": "string"},
        "model_file": {"type": "string", "minLength": 1, "maxLength": 1024, **_PRINTABLE},
        "inputs": {"type": "array", "items": _IO, "minItems": 1, "maxItems": 100_000},
        "outputs": {"type": "array", "items": _IO, "minItems": 1, "maxItems": 100_000},
        "padding_side": {"enum": ["right", "left"]},
        "kv_cache": {"anyOf": [{"type": "null"}, _KV_CACHE]},
        "kv_cache_refused": {"type": "string"},
        "skip_ffn": {"anyOf": [{"type": "null"}, _SKIP_FFN]},
        "self_draft": {"anyOf": [{"type": "null"}, _SELF_DRAFT]},
        "passes": {"type": "array", "items": _PASS},
        "lowering_max_abs_diff": _NUMBER_OR_NULL,
        "source": {"type": "object",
                   "properties": {"path": {"type": ["string", "null"]},
                                  "kind": {"type": ["string", "null"]},
                                  "sha256": {"type": ["string", "null"]}}},
        "config": {
            "type": "object",
            "properties": {"vocab_size": {"anyOf": [{"type": "null"}, _POSITIVE]},
                           "max_position_embeddings": {"anyOf": [{"type": "null"},
                                                                 _POSITIVE]},
                           "eos_token_id": _TOKENS, "bos_token_id": _TOKENS,
                           "name": {"type": ["string", "null"]},
                           "model_type": {"type": ["string", "null"]}},
        },
        "files": {"type": "object", "propertyNames": {"maxLength": 1024, **_PRINTABLE},
                  "additionalProperties": _FILE},
        "quantization": {"anyOf": [{"type": "null"}, {"type": "object"}]},
        "tools": {"type": "object"},
    },
}

# strings are removed first, so brackets inside them do not count
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")


def parse_manifest(data: bytes, where: str) -> dict:
    """The validated manifest in ``data``; EngineError naming the field otherwise."""
    if len(data) > MAX_BYTES:
        raise EngineError(f"{where} is {len(data)} bytes, more than any manifest "
                          f"({MAX_BYTES >> 20} MiB); the engine is damaged")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise EngineError(f"{where} is not UTF-8 text; the engine is damaged, re-run "
                          "`arcompile optimize`") from None
    _check_depth(text, where)
    try:
        manifest = json.loads(text, parse_constant=lambda _c: None, parse_float=_finite)
    except (ValueError, RecursionError) as e:  # ValueError: bad JSON, a 5000-digit integer
        raise EngineError(f"{where} is not valid JSON ({_one_line(e)}); the engine is "
                          "damaged, re-run `arcompile optimize`") from None
    check_manifest(manifest, where)
    return manifest


def check_manifest(manifest: Any, where: str) -> None:
    """EngineError unless ``manifest`` matches SCHEMA and its names refer to each other."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match

    if not isinstance(manifest, dict) or manifest.get("format") != "arcompile-engine":
        raise EngineError(f"{where} is not an arcompile engine manifest")
    error = best_match(Draft202012Validator(SCHEMA).iter_errors(manifest))
    # "not valid under any of the given schemas" says little: where a value had the right
    # type for one alternative (an object where null-or-object is allowed), say what in it
    # is wrong instead
    while error is not None and error.context:
        inner = [e for e in error.context if e.validator != "type"]
        if not inner:
            break
        error = best_match(inner)
    if error is not None:
        field = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise EngineError(f"{where}: field {field}: {_one_line(error.message)}; the engine is "
                          "damaged, re-run `arcompile optimize`")
    cross_references(manifest, where)


def cross_references(manifest: dict, where: str) -> None:
    """The names the cache and the skip routing use are inputs / outputs the manifest lists."""
    inputs = {io["name"] for io in manifest["inputs"]}
    outputs = {io["name"] for io in manifest["outputs"]}
    cache = manifest.get("kv_cache") or {}
    wanted = [("kv_cache/past_length", cache.get("past_length"), inputs),
              ("kv_cache/logits_to_keep", cache.get("logits_to_keep"), inputs),
              ("kv_cache/logits", cache.get("logits"), outputs),
              ("skip_ffn/input", (manifest.get("skip_ffn") or {}).get("input"), inputs)]
    wanted += [(f"kv_cache/past/{i}", n, inputs) for i, pair in enumerate(cache.get("past", []))
               for n in pair]
    wanted += [(f"kv_cache/present/{i}", n, outputs)
               for i, pair in enumerate(cache.get("present", [])) for n in pair]
    for field, name, names in wanted:
        if name is not None and name not in names:
            raise EngineError(f"{where}: field {field}: {str(name)[:80]!r} is not among the "
                              "manifest's inputs / outputs; the engine is damaged")


def _check_depth(text: str, where: str) -> None:
    depth = 0
    for bracket in _BRACKET.findall(_STRING.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        if depth > MAX_DEPTH:
            raise EngineError(f"{where} nests deeper than {MAX_DEPTH} levels, which no "
                              "manifest does; the engine is damaged")


def _finite(text: str) -> float | None:
    value = float(text)
    return value if math.isfinite(value) else None  # 1e999 reads as inf: null, like NaN


def strict_json(value: Any) -> Any:
    """``value`` with every NaN / infinity replaced by None, for strict JSON output."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def _one_line(e: Any) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 200 else text[:197] + "..."
