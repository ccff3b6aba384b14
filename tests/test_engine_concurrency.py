"""One Engine shared by threads (a web app's handlers): every call's tokens equal the same call
made alone. Covers the default in-place cache (its per-call buffers and I/O bindings), batches
of mixed prompt lengths, speculative decoding (n-gram, self with skipped blocks, a draft
engine drafting into the caller's buffers) and ``logits()``, interleaved on 4 threads."""

from __future__ import annotations

import gc
import random
import threading
import weakref

import numpy as np
import pytest
import tiny_models as tm

import arcompile

THREADS, REQUESTS = 4, 20


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """A tiny LLaMA with the default (in-place) cache and layer-skip routing (for
    speculative="self")."""
    folder = tmp_path_factory.mktemp("concurrency") / "engine"
    arcompile.optimize(tm.llama(), folder, log=None, skip=0.5, max_context=64)
    eng = arcompile.load(folder)
    assert eng.manifest["kv_cache"]["runtime_cache"] == "inplace"
    return eng


def requests(seed: int) -> list[tuple[str, dict]]:
    """REQUESTS calls of mixed kinds, prompt lengths and new-token counts."""
    rng = random.Random(seed)
    out = []
    for i in range(REQUESTS):
        prompt = [rng.randrange(3, tm.VOCAB) for _ in range(rng.randint(1, 12))]
        count = rng.randint(4, 24)
        kind = ("plain", "batch", "ngram", "self", "draft", "logits")[i % 6]
        if kind == "batch":  # two prompt lengths: two cache groups stepped in turn
            other = [rng.randrange(3, tm.VOCAB) for _ in range(rng.randint(1, 12))]
            out.append(("generate", {"input_ids": [prompt, other, prompt],
                                     "max_new_tokens": count}))
        elif kind == "logits":
            out.append(("logits", {"input_ids": [prompt, prompt[::-1]]}))
        else:
            kw = {"input_ids": prompt, "max_new_tokens": count}
            if kind != "plain":
                kw.update(speculative=kind, draft_tokens=rng.randint(1, 5))
            out.append(("generate", kw))
    return out


def call(eng, kind: str, kw: dict):
    kw = dict(kw)
    if kw.get("speculative") == "draft":
        kw["draft"] = eng  # the same engine drafts: its step binds the caller's buffers
    return getattr(eng, kind)(**kw)


def same(a, b) -> bool:
    if isinstance(a, np.ndarray):
        return a.shape == b.shape and np.allclose(a, b, atol=1e-5, rtol=0)
    return a == b


def test_threads_sharing_an_engine_get_their_solo_tokens(engine):
    work = [requests(seed) for seed in range(THREADS)]
    solo = [[call(engine, kind, kw) for kind, kw in jobs] for jobs in work]
    got: list[list] = [[None] * REQUESTS for _ in range(THREADS)]
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS)

    def worker(t: int) -> None:
        try:
            start.wait()
            for j, (kind, kw) in enumerate(work[t]):
                got[t][j] = call(engine, kind, kw)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=600)
    assert not errors, errors
    wrong = [(t, j, work[t][j]) for t in range(THREADS) for j in range(REQUESTS)
             if not same(got[t][j], solo[t][j])]
    assert not wrong, f"{len(wrong)} of {THREADS * REQUESTS} calls differ from solo: {wrong[:3]}"


def test_speculation_figures_are_the_calling_threads(engine):
    """``Engine.speculation`` is per thread: each thread reads its own decode's figures."""
    seen: dict[int, dict | None] = {}

    def worker(k: int) -> None:
        engine.generate([5, 6, 7, 5, 6, 7, 5, 6], max_new_tokens=8 + k, speculative="ngram",
                        draft_tokens=k + 1)
        seen[k] = engine.speculation

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert {k: (s["draft_tokens"], s["tokens"]) for k, s in seen.items()} == \
        {k: (k + 1, 8 + k) for k in range(3)}


def test_a_decode_lets_go_of_its_buffers(engine):
    """The buffers (and the bindings kept on them) belong to the call: once it ends, or its
    stream is closed early, nothing of the engine holds them."""
    refs = []
    inner = engine._empty_cache

    def spy(batch, capacity=None):
        buffers = inner(batch, capacity)
        refs.append(weakref.ref(buffers))
        return buffers
    engine._empty_cache = spy
    try:
        engine.generate([5, 17, 42], max_new_tokens=6)
        stream = engine.stream([5, 17, 42], max_new_tokens=6)
        next(stream)
        stream.close()
        engine.generate([5, 17, 42], max_new_tokens=6, speculative="draft", draft=engine)
        engine.logits([5, 17, 42])
    finally:
        del engine._empty_cache
    gc.collect()
    assert len(refs) == 4 and all(r() is None for r in refs)
