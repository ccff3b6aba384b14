"""A conversation with an engine whose history stays in the KV cache (``arcompile chat``).

    session = ChatSession(arcompile.load("out/smollm2"), max_new_tokens=128)
    for text in session.say("What is the capital of France?"):
        print(text, end="", flush=True)
    session.turns[-1]   # {"prefill_tokens": 31, "new_tokens": 8, "seconds": ...}

Each turn renders the whole conversation with the tokenizer's chat template, as the model
was trained to read it, and compares its tokens with those already in the cache: only what
follows the common prefix is prefilled (the user's new message, the template's markers, and
the end-of-turn marker of the last reply, which decoding stopped at without feeding). Where
the template renders an earlier reply differently from the tokens generated (a reply cut off
by ``max_new_tokens``, text that tokenizes otherwise), the cache is rewound to the common
prefix and the rest is prefilled: the answer is always the template's, never a drifted one.

The in-place cache (``runtime_cache: "inplace"``) lives in buffers that grow (doubling, up to
the engine's max_context) as the conversation does; the concat runtime keeps its presents.
An engine without a cache recomputes the whole conversation every turn (``cached`` False).

``speculative`` (greedy only, in-place cache): the engine's drafters as in ``Engine.stream``,
drafting into the same buffers from where the conversation stands.
"""

from __future__ import annotations

import time
from typing import Iterator, Sequence

import numpy as np

from arcompile.errors import DecodeError, EngineError
from arcompile.runtimes.onnxruntime.inplace_step import Buffers
from arcompile.serve import speculative as spec
from arcompile.serve.decoding import Sampler, stop_set

FIRST_CAPACITY = 512  # in-place buffers' first size in tokens; doubled as the talk grows


