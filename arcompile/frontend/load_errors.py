"""Turning exceptions from torch and transformers internals into one-line ModelLoadErrors."""

from __future__ import annotations


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message (at most 300 characters), or its
    type's name when the message is empty. A final full stop is dropped."""
    for line in str(e).splitlines():
        if line.strip():
            # callers append "; what to do", so a final full stop would read twice
            return line.strip()[:300].rstrip(".")
    return type(e).__name__
