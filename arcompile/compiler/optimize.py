"""``arcompile.optimize``: model → IR → passes → engine directory.

The steps, each reported through ``log``:
1. load the model (frontend; by content, never running code from the file);
2. convert it to the IR and verify it;
3. run the pipeline with hooks that verify the graph and check its logits on sample tokens
   after every pass (against the graph it got, both run by the reference interpreter in
   float64: ``passes/numeric_check.py`` is the one place that says how numbers are checked);
4. insert the KV cache (``InsertKVCache`` then DCE; on by default, ``kv_cache=False`` skips
   it) after the checked pipeline, outside the numeric check (the graph's inputs change; the
   pass proves the cached step against full recomputation itself). A refusal keeps the
   uncached graph, says why and records the reason in the manifest (``kv_cache_refused``);
5. lower to ONNX in a staging folder, run the lowered model on the same sample tokens with
   ONNX Runtime's own optimizations off, and compare once more, ORT's float32 against the
   interpreter's float64 within ``numeric_check.LOWERING`` of the logits' magnitude (a cached
   graph: with an empty
   cache, and split in two steps with the presents fed back; ``kv_cache_runtime="inplace"``:
   the same two ways through the engine's step, buffers bound as both past and present);
6. write the manifest and move the folder into place.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from arcompile import progress
from arcompile.compiler import quantization
from arcompile.compiler import self_draft as own_draft
from arcompile.compiler.options import TransformOptions
from arcompile.compiler.uncached import (
    UncachedEngineWarning,
    kv_cache_mode,
    may_be_causal,
    warning_block,
)
from arcompile.compiler.write_engine import write_engine
from arcompile.errors import ArcompileError
from arcompile.frontend.from_export import from_exported_program
from arcompile.frontend.load import LoadedModel, load_model
from arcompile.ir.cached_step import CachedStep
from arcompile.ir.verify import verify
from arcompile.passes import (
    NumericCheckHook,
    PassManager,
    PassRecord,
    VerifyHook,
    build_pipeline,
)
from arcompile.passes.dce import DeadCodeElimination
from arcompile.passes.insert_kv_cache import InsertKVCache
from arcompile.passes.manager import Hook
from arcompile.passes.pack_attention import PackAttention
from arcompile.passes.skip_ffn import SkipFFN
from arcompile.runtimes.engine_dir import check_output_dir
from arcompile.serve.engine import load_tokenizer

SAMPLE_SHAPE = (1, 8)
DEFAULT_MAX_CONTEXT = 2048  # when the model's config names no max_position_embeddings


@dataclass
class OptimizeReport:
    output_dir: Path
    passes: list[PassRecord]
    lowering_max_abs_diff: float
    nodes_traced: int
    nodes_final: int
    seconds: float
    manifest: dict = field(default_factory=dict)
    kv_cache: dict | None = None  # the manifest's cache layout; None when uncached
    kv_cache_refused: str | None = None  # why InsertKVCache left the graph uncached
    quantization: dict | None = None  # the manifest's quantization entry (gate figures)
    # kv_cache="auto" wrote an uncached engine for a model that may have causal attention:
    # the warning block (compiler/uncached.py), also raised as UncachedEngineWarning
    kv_cache_warning: str | None = None


def _sample_tokens(vocab_size: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab_size, SAMPLE_SHAPE, generator=gen)


def optimize(model: Any, output_dir: str | Path, example_inputs: tuple | None = None,
             passes: str | list[str] = "default", tokenizer: str | Path | None = None,
             check_numerics: bool = True, log: Callable[[str], None] | None = print,
             kv_cache: bool | str = "auto", kv_cache_runtime: str = "inplace",
             max_context: int | None = None, hooks: Sequence[Hook] = (),
             self_draft: str | None = None, **options: Any) -> OptimizeReport:
    """Optimize ``model`` (path, nn.Module or ExportedProgram) into an engine at ``output_dir``.

    ``passes``: a preset (``default``, ``none``) or pass names. ``tokenizer``: a folder to
    take the tokenizer from when the model file has none. ``kv_cache``: ``"auto"`` (default,
    also ``True``): make a cached step engine, and when the pass refuses write the uncached
    engine, say why and warn (``UncachedEngineWarning``, ``report.kv_cache_warning``);
    ``"require"``: a refusal is an ArcompileError and nothing is written; ``"off"`` (also
    ``False``): never try (``compiler/uncached.py``).
    ``kv_cache_runtime``: ``"inplace"`` (default: GroupQueryAttention writing into
    [B, Hkv, capacity, D] buffers the engine allocates per call, bound as both past and
    present) or ``"concat"`` (presents are new arrays fed back; copies the cache every step).
    ``max_context``: the most tokens (prompt + new) an engine decodes; defaults to the
    model's ``max_position_embeddings``, else 2048, and never beyond the rows of a learned
    position table (``_position_table``). ``hooks``: more pass-manager hooks, run
    after every pass (``arcompile profile`` measures with one). ``**options``: what changes
    what the engine computes (quantization, the int8 KV cache, layer-skip routing): the
    fields of ``TransformOptions`` (``compiler/options.py``, one list with what each does;
    ``quantize="int4"``, ``max_ppl_increase=0.08``, ``kv_cache_dtype="int8"``, ``skip=0.25``,
    ...; the defaults are ``compiler/quantization.py``'s); an unknown name is an error.
    ``self_draft``: ``"int4"`` or ``"int8"``: also write a
    round-to-nearest quantized copy of the model at ``OUT/draft`` that drafts for
    ``speculative="self"`` (``self_draft.py``).
    """
    opts = TransformOptions.from_keywords(options, "optimize")
    cache_mode = kv_cache_mode(kv_cache)
    kv_cache = cache_mode != "off"
    kv_int8 = opts.kv_cache_dtype == "int8"
    if kv_int8 and not kv_cache:
        raise ArcompileError("--kv-cache-dtype int8 quantizes the KV cache; it cannot go "
                             "with --no-kv-cache")
    if kv_int8 and kv_cache_runtime != "inplace":
        raise ArcompileError(f"--kv-cache-dtype int8 needs the in-place cache runtime "
                             f"(GroupQueryAttention's int8 cache), not --kv-cache-runtime "
                             f"{kv_cache_runtime}")
    if kv_cache_runtime not in ("concat", "inplace"):
        raise ArcompileError(f"kv_cache_runtime {kv_cache_runtime!r} is not 'concat' or 'inplace'")
    own_draft.check_options(self_draft, opts.quantize, kv_cache, opts.kv_cache_dtype)
    check_output_dir(Path(output_dir))  # before the slow part, not after it
    if max_context is not None and int(max_context) < 1:
        raise ArcompileError(f"max_context must be a positive number of tokens, got {max_context}")
    say = log or (lambda _msg: None)
    start = time.perf_counter()
    pipeline = build_pipeline(passes)  # fail on a bad --passes before the slow load
    given_tok = _tokenizer(None, tokenizer)  # and on a tokenizer folder arcompile refuses

    if isinstance(model, LoadedModel):  # already loaded (tests and tools share one load)
        loaded = model
    else:
        loaded = load_model(model, example_inputs=example_inputs, log=say)
    say("converting to IR")
    with progress.step("converting to IR"):
        graph = from_exported_program(loaded.program, name=loaded.config.get("name") or "model")
        verify(graph)
    nodes_traced = len(graph)
    vocab = loaded.config.get("vocab_size") or graph.outputs[0].shape[-1]
    sample = _sample_tokens(int(vocab))

    checks = [VerifyHook()]
    if check_numerics:
        with progress.step("reference logits for the numeric checks (interpreter)"):
            checks.append(NumericCheckHook(graph, [sample]))
    say(f"running {len(pipeline)} passes on {nodes_traced} nodes")
    records = PassManager(pipeline, checks + list(hooks), log=say).run(graph)
    cached, refused = None, None  # the CachedStep (ir/cached_step.py), or None: uncached
    if kv_cache:
        limit = int(max_context or loaded.config.get("max_position_embeddings")
                    or DEFAULT_MAX_CONTEXT)
        cached, refused, cache_records = _insert_kv_cache(
            graph, say, kv_cache_runtime, limit, hooks)
        records += cache_records
        if refused and cache_mode == "require":
            raise ArcompileError(f"--kv-cache require: the KV cache could not be inserted: "
                                 f"{refused}; nothing was written")
        table = _position_table(graph)
        if cached is not None and table is not None and table[0] < limit:
            if max_context is not None:
                raise ArcompileError(f"--max-context {max_context} is beyond the model's "
                                     f"{table[0]} positions (the position table {table[1]})")
            limit = table[0]
            cached = graph.meta["kv_cache"] = replace(cached, max_context=limit)
            say(f"  max context {limit}: the rows of the position table {table[1]}")
        if kv_int8 and cached is None:
            raise ArcompileError(f"--kv-cache-dtype int8: the KV cache was not inserted, so "
                                 f"there is none to quantize ({refused}); nothing was written")

    tok = given_tok if tokenizer is not None else loaded.tokenizer
    extra, validate, quantized = {}, None, None
    # the most tokens the model takes: calibration and held-out measurements stay within it
    context = (cached.max_context if cached is not None
               else int(max_context or loaded.config.get("max_position_embeddings") or 0)
               or None)
    nested = None
    if self_draft is not None:  # copied before the engine's own routing and quantization
        if cached is None:
            raise ArcompileError(f"--self-draft drafts into the KV cache, which was not "
                                 f"inserted ({refused}); nothing was written")
        nested = own_draft.writer(graph, self_draft, tok, int(vocab), loaded, say, context)
    if opts.skip is not None:  # layer-skip routing: after the cache, before quantization
        records += _skip_ffn(graph, opts.skip, tok, int(vocab), say, hooks, context)
    if opts.quantize or kv_int8:
        quant_records, quantized = quantization.quantize(graph, opts, tok, int(vocab), say,
                                                         hooks, max_tokens=context)
        records += quant_records
        extra["quantization"] = quantized

        def check_perplexity(folder: Path) -> None:  # ORT's perplexity against the IR's
            quantization.check_engine(folder, quantized)
            say(f"  ONNX Runtime perplexity {quantized['perplexity_onnxruntime']:.3f} "
                f"(IR: {quantized['perplexity']:.3f})")
            quantized.pop("_ids", None)
        validate = check_perplexity
    manifest, cache_layout, diff = write_engine(
        graph, output_dir, loaded, records, tokenizer=tok,
        sample=sample if check_numerics and not (opts.quantize or kv_int8) else None,
        refused=refused, log=say, extra=extra, validate=validate, nested=nested)
    seconds = time.perf_counter() - start
    say(f"wrote {output_dir} in {seconds:.1f} s")
    warning = None
    if refused and cache_mode == "auto":
        if may_be_causal(graph):
            warning = warning_block(refused)
            warnings.warn(UncachedEngineWarning(warning), stacklevel=2)
    return OptimizeReport(Path(output_dir), records, diff, nodes_traced, len(graph), seconds,
                          manifest, cache_layout, refused, quantized, warning)


def _insert_kv_cache(graph, say: Callable[[str], None], runtime_cache: str, max_context: int,
                     hooks: Sequence[Hook] = ()) -> tuple[CachedStep | None, str | None, list]:
    """InsertKVCache then DCE, verified; for the in-place runtime then PackAttention and DCE
    (attention on the projections' [B, T, n*D] layout, one GroupQueryAttention per layer).
    Each proves itself against the graph it got (the cached step's inputs are not the traced
    graph's, so the pipeline's numeric check cannot). Returns (the CachedStep or None,
    refusal reason, records)."""
    say("inserting the KV cache")
    records = PassManager([InsertKVCache(runtime_cache=runtime_cache, max_context=max_context),
                           DeadCodeElimination()], [VerifyHook(), *hooks], log=say).run(graph)
    if graph.meta.get("kv_cache") is not None and records[0].counts.get("attention_cached"):
        if runtime_cache == "inplace":
            records += PassManager([PackAttention(), DeadCodeElimination()],
                                   [VerifyHook(), *hooks], log=say).run(graph)
        return graph.meta["kv_cache"], None, records
    reason = "; ".join(records[0].notes) or "insert_kv_cache: refused (no reason given)"
    say(f"  KV cache not inserted, the engine is uncached: {reason}")
    return None, reason, records


def _position_table(graph) -> tuple[int, str] | None:
    """(rows, where) of the smallest constant table that the cached step indexes with values
    computed from ``past_length`` (learned position embeddings, OPT's offset positions):
    the model has no position beyond it. None when there is none (rotary, computed tables)."""
    cached = graph.meta.get("kv_cache")
    name = cached.past_length if cached is not None else None
    past = next((v for v in graph.inputs if v.name == name), None)
    if past is None:
        return None
    reach, stack = {past}, [past]  # every value computed from past_length
    while stack:
        for node, _ in stack.pop().uses():
            for out in node.outputs:
                if out not in reach:
                    reach.add(out)
                    stack.append(out)
    tables = [(n.arg("weight").shape[0], n.where()) for n in graph.nodes()
              if n.op == "aten.embedding" and n.arg("indices") in reach
              and n.arg("weight").is_constant and isinstance(n.arg("weight").shape[0], int)]
    return min(tables) if tables else None


def _skip_ffn(graph, budget: float, tokenizer: Any, vocab: int, say: Callable[[str], None],
              hooks: Sequence[Hook] = (), max_tokens: int | None = None) -> list:
    """SkipFFN (calibrated on calibration text, perplexity measured on held-out text),
    verified; ArcompileError when it refuses (``--skip`` asked for it)."""
    say(f"routing feed-forward blocks (skip budget {budget:g})")
    try:
        skip = SkipFFN(budget, tokenizer=tokenizer, vocab=vocab, measure=True,
                       max_tokens=max_tokens)
    except ValueError as e:
        raise ArcompileError(str(e)) from None
    records = PassManager([skip], [VerifyHook(), *hooks], log=say).run(graph)
    if "skip_ffn" not in graph.meta:
        raise ArcompileError("; ".join(records[0].notes) or "skip_ffn: refused")
    ppl = graph.meta["skip_ffn"]["perplexity"]
    say(f"  skipping {len(graph.meta['skip_ffn']['chosen'])} of "
        f"{len(graph.meta['skip_ffn']['scores'])} feed-forward blocks: perplexity "
        f"{ppl['full']:.3f} -> {ppl['skipped']:.3f} ({ppl['increase']:+.1%}, interpreter)")
    return records


def _tokenizer(from_source: Any, folder: str | Path | None) -> Any:
    if folder is None:
        return from_source
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ArcompileError("--tokenizer needs the hf extra: pip install 'arcompile[hf]'") from None
    if not Path(folder).is_dir():
        raise ArcompileError(f"tokenizer folder {folder} does not exist")
    return load_tokenizer(AutoTokenizer, Path(folder), ArcompileError)


