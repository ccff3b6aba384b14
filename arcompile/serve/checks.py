"""Checks of what callers pass at the API boundary (``Engine.generate`` / ``stream`` /
``logits``, ``arcompile run``'s flags, ``load(threads=...)``).

Each check returns the value normalized (numpy scalars to Python ones) or raises DecodeError
with one line that names the parameter, the accepted range and what it got, so a wrong type
or value never reaches ONNX Runtime (whose errors say "internal error") or wraps silently (a
negative token id indexes the embedding from its end). ``bool`` is refused wherever a number
is asked for: ``True`` is an int to Python, never what a caller meant by a count.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from arcompile.errors import DecodeError


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def integer(name: str, value: Any, low: int, high: int | None = None,
            why: str = "") -> int:
    """``value`` as an int in [low, high] (no upper bound when ``high`` is None)."""
    if not is_int(value) or value < low or (high is not None and value > high):
        span = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
        raise DecodeError(f"{name} must be {span}{why}, got {_show(value)}")
    return int(value)


def real(name: str, value: Any, low: float, high: float, low_open: bool = False,
         high_open: bool = False) -> float:
    """``value`` as a finite float in the interval (``*_open``: excluding that end)."""
    ok = (isinstance(value, (int, float, np.integer, np.floating))
          and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)
          and (value > low if low_open else value >= low)
          and (value < high if high_open else value <= high))
    if not ok:
        span = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise DecodeError(f"{name} must be a finite number in {span}, got {_show(value)}")
    return float(value)


def flag(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise DecodeError(f"{name} must be True or False, got {_show(value)}")
    return bool(value)


def token_ids(rows: list[list[int]], vocab: int | None) -> None:
    """Every id in [0, vocab)."""
    if vocab is None:
        return
    for row in rows:
        for t in row:
            if not 0 <= t < vocab:
                raise DecodeError(f"token ids must be in [0, {vocab - 1}] (the vocabulary's "
                                  f"size is {vocab}), got {t}")


def stop_tokens(value: Any, vocab: int | None) -> int | list[int] | None:
    """``eos_token_id``: None, an id or a sequence of ids, each in [0, vocab)."""
    if value is None:
        return None
    top = None if vocab is None else vocab - 1
    span = f" (token ids of the vocabulary of {vocab})" if vocab else ""
    if is_int(value):
        return integer("eos_token_id", value, 0, top, span)
    if isinstance(value, (list, tuple, np.ndarray)) and not isinstance(value, str):
        return [integer("eos_token_id", v, 0, top, span) for v in list(value)]
    raise DecodeError(f"eos_token_id must be a token id in [0, {top}] or a list of them, "
                      f"got {_show(value)}" if top is not None else
                      f"eos_token_id must be a token id or a list of them, got {_show(value)}")


def sampling(do_sample: Any, temperature: Any, top_k: Any, top_p: Any,
             seed: Any) -> tuple[bool, float, int, float, int | None]:
    """The sampling settings, checked whatever ``do_sample`` is (a wrong one is a mistake
    either way); temperature must be > 0 when sampling."""
    do_sample = flag("do_sample", do_sample)
    temperature = real("temperature", temperature, 0.0, 1e6, low_open=do_sample)
    top_k = integer("top_k", top_k, 0, why=" (0 turns it off)")
    top_p = real("top_p", top_p, 0.0, 1.0, low_open=True)
    seed = None if seed is None else integer("seed", seed, 0, 2**63 - 1)
    return do_sample, temperature, top_k, top_p, seed


def new_tokens(value: Any, rows: Sequence[Sequence[int]], max_context: int | None) -> int:
    """``max_new_tokens``: an int >= 0 such that the longest prompt plus it fits
    ``max_context``."""
    value = integer("max_new_tokens", value, 0)
    longest = max(len(r) for r in rows)
    if max_context is not None and longest + value > max_context:
        room = (f"max_new_tokens must be in [0, {max_context - longest}] for it"
                if longest <= max_context else "it is too long by itself")
        raise DecodeError(f"a prompt of {longest} tokens plus {value} new tokens exceeds the "
                          f"engine's maximum context of {max_context} ({room})")
    return value
