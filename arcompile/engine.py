"""A loaded engine directory: ``arcompile.load(dir)`` returns an Engine.

    eng = arcompile.load("out/smollm2")
    new = eng.generate([1, 2, 3], max_new_tokens=16)          # -> list[int]
    new = eng.generate([[1, 2, 3], [4, 5]], max_new_tokens=16)  # -> list[list[int]]
    logits = eng.logits([1, 2, 3])                            # -> np.ndarray [1, 3, V]

A cached engine (manifest ``kv_cache``; ``optimize``'s default) decodes with the cache: one
prefill that computes only the last position's logits, then one token per step. With
``runtime_cache: "inplace"`` (the default) the cache lives in per-layer [B, Hkv, capacity, D]
buffers allocated when a decode starts (capacity = prompt + new tokens, at most max_context)
and bound as both past and present, so no step copies it; with ``"concat"`` the presents are
fed back as the next pasts. A batch of prompts of different lengths is decoded as one cached
group per prompt length, stepped together (no padding reaches the cache; each row's tokens are
those it gets alone); engines without a cache recompute the right-padded prefix every step.

Loading checks the manifest (format version, every file's size and hash) before ONNX
Runtime sees the model, and refuses a directory that does not match.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from arcompile.decoding import Sampler, as_batch, check_context, decode_steps, pad_right
from arcompile.errors import DecodeError, EngineError
from arcompile.kv_decoding import cached_decode_steps
from arcompile.runtimes.engine_dir import read_manifest

RUNTIMES = ("onnxruntime-cpu",)


class Engine:
    def __init__(self, path: str | Path, threads: int | None = None, check_hashes: bool = True):
        self.path = Path(path)
        self.manifest = read_manifest(self.path, check_hashes=check_hashes)
        runtime = self.manifest.get("runtime")
        if runtime not in RUNTIMES:
            raise EngineError(f"engine runtime {runtime!r} is not supported by this arcompile "
                              f"(supported: {', '.join(RUNTIMES)})")
        from arcompile.runtimes.onnxruntime.session import make_session

        self._session = make_session(self.path / self.manifest["model_file"], threads=threads)
        self._input = self.manifest["inputs"][0]["name"]
        self._output = self.manifest["outputs"][0]["name"]
        self._tokenizer: Any = None
        self._cache: dict | None = self.manifest.get("kv_cache")
        self._inplace = None  # the in-place step (runtime_cache "inplace"), else None
        if self._cache is not None:
            self._output = self._cache["logits"]
            inputs = {i["name"]: i for i in self.manifest["inputs"]}
            self._past_names = [n for pair in self._cache["past"] for n in pair]
            self._present_names = [n for pair in self._cache["present"] for n in pair]
            self._past_shapes = [inputs[n]["shape"] for n in self._past_names]
            self._past_dtypes = [np.dtype(inputs[n]["dtype"]) for n in self._past_names]
            self._keep = self._cache.get("logits_to_keep")  # input name, or None: all rows
            if self._cache.get("runtime_cache") == "inplace":  # buffers bound past = present
                from arcompile.runtimes.onnxruntime.inplace_step import InplaceStep

                self._inplace = InplaceStep(self._session, self._input,
                                            self._cache["past_length"], self._output,
                                            self._past_names, self._present_names,
                                            int(self._cache["max_context"]), self._keep)

    @property
    def kv_cache(self) -> bool:
        """Whether this engine decodes with a KV cache (``optimize``'s default)."""
        return self._cache is not None

    # -- model ------------------------------------------------------------------------
    @property
    def config(self) -> dict:
        return self.manifest.get("config", {})

    @property
    def max_context(self) -> int | None:
        """The model's maximum context; an in-place cached engine: at most its buffers'."""
        limits = [self.config.get("max_position_embeddings"),
                  (self._cache or {}).get("max_context")]
        limits = [int(n) for n in limits if n]
        return min(limits) if limits else None

    def _forward(self, ids: np.ndarray) -> np.ndarray:
        """Logits [B, T, V] of whole sequences (a cached engine: one prefill, empty cache)."""
        if self._cache is None:
            return self._session.run([self._output], {self._input: ids})[0]
        return self._step(ids, 0, self._empty_cache(*ids.shape))[0]

    def _empty_cache(self, batch: int, capacity: int | None = None) -> list:
        """An empty cache for ``batch`` rows; in-place: buffers for ``capacity`` tokens (the
        whole decode writes into them; default and cap: max_context)."""
        if self._inplace is not None:
            return self._inplace.buffers(batch, capacity or self._inplace.max_context,
                                         self._past_shapes, self._past_dtypes)
        return [np.zeros((batch, shape[1], 0, *shape[3:]), dtype=dtype)
                for shape, dtype in zip(self._past_shapes, self._past_dtypes)]

    def _step(self, ids: np.ndarray, past_length: int, pasts: list[np.ndarray], keep: int = 0
              ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One cached step: logits of the new tokens (the last ``keep``; 0: all, and all
        when the engine cannot keep fewer) and the presents (the next pasts)."""
        if self._inplace is not None:
            return self._inplace(ids, past_length, pasts, keep)
        feed = {self._input: ids, self._cache["past_length"]: np.array(past_length, np.int64)}
        if self._keep is not None:
            feed[self._keep] = np.array(keep, np.int64)
        feed.update(zip(self._past_names, pasts))
        outs = self._session.run([self._output, *self._present_names], feed)
        return outs[0], outs[1:]

    def logits(self, input_ids) -> np.ndarray:
        """Logits [B, T, V] for whole sequences; rows must have equal length."""
        rows, _ = as_batch(input_ids)
        if len({len(r) for r in rows}) != 1:
            raise DecodeError("logits() needs rows of equal length; call it per row instead")
        ids, _ = pad_right(rows)
        if self.max_context and ids.shape[1] > self.max_context:
            raise DecodeError(f"sequence of {ids.shape[1]} tokens exceeds the engine's maximum "
                              f"context of {self.max_context}")
        return self._forward(ids)

    # -- decoding ---------------------------------------------------------------------
    def stream(self, input_ids, max_new_tokens: int = 32, do_sample: bool = False,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               seed: int | None = None, eos_token_id: int | Sequence[int] | None = None,
               ) -> Iterator[list[int | None]]:
        """Yield each step's new token per row (None once a row has stopped)."""
        rows, _ = as_batch(input_ids)
        sampler = Sampler(do_sample, temperature, top_k, top_p, seed)
        if self._cache is None:  # recompute the (right-padded) prefix every step
            yield from decode_steps(self._forward, rows, max_new_tokens, sampler, eos_token_id,
                                    self.max_context)
            return
        check_context(rows, max_new_tokens, self.max_context)
        groups: dict[int, list[int]] = {}  # prompt length -> its rows, each group one cache
        for i, row in enumerate(rows):
            groups.setdefault(len(row), []).append(i)
        streams = [(members, cached_decode_steps(
            self._step, self._empty_cache, [rows[i] for i in members], max_new_tokens, sampler,
            eos_token_id, self.max_context, drop_stopped=self._inplace is None))
            for members in groups.values()]
        for _ in range(max_new_tokens):
            out: list[int | None] = [None] * len(rows)
            live = False
            for members, steps in streams:
                tokens = next(steps, None)  # None: every row of the group has stopped
                if tokens is not None:
                    live = True
                    for i, t in zip(members, tokens):
                        out[i] = t
            if not live:
                return
            yield out

    def generate(self, input_ids, max_new_tokens: int = 32, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int | None = None, eos_token_id: int | Sequence[int] | None = None):
        """Only the new tokens, in the shape of ``input_ids`` (a row stops after its EOS)."""
        rows, single = as_batch(input_ids)
        out: list[list[int]] = [[] for _ in rows]
        for step in self.stream(rows, max_new_tokens, do_sample, temperature, top_k, top_p,
                                seed, eos_token_id):
            for i, t in enumerate(step):
                if t is not None:
                    out[i].append(t)
        return out[0] if single else out

    # -- text -------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        """The tokenizer saved with the engine (transformers), or EngineError if none."""
        if self._tokenizer is None:
            folder = self.path / "tokenizer"
            if not folder.is_dir():
                raise EngineError(f"engine {self.path} has no tokenizer; pass token ids "
                                  "(--prompt-ids) or optimize with --tokenizer DIR")
            try:
                from transformers import AutoTokenizer
            except ImportError:
                raise EngineError("reading text needs the hf extra: pip install 'arcompile[hf]'") from None
            self._tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        return self._tokenizer

    def encode(self, text: str, chat: bool = False) -> list[int]:
        tok = self.tokenizer
        if chat:
            if not getattr(tok, "chat_template", None):
                raise EngineError("this engine's tokenizer has no chat template; drop --chat")
            return list(tok.apply_chat_template([{"role": "user", "content": text}],
                                                add_generation_prompt=True, tokenize=True,
                                                return_dict=False))
        return list(tok.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    @property
    def eos_token_id(self) -> int | None:
        eos = self.config.get("eos_token_id")
        if eos is None and (self.path / "tokenizer").is_dir():
            eos = self.tokenizer.eos_token_id
        return eos


def load(path: str | Path, threads: int | None = None) -> Engine:
    """Open an engine directory written by ``arcompile optimize``."""
    return Engine(path, threads=threads)
