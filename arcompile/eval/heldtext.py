"""Real English text for measuring models: pydoc's topic help, shipped with CPython.

One corpus (every ``pydoc_data.topics`` entry, sorted by name, joined by newlines; ~465,000
characters) cut into regions that never overlap, so what calibrates a model is never what
measures it:

    PROMPTS      chars  20,000 .. 100,000   prompts for latency and greedy decoding
    CALIBRATION  chars 100,000 .. 250,000   calibration data for passes that need it
    HELD         chars 300,000 .. 465,000   held-out text for perplexity
"""

from __future__ import annotations

from typing import Any

PROMPTS = (20_000, 100_000)
CALIBRATION = (100_000, 250_000)
HELD = (300_000, None)


def corpus() -> str:
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics))


def token_ids(tokenizer: Any, region: tuple[int, int | None], count: int,
              offset: int = 0) -> list[int]:
    """``count`` token ids of the text in ``region``, starting ``offset`` characters in."""
    start, end = region
    text = corpus()[start + offset:end]
    ids = list(tokenizer.encode(text[: max(8 * count, 1000)]))[:count]
    if len(ids) < count:
        raise ValueError(f"the text region {region} holds fewer than {count} tokens")
    return ids