class ChatSession:
    """Multi-turn chat on one engine; ``turns`` holds each turn's prefill and reply sizes.

    Uses the engine's step API (``_step``, ``_empty_cache``, ``_inplace``), as the
    speculative decoders do: the cache outlives a single decode here.
    """

    def __init__(self, engine, system: str | None = None, max_new_tokens: int = 256,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None,
                 eos_token_id: int | Sequence[int] | None = None,
                 speculative: str | None = None, draft_tokens: int = 4,
                 draft=None):
        self.engine = engine
        tok = engine.tokenizer  # EngineError when the engine has none
        if not getattr(tok, "chat_template", None):
            raise EngineError(f"engine {engine.path}'s tokenizer has no chat template; "
                              f"`arcompile run --prompt` takes plain text")
        self.system = system
        self.max_new_tokens = max_new_tokens
        self.sampler = Sampler(do_sample, temperature, top_k, top_p, seed)
        stops = stop_set(eos_token_id if eos_token_id is not None else engine.eos_token_id)
        if tok.eos_token_id is not None:
            stops.add(int(tok.eos_token_id))
        self.stops = stops
        self.cached = engine.kv_cache
        self.speculative, self.draft_tokens, self.draft = speculative, draft_tokens, draft
        if speculative is not None:
            if do_sample:
                raise DecodeError("speculative decoding is lossless for greedy decoding only; "
                                  "drop --do-sample")
            if engine._inplace is None:
                raise DecodeError("chat --speculative needs an engine with the in-place KV "
                                  "cache (optimize's default): its drafts go into buffers the "
                                  "conversation keeps")
        self.turns: list[dict] = []  # per turn: prefill_tokens, new_tokens, seconds
        self.speculation: dict | None = None  # the last speculative turn's figures
        self.reset()

    @property
    def prefill_counts(self) -> list[int]:
        """The tokens each turn prefilled (the new text alone, when the cache is kept)."""
        return [t["prefill_tokens"] for t in self.turns]

    def reset(self) -> None:
        """Forget the conversation (and the cache)."""
        self.messages: list[dict] = ([{"role": "system", "content": self.system}]
                                     if self.system else [])
        self._ids: list[int] = []  # the tokens whose rows the cache holds
        self._cache = None
        self._reply: list[int] = []  # the reply being generated (or cut off)

    def say(self, text: str) -> Iterator[str]:
        """The reply to ``text``, as pieces of text while it is generated."""
        shown = ""
        tokens: list[int] = []
        for token in self.send(text):
            tokens.append(token)
            now = self.engine.decode(tokens)
            if now.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
                continue
            yield now[len(shown):]
            shown = now
        now = self.engine.decode(tokens)
        if now != shown:  # a reply that ended inside a character
            yield now[len(shown):]

    def send(self, text: str) -> Iterator[int]:
        """The reply's token ids as they are generated (the stop token included). Stopping
        early (Ctrl-C, or leaving the loop) keeps what was generated as the reply."""
        self._close_reply()
        self.messages.append({"role": "user", "content": text})
        ids = list(self.engine.tokenizer.apply_chat_template(
            self.messages, add_generation_prompt=True, tokenize=True, return_dict=False))
        limit = self.engine.max_context
        room = self.max_new_tokens if limit is None else min(self.max_new_tokens,
                                                            limit - len(ids))
        if room < 1:
            self.messages.pop()
            raise DecodeError(f"the conversation is {len(ids)} tokens, the engine's maximum "
                              f"context is {limit}: /reset to start over")
        turn = {"prefill_tokens": 0, "new_tokens": 0, "seconds": 0.0}
        self.turns.append(turn)
        start = time.perf_counter()
        if not self.cached:
            steps = self._recompute(ids, room, turn)
        elif self.speculative is not None:
            steps = self._speculate(ids, room, turn)
        else:
            steps = self._decode(ids, room, turn)
        for token in steps:
            self._reply.append(token)
            turn["new_tokens"] += 1
            turn["seconds"] = time.perf_counter() - start
            yield token

    # -- the three ways a turn decodes ---------------------------------------------------
    def _common(self, ids: list[int]) -> int:
        """How many of ``ids`` the cache already holds (rows after them are stale)."""
        n = 0
        for a, b in zip(self._ids, ids):
            if a != b:
                break
            n += 1
        return min(n, len(ids) - 1)  # at least one token to prefill: its logits start the reply

    def _room(self, tokens: int) -> None:
        """Cache buffers for ``tokens`` (in place: grown, the kept rows copied over)."""
        eng = self.engine
        if eng._inplace is None:
            if self._cache is None:
                self._cache = eng._empty_cache(1)
            return
        have = 0 if self._cache is None else self._cache[0].shape()[2]
        if tokens <= have:
            return
        if self._cache is None:
            capacity = FIRST_CAPACITY
        else:
            capacity = max(FIRST_CAPACITY, have * 2)
        while capacity < tokens:
            capacity *= 2
        capacity = min(capacity, eng._inplace.max_context)
        if self._cache is None:
            self._cache = eng._empty_cache(1, capacity)
            return
        import onnxruntime as ort

        grown = Buffers()  # its own I/O bindings, as the engine's buffers carry theirs
        for old in self._cache:  # the kept rows, copied once per doubling
            rows = old.numpy()
            array = np.zeros((*rows.shape[:2], capacity, *rows.shape[3:]), dtype=rows.dtype)
            array[:, :, :rows.shape[2]] = rows
            grown.append(ort.OrtValue.ortvalue_from_numpy(array))  # keeps the array alive
        self._cache = grown

    def _decode(self, ids: list[int], room: int, turn: dict) -> Iterator[int]:
        eng = self.engine
        past = self._common(ids)
        self._room(len(ids) + room)
        if eng._inplace is None and past < len(self._ids):  # concat: drop the stale rows
            self._cache = [c[:, :, :past] for c in self._cache]
        self._ids = self._ids[:past]
        feed = ids[past:]
        turn["prefill_tokens"] = len(feed)
        for _ in range(room):
            logits, self._cache = eng._step(np.array([feed], dtype=np.int64), past,
                                            self._cache, 1)
            past += len(feed)
            self._ids += feed
            token = self.sampler(logits[0, -1])
            yield token
            if token in self.stops:
                return
            feed = [token]

    def _speculate(self, ids: list[int], room: int, turn: dict) -> Iterator[int]:
        eng = self.engine
        past = self._common(ids)
        self._room(len(ids) + room)
        self._ids = self._ids[:past]
        turn["prefill_tokens"] = len(ids) - past
        stats = spec.SpeculationStats(self.speculative, int(self.draft_tokens))
        draft = drafter(eng, self.speculative, stats, self.draft)
        emitted: list[int] = []
        try:
            for token in spec.speculative_steps(eng._step, self._cache, ids, room, draft,
                                                int(self.draft_tokens), stats, self.stops,
                                                start=past):
                emitted.append(token)
                # the cache holds every token but the last one emitted
                self._ids = (ids + emitted)[:-1]
                yield token
        finally:
            self.speculation = stats.as_dict()

    def _recompute(self, ids: list[int], room: int, turn: dict) -> Iterator[int]:
        """No cache: the whole conversation, every turn (``Engine.stream``)."""
        turn["prefill_tokens"] = len(ids)
        for step in self.engine.stream(ids, max_new_tokens=room, eos_token_id=list(self.stops),
                                       do_sample=self.sampler.do_sample,
                                       temperature=self.sampler.temperature,
                                       top_k=self.sampler.top_k, top_p=self.sampler.top_p,
                                       seed=int(self.sampler.rng.integers(2**31))):
            if step[0] is None:
                return
            yield step[0]

    def _close_reply(self) -> None:
        """The reply generated so far becomes the assistant's message."""
        if self.turns and self.messages and self.messages[-1]["role"] == "user":
            reply = [t for t in self._reply if t not in self.stops]
            self.messages.append({"role": "assistant",
                                  "content": self.engine.decode(reply).strip()})
        self._reply = []


def drafter(eng, mode: str, stats, draft_engine=None):
    """The drafter ``Engine.stream(speculative=mode)`` would use, for a chat's cache."""
    if mode not in spec.MODES:
        raise DecodeError(f"speculative must be one of {', '.join(spec.MODES)}, got {mode!r}")
    drafters = []
    for kind in mode.split("+"):
        if kind == "ngram":
            drafters.append(spec.ngram_drafter())
            continue
        if kind == "self" and eng.manifest.get("self_draft"):
            kind, other, flags = "self-draft", eng._own_draft(), None
            stats.extra["drafter"] = f"{eng.manifest['self_draft']['mode']} self-draft"
        elif kind == "self":
            if eng.skip_routing is None:
                raise DecodeError("--speculative self drafts with the engine's own quantized "
                                  "copy (optimize --self-draft int4) or its feed-forward "
                                  "blocks skipped (optimize --skip FRACTION); this engine has "
                                  "neither")
            other, flags = eng, eng.skip_flags(spec.SELF_DRAFT_SKIP)
            stats.extra["drafter"] = "engine with feed-forward blocks skipped"
        else:  # draft: another engine of the same model
            other, flags = eng._draft_engine(draft_engine), None
            stats.extra["drafter"] = f"engine {other.path}"
        confidence = spec.DEFAULT_MIN_CONFIDENCE.get(kind, 0.0)
        drafters.append(spec.self_drafter(other._step, flags, stats, confidence))
    return drafters[0] if len(drafters) == 1 else spec.first_of(drafters)
