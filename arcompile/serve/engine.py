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

An engine optimized with ``skip`` (layer-skip routing, ``passes/skip_ffn.py``) takes a flag
per routed feed-forward block: ``generate(..., skip=True)`` decodes with the calibrated choice
skipped (lossy; ``skip=0.3``: the top 30% of the ranking), and ``speculative="self"`` drafts
with them skipped and verifies with the full model, losslessly for greedy decoding
(``speculative.py``); an engine optimized with ``self_draft="int4"`` drafts with its own
quantized copy instead (``compiler/self_draft.py``; faster on small models). ``speculative="ngram"``
(prompt lookup) needs only the cache:

    new = eng.generate(ids, max_new_tokens=128, speculative="self", draft_tokens=4)
    eng.speculation   # {"acceptance_rate": ..., "tokens_per_round": ..., ...}

Loading checks the manifest (format version, every file's size and hash) before ONNX
Runtime sees the model, and refuses a directory that does not match.

Threads may share one Engine: every call allocates its own cache buffers (and, in place, the
I/O bindings kept on them: ``runtimes/onnxruntime/inplace_step.py``), so concurrent calls
never see each other's cache and run in parallel in ONNX Runtime; ``speculation`` is per
thread, and what is loaded lazily (the tokenizer, the self-draft) is loaded once under a lock.
"""

from __future__ import annotations

import json
import threading
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from arcompile.errors import DecodeError, EngineError, first_line
from arcompile.ir.skip_routing import choose
from arcompile.runtimes.engine_dir import DRAFT_FOLDER, MANIFEST, read_manifest
from arcompile.runtimes.onnxruntime.dtypes import ONNX_DTYPE_NAMES
from arcompile.runtimes.onnxruntime.inplace_step import InplaceStep
from arcompile.runtimes.onnxruntime.session import check_threads, make_session
from arcompile.serve import checks
from arcompile.serve import speculative as spec
from arcompile.serve.chat_template import render
from arcompile.serve.decoding import (
    Sampler,
    as_batch,
    check_context,
    decode_steps,
    pad_right,
)
from arcompile.serve.kv_decoding import cached_decode_steps

RUNTIMES = ("onnxruntime-cpu",)
# The bound of an engine whose manifest names none (an uncached engine from a .pt2 without a
# config): optimize's own default for a cache (compile.DEFAULT_MAX_CONTEXT; not imported, as
# compile imports torch). It keeps max_new_tokens=10**9 from running unbounded, each step of
# an uncached engine recomputing the whole prefix.
DEFAULT_MAX_CONTEXT = 2048


class Engine:
    def __init__(self, path: str | Path, threads: int | None = None, check_hashes: bool = True):
        self.path = Path(path)
        self._threads = check_threads(threads)  # before the manifest's hashes, which take time
        self.manifest = read_manifest(self.path, check_hashes=check_hashes)
        runtime = self.manifest.get("runtime")
        if runtime not in RUNTIMES:
            raise EngineError(f"engine runtime {runtime!r} is not supported by this arcompile "
                              f"(supported: {', '.join(RUNTIMES)})")
        model = self.path / self.manifest["model_file"]
        try:
            self._session = make_session(model, threads=threads)
        except Exception as e:  # ONNX Runtime's refusals (a path escape is "Fail") are generic
            raise EngineError(f"ONNX Runtime cannot open {model}: {first_line(e)}; the engine "
                              "is damaged or was written by another arcompile") from None
        _check_signature(self.manifest, self._session, model)
        self._input = self.manifest["inputs"][0]["name"]
        self._output = self.manifest["outputs"][0]["name"]
        self._tokenizer: Any = None
        self._cache: dict | None = self.manifest.get("kv_cache")
        self._inplace = None  # the in-place step (runtime_cache "inplace"), else None
        self._skip: dict | None = self.manifest.get("skip_ffn")  # layer-skip routing, or None
        # its flags input with no flag set (the full model), fed when a step sets none
        self._skip_off: dict = ({} if self._skip is None else
                                {self._skip["input"]: np.zeros(len(self._skip["blocks"]), bool)})
        self._local = threading.local()  # per thread: the last speculative decode's figures
        self._loading = threading.Lock()  # the lazily loaded tokenizer and self-draft
        self._self_draft: "Engine | None" = None  # optimize --self-draft's engine, once loaded
        if self._cache is not None:
            self._output = self._cache["logits"]
            inputs = {i["name"]: i for i in self.manifest["inputs"]}
            self._past_names = [n for pair in self._cache["past"] for n in pair]
            self._present_names = [n for pair in self._cache["present"] for n in pair]
            self._past_shapes = [inputs[n]["shape"] for n in self._past_names]
            self._past_dtypes = [np.dtype(inputs[n]["dtype"]) for n in self._past_names]
            self._keep = self._cache.get("logits_to_keep")  # input name, or None: all rows
            if self._cache.get("runtime_cache") == "inplace":  # buffers bound past = present
                self._inplace = InplaceStep(self._session, self._input,
                                            self._cache["past_length"], self._output,
                                            self._past_names, self._present_names,
                                            int(self._cache["max_context"]), self._keep,
                                            self._skip_off)

    @property
    def kv_cache(self) -> bool:
        """Whether this engine decodes with a KV cache (``optimize``'s default)."""
        return self._cache is not None

    # -- model ------------------------------------------------------------------------
    @property
    def config(self) -> dict:
        return self.manifest.get("config", {})

    @property
    def max_context(self) -> int:
        """The most tokens (prompt + new) a call may reach: the model's maximum context; a
        cached engine: at most its cache's; neither known: ``DEFAULT_MAX_CONTEXT``."""
        limits = [self.config.get("max_position_embeddings"),
                  (self._cache or {}).get("max_context")]
        limits = [int(n) for n in limits if n]
        return min(limits) if limits else DEFAULT_MAX_CONTEXT

    @property
    def vocab_size(self) -> int | None:
        """The number of token ids the engine takes (the config's, else the logits' last
        dim), or None where neither says."""
        size = self.config.get("vocab_size") or self.manifest["outputs"][0]["shape"][-1]
        return int(size) if isinstance(size, int) else None

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

    def _step(self, ids: np.ndarray, past_length: int, pasts: list[np.ndarray], keep: int = 0,
              skip: np.ndarray | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """One cached step: logits of the new tokens (the last ``keep``; 0: all, and all
        when the engine cannot keep fewer) and the presents (the next pasts). ``skip``: the
        layer-skip flags (bool [N]); None runs every block."""
        extra = {self._skip["input"]: skip} if skip is not None else None
        if self._inplace is not None:  # binds the flags off itself when extra is None
            return self._inplace(ids, past_length, pasts, keep, extra)
        feed = {self._input: ids, self._cache["past_length"]: np.array(past_length, np.int64)}
        if self._keep is not None:
            feed[self._keep] = np.array(keep, np.int64)
        feed.update(extra or self._skip_off)
        feed.update(zip(self._past_names, pasts))
        outs = self._session.run([self._output, *self._present_names], feed)
        return outs[0], outs[1:]

    @property
    def skip_routing(self) -> dict | None:
        """The manifest's layer-skip routing (blocks, scores, ranking, choice), or None."""
        return self._skip

    def skip_flags(self, skip: bool | float = True) -> np.ndarray:
        """The layer-skip flags for ``skip``: True, the engine's calibrated choice; a fraction
        in (0, 1), the top of its ranking of feed-forward blocks."""
        if self._skip is None:
            raise DecodeError("this engine has no layer-skip routing; optimize with --skip "
                              "FRACTION (e.g. --skip 0.25)")
        try:
            chosen = choose(self._skip, skip)
        except ValueError as e:
            raise DecodeError(str(e)) from None
        flags = np.zeros(len(self._skip["blocks"]), dtype=bool)
        flags[chosen] = True
        return flags

    def logits(self, input_ids, skip: bool | float = False) -> np.ndarray:
        """Logits [B, T, V] for whole sequences; rows must have equal length. ``skip``: with
        the layer-skip choice skipped (see ``skip_flags``)."""
        flags = self.skip_flags(skip) if skip is not False else None
        rows, _ = as_batch(input_ids)
        checks.token_ids(rows, self.vocab_size)
        if len({len(r) for r in rows}) != 1:
            raise DecodeError("logits() needs rows of equal length; call it per row instead")
        ids, _ = pad_right(rows)
        if ids.shape[1] > self.max_context:
            raise DecodeError(f"sequence of {ids.shape[1]} tokens exceeds the engine's maximum "
                              f"context of {self.max_context}")
        if flags is not None:  # one prefill with the flags set, every row kept
            return self._step(ids, 0, self._empty_cache(*ids.shape), 0, flags)[0]
        return self._forward(ids)

    # -- decoding ---------------------------------------------------------------------
    def stream(self, input_ids, max_new_tokens: int = 32, do_sample: bool = False,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               seed: int | None = None, eos_token_id: int | Sequence[int] | None = None,
               skip: bool | float = False, speculative: str | None = None,
               draft_tokens: int = 4, draft_skip: bool | float | None = None,
               min_confidence: float | None = None, draft: "Engine | str | None" = None
               ) -> Iterator[list[int | None]]:
        """Yield each step's new token per row (None once a row has stopped).

        ``skip``: decode with the layer-skip choice skipped (lossy; True or a fraction, see
        ``skip_flags``). ``speculative``: ``"self"`` (draft with the engine's own quantized
        copy when it was optimized with ``self_draft``, unless ``draft_skip`` is given; else
        with ``draft_skip``'s blocks skipped, default ``speculative.SELF_DRAFT_SKIP``),
        ``"ngram"`` (prompt lookup) or ``"draft"`` (another engine of the same model and
        cache layout drafts, e.g. its int4 build: ``draft`` is that Engine or its folder), up
        to ``draft_tokens`` drafts verified in one full step; greedy and batch 1 only, the
        output is plain greedy's.
        ``min_confidence``: stop drafting with a model below this top probability (default
        ``speculative.DEFAULT_MIN_CONFIDENCE``).
        """
        # every argument checked before the first step (checks.py): one-line DecodeErrors
        rows, _ = as_batch(input_ids)
        checks.token_ids(rows, self.vocab_size)
        sampler = Sampler(do_sample, temperature, top_k, top_p, seed)
        do_sample = sampler.do_sample
        eos_token_id = checks.stop_tokens(eos_token_id, self.vocab_size)
        max_new_tokens = checks.new_tokens(max_new_tokens, rows, self.max_context)
        if min_confidence is not None:
            min_confidence = checks.real("min_confidence", min_confidence, 0.0, 1.0)
        if speculative is not None:
            yield from self._speculative(rows, max_new_tokens, do_sample, eos_token_id, skip,
                                         speculative, draft_tokens, draft_skip, min_confidence,
                                         draft)
            return
        step = self._step
        if skip is not False:  # lossy: every step with the chosen blocks skipped
            if self._cache is None:
                raise DecodeError("skip needs a cached engine")
            step = partial(self._step, skip=self.skip_flags(skip))
        if self._cache is None:  # recompute the (right-padded) prefix every step
            yield from decode_steps(self._forward, rows, max_new_tokens, sampler, eos_token_id,
                                    self.max_context)
            return
        check_context(rows, max_new_tokens, self.max_context)
        groups: dict[int, list[int]] = {}  # prompt length -> its rows, each group one cache
        for i, row in enumerate(rows):
            groups.setdefault(len(row), []).append(i)
        streams = [(members, cached_decode_steps(
            step, self._empty_cache, [rows[i] for i in members], max_new_tokens, sampler,
            eos_token_id, self.max_context, drop_stopped=self._inplace is None))
            for members in groups.values()]
        try:
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
        finally:  # also when the caller stops reading early: the buffers go now
            for _, steps in streams:
                steps.close()

    def _speculative(self, rows: list[list[int]], max_new_tokens: int, do_sample: bool,
                     eos_token_id, skip, mode: str, draft_tokens: int, draft_skip,
                     min_confidence: float | None, draft_engine=None
                     ) -> Iterator[list[int | None]]:
        if not isinstance(mode, str) or mode not in spec.MODES:
            raise DecodeError(f"speculative must be None or one of {', '.join(spec.MODES)}, "
                              f"got {mode!r}")
        kinds = mode.split("+")  # "ngram+self": prompt lookup first, the model when it has none
        if self._cache is None:
            raise DecodeError("speculative decoding needs a cached engine (this one has no KV "
                              "cache: optimize without kv_cache=False)")
        if do_sample:
            raise DecodeError("speculative decoding is lossless for greedy decoding only; "
                              "drop do_sample")
        if skip is not False:
            raise DecodeError("speculative decoding verifies with the full model; drop skip "
                              "(draft_skip sets what the self drafter skips)")
        if len(rows) != 1:
            raise DecodeError(f"speculative decoding runs one prompt at a time (batch 1); got "
                              f"{len(rows)} prompts")
        # more drafts than the decode has tokens are never used (speculative_steps' room)
        draft_tokens = checks.integer("draft_tokens", draft_tokens, 1, self.max_context)
        check_context(rows, max_new_tokens, self.max_context)
        stats = spec.SpeculationStats(mode, int(draft_tokens))
        drafters = []
        own_copy = self.manifest.get("self_draft") and draft_skip in (None, False)
        for kind in kinds:
            if kind == "self" and own_copy:  # optimize --self-draft: the quantized copy drafts
                kind = "self-draft"
            confidence = spec.DEFAULT_MIN_CONFIDENCE.get(kind, 0.0) \
                if min_confidence is None else min_confidence
            if kind == "self-draft":
                own = self._own_draft()
                stats.extra.update({"drafter": f"{self.manifest['self_draft']['mode']} "
                                               f"self-draft",
                                    "min_confidence": confidence})
                drafters.append(spec.self_drafter(own._step, None, stats, confidence))
            elif kind == "self":
                if self._skip is None and draft_skip is None:
                    raise DecodeError('speculative="self" drafts with the engine\'s own '
                                      'quantized copy (optimize --self-draft int4) or its '
                                      'feed-forward blocks skipped (optimize --skip '
                                      'FRACTION); this engine has neither')
                if draft_skip is None:
                    draft_skip = spec.SELF_DRAFT_SKIP
                flags = self.skip_flags(draft_skip)
                stats.extra.update({"drafter": "engine with feed-forward blocks skipped",
                                    "draft_skip": draft_skip,
                                    "skipped_blocks": int(flags.sum()),
                                    "min_confidence": confidence})
                drafters.append(spec.self_drafter(self._step, flags, stats, confidence))
            elif kind == "draft":
                other = self._draft_engine(draft_engine)
                flags = other.skip_flags(draft_skip) if draft_skip not in (None, False) \
                    else None
                stats.extra.update({"draft_engine": str(other.path), "draft_skip": draft_skip,
                                    "min_confidence": confidence})
                drafters.append(spec.self_drafter(other._step, flags, stats, confidence))
            else:
                drafters.append(spec.ngram_drafter())
        draft = drafters[0] if len(drafters) == 1 else spec.first_of(drafters)
        prompt = rows[0]
        cache = self._empty_cache(1, len(prompt) + max_new_tokens)
        trim = None if self._inplace is not None else (
            lambda c, n: [x[:, :, :n] for x in c])
        try:
            for token in spec.speculative_steps(self._step, cache, prompt, max_new_tokens,
                                                draft, int(draft_tokens), stats, eos_token_id,
                                                trim):
                yield [token]
        finally:  # also when the caller stops reading early
            self._local.speculation = stats.as_dict()

    @property
    def speculation(self) -> dict | None:
        """The figures of this thread's last speculative decode (acceptance rate, tokens per
        round, ...), or None before one."""
        return getattr(self._local, "speculation", None)

    def _own_draft(self) -> "Engine":
        """The self-draft (``compiler/self_draft.py``), loaded once and checked like a draft
        engine. Its files were checked with this engine's manifest; the folder is always
        ``DRAFT_FOLDER``, whatever a manifest says, so a crafted manifest cannot point the
        loader elsewhere."""
        with self._loading:
            if self._self_draft is None:
                if f"{DRAFT_FOLDER}/{MANIFEST}" not in self.manifest.get("files", {}):
                    raise EngineError(f"engine {self.path} names a self-draft but its files do "
                                      f"not list {DRAFT_FOLDER}/; re-run `arcompile optimize "
                                      f"--self-draft`")
                own = Engine(self.path / DRAFT_FOLDER, threads=self._threads, check_hashes=False)
                self._self_draft = self._draft_engine(own)
        return self._self_draft

    def _draft_engine(self, draft) -> "Engine":
        """``draft`` as an Engine whose cache this engine's buffers can hold: the same layers,
        KV heads, head size, dtype, runtime and vocabulary (its rows are overwritten by the
        verifying step, so only their layout must agree)."""
        if draft is None:
            raise DecodeError('speculative="draft" needs draft=ENGINE (or its folder), e.g. '
                              'the same model optimized with --quantize int4')
        other = draft if isinstance(draft, Engine) else Engine(draft, threads=self._threads)
        mine, theirs = self._cache, other._cache or {}
        keys = ("layers", "num_kv_heads", "head_dim", "dtype", "runtime_cache", "past")
        differ = [k for k in keys if mine.get(k) != theirs.get(k)]
        vocab = (self.config.get("vocab_size"), other.config.get("vocab_size"))
        if differ or vocab[0] != vocab[1]:
            what = ", ".join(differ + (["vocab_size"] if vocab[0] != vocab[1] else []))
            raise DecodeError(f"the draft engine {other.path} cannot share this engine's cache: "
                              f"its {what} differ")
        return other

    def generate(self, input_ids, max_new_tokens: int = 32, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int | None = None, eos_token_id: int | Sequence[int] | None = None,
                 skip: bool | float = False, speculative: str | None = None,
                 draft_tokens: int = 4, draft_skip: bool | float | None = None,
                 min_confidence: float | None = None, draft: "Engine | str | None" = None):
        """Only the new tokens, in the shape of ``input_ids`` (a row stops after its EOS).
        ``skip``, ``speculative``, ``draft_tokens``, ``draft_skip``, ``min_confidence``,
        ``draft``: see ``stream``; ``self.speculation`` then holds the figures (acceptance
        rate, ...)."""
        rows, single = as_batch(input_ids)
        out: list[list[int]] = [[] for _ in rows]
        for step in self.stream(rows, max_new_tokens, do_sample, temperature, top_k, top_p,
                                seed, eos_token_id, skip, speculative, draft_tokens,
                                draft_skip, min_confidence, draft):
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
            self._tokenizer = load_tokenizer(AutoTokenizer, folder, EngineError)
        return self._tokenizer

    def encode(self, text: str, chat: bool = False) -> list[int]:
        tok = self.tokenizer
        if chat:
            if not getattr(tok, "chat_template", None):
                raise EngineError("this engine's tokenizer has no chat template; drop --chat")
            # rendered here, with time and output bounds, not by transformers (chat_template.py)
            prompt = render(tok.chat_template, [{"role": "user", "content": text}],
                            add_generation_prompt=True, **tok.special_tokens_map)
            return list(tok.encode(prompt, add_special_tokens=False))
        return list(tok.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    @property
    def eos_token_id(self) -> int | None:
        eos = self.config.get("eos_token_id")
        if eos is None and (self.path / "tokenizer").is_dir():
            eos = self.tokenizer.eos_token_id
        return eos


def load_tokenizer(auto_tokenizer, folder: Path, error: type[Exception]) -> Any:
    """The tokenizer in ``folder``, never running code from it: ``trust_remote_code=False``
    refuses a tokenizer whose ``auto_map`` names a Python class (transformers would otherwise
    ask "run the custom code? [y/N]" on stdin, and "y" runs it). ``error``: what to raise."""
    for name in ("tokenizer_config.json", "config.json"):
        try:
            entries = json.loads((folder / name).read_text())
        except (OSError, ValueError, RecursionError):
            continue  # absent or unreadable: transformers says what is wrong below
        # with trust_remote_code=False transformers quietly takes another class instead,
        # and saving that tokenizer would copy the auto_map on: refuse it outright
        if isinstance(entries, dict) and entries.get("auto_map"):
            raise error(f"the tokenizer in {folder} needs its own Python code ({name} has an "
                        "auto_map); arcompile never runs a tokenizer's own Python code: save "
                        "one that the tokenizers library reads alone (tokenizer.json)")
    try:
        return auto_tokenizer.from_pretrained(str(folder), local_files_only=True,
                                              trust_remote_code=False)
    except Exception as e:  # transformers raises ValueError, OSError and others
        raise error(f"cannot read a tokenizer from {folder}: {first_line(e)} (arcompile never "
                    "runs a tokenizer's own Python code; save one that the tokenizers library "
                    "reads alone, tokenizer.json)") from None


def _check_signature(manifest: dict, session, model: Path) -> None:
    """EngineError unless the manifest's inputs and outputs are the model's: same names, same
    dtypes, and the same size wherever both give a number (a manifest that claims a head size
    of 10**12 must not size buffers from it)."""
    for kind, real in (("inputs", session.get_inputs()), ("outputs", session.get_outputs())):
        actual = {a.name: a for a in real}
        for entry in manifest[kind]:
            a = actual.get(entry["name"])
            claimed = [d if isinstance(d, int) else None for d in entry["shape"]]
            dims = [d if isinstance(d, int) else None for d in (a.shape if a else [])]
            if a is None or len(claimed) != len(dims) or any(
                    c is not None and d is not None and c != d for c, d in zip(claimed, dims)) \
                    or ONNX_DTYPE_NAMES.get(a.type, entry["dtype"]) != entry["dtype"]:
                raise EngineError(f"the manifest's {kind[:-1]} {entry['name']!r} "
                                  f"({entry['dtype']}{entry['shape']}) is not the model's "
                                  f"({a.type + str(a.shape) if a else 'absent'} in "
                                  f"{model.name}); the engine is damaged")


def load(path: str | Path, threads: int | None = None) -> Engine:
    """Open an engine directory written by ``arcompile optimize``."""
    return Engine(path, threads=threads)
