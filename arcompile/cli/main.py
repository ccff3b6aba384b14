"""The ``arcompile`` command: optimize, run, profile, inspect.

Errors a user can cause print one line on stderr and exit with status 2; ``--debug`` shows
the traceback instead. Anything else is a bug: one line asking to re-run with ``--debug``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from arcompile import __version__, progress
from arcompile.compiler.options import TransformOptions, skip_fraction
from arcompile.errors import ArcompileError


def _log(msg: str) -> None:
    """A progress line on stderr, through the installed reporter (``main``): above the live
    bars on a terminal, plain in a pipe, nothing with --quiet."""
    progress.log(msg)


def cmd_optimize(args: argparse.Namespace) -> int:
    import warnings

    from arcompile.compiler.optimize import optimize
    from arcompile.compiler.uncached import UncachedEngineWarning

    with warnings.catch_warnings():  # the CLI prints the block itself, last
        warnings.simplefilter("ignore", UncachedEngineWarning)
        report = optimize(args.model, args.output, passes=args.passes, tokenizer=args.tokenizer,
                          check_numerics=not args.no_check, log=_log, kv_cache=args.kv_cache,
                          kv_cache_runtime=args.kv_cache_runtime, max_context=args.max_context,
                          self_draft=args.self_draft, **TransformOptions.from_args(args).given())
    if args.explain and not args.quiet:
        for record in report.passes:
            for note in record.notes:
                print(f"{record.name}: {note}")
    lines: list[str] = []  # the figures; print_summary shows them as a table on a terminal
    if report.kv_cache is not None:
        lines.append(f"kv cache: on ({report.kv_cache['layers']} layers)")
    elif report.kv_cache_refused:
        lines.append(f"kv cache: NOT inserted, the engine is UNCACHED: {report.kv_cache_refused}")
    else:
        lines.append("kv cache: off (--kv-cache off), the engine is uncached")
    if report.quantization is not None:
        q = report.quantization
        s = q.get("settings", {})
        detail = (f" ({s['method']}, group {s['block_size']}, zero point "
                  f"{s.get('zero_point', '?')}, LM head {s['lm_head']}"
                  + (", embedding from the LM head" if s.get("embedding") == "lm_head" else "")
                  + (", QDQ weights" if q.get("weight_format") == "qdq" else "")
                  + ")" if "lm_head" in s else "")
        what = " + ".join(([f"{q['mode']}{detail}"] if q["mode"] else [])
                          + (["int8 KV cache"] if q.get("kv_cache") else []))
        lines.append(f"quantization: {what}, perplexity "
                     f"{q['perplexity_unquantized']:.3f} -> {q['perplexity']:.3f} "
                     f"({q['perplexity_increase']:+.2%}), greedy agreement "
                     f"{q['greedy_agreement']:.1%}")
        if q.get("fallback"):
            kept = q["fallback"]["kept"]
            more = f", and {len(kept) - 6} more (arcompile.json lists them)" if len(kept) > 6 else ""
            lines.append(f"  kept in {q['fallback']['to']} by the gate's fallback "
                         f"({len(kept)} of {q['fallback']['modules']} modules): "
                         f"{', '.join(kept[:6])}{more}")
    if report.manifest.get("skip_ffn"):
        s = report.manifest["skip_ffn"]
        ppl = s.get("perplexity") or {}
        lines.append(f"layer skip: {len(s['blocks'])} feed-forward blocks routed, "
                     f"{len(s['chosen'])} skipped at --skip {s['budget']:g}"
                     + (f", perplexity {ppl['full']:.3f} -> {ppl['skipped']:.3f} "
                        f"({ppl['increase']:+.1%})" if ppl else ""))
    if report.manifest.get("self_draft"):
        from arcompile.compiler.self_draft import describe

        lines.append(f"self-draft: {describe(report.manifest['self_draft'])}")
    lines.append(f"engine: {report.output_dir}  ({report.nodes_traced} -> "
                 f"{report.nodes_final} nodes, {report.seconds:.1f} s)")
    if args.quiet:  # errors and the final path only
        print(report.output_dir)
    else:
        progress.print_summary(lines, report.passes, progress.current().finished)
    if report.kv_cache_warning:  # last, on stderr, even with --quiet: the engine is slow
        sys.stdout.flush()
        print(report.kv_cache_warning, file=sys.stderr, flush=True)
    return 0


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise ArcompileError(f"--prompt-ids takes comma-separated integers, got {text!r}") from None


def cmd_run(args: argparse.Namespace) -> int:
    from arcompile.serve.engine import load

    eng = load(args.engine, threads=args.threads)
    if not eng.kv_cache:
        from arcompile.compiler.uncached import describe

        _log(f"arcompile: note: {describe(eng.manifest)}")
    if args.prompt is not None:
        ids = eng.encode(args.prompt, chat=args.chat)
        eos = eng.eos_token_id
    else:
        ids = _parse_ids(args.prompt_ids)
        eos = None
    if args.eos_token_id is not None:
        eos = args.eos_token_id
    text_mode = args.prompt is not None
    kw = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
              eos_token_id=eos, skip=args.skip if args.skip is not None else False,
              speculative=args.speculative, draft_tokens=args.draft_tokens, draft=args.draft)
    if args.stream:
        new: list[int] = []
        shown = ""
        for step in eng.stream(ids, **kw):
            if step[0] is None:
                break
            new.append(step[0])
            if text_mode:
                text = eng.decode(new)
                print(text[len(shown):], end="", flush=True)
                shown = text
            else:
                print(step[0], end=",", flush=True)
        print()
        _report_speculation(eng)
        return 0
    new = eng.generate(ids, **kw)
    print(eng.decode(new) if text_mode else ",".join(str(t) for t in new))
    _report_speculation(eng)
    return 0


def _report_speculation(eng) -> None:
    s = eng.speculation
    if s is not None:
        drafter = f", drafted by the {s['drafter']}" if s.get("drafter") else ""
        _log(f"speculative ({s['mode']}{drafter}): {s['accepted']} of {s['drafted']} drafts "
             f"accepted ({s['acceptance_rate']:.0%}), {s['tokens_per_round']:.2f} tokens per "
             f"verifying step")


def cmd_chat(args: argparse.Namespace) -> int:
    from arcompile.serve.chat import ChatSession
    from arcompile.serve.engine import load

    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    import signal

    # Ctrl-C stops a reply even when chat was started with SIGINT ignored (a shell's `cmd &`
    # passes that on, and Python then installs no handler of its own)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    eng = load(args.engine, threads=args.threads)
    session = ChatSession(eng, system=args.system, max_new_tokens=args.max_new_tokens,
                          do_sample=args.do_sample, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                          eos_token_id=args.eos_token_id, speculative=args.speculative,
                          draft_tokens=args.draft_tokens, draft=args.draft)
    how = ("history kept in the KV cache: each turn prefills only its new text"
           if session.cached else "this engine has no KV cache: every turn recomputes the "
                                  "whole conversation")
    _log(f"chat with {args.engine} ({how}). /reset starts over, /exit or Ctrl-D leaves, "
         f"Ctrl-C stops a reply.")
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            _log("(Ctrl-C stops a reply; /exit or Ctrl-D leaves)")
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit", "/bye"):
            return 0
        if text == "/reset":
            session.reset()
            _log("(conversation cleared)")
            continue
        if text.startswith("/"):
            _log(f"unknown command {text.split()[0]}: /reset or /exit (text starting with / "
                 f"needs a space before it)")
            continue
        stopped = False
        try:
            for piece in session.say(line):
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            stopped = True
        except ArcompileError as e:  # the conversation is full, say: the session goes on
            print()
            print(f"arcompile: error: {e}", file=sys.stderr)
            continue
        print(" [stopped]" if stopped else "", flush=True)
        _report_turn(session, args.stats)


def _report_turn(session, stats: bool) -> None:
    if not stats or not session.turns:
        return
    t = session.turns[-1]
    rate = f", {t['new_tokens'] / t['seconds']:.1f} tokens/s" if t["seconds"] > 0 else ""
    spec = ""
    if session.speculative and session.speculation:
        spec = f", {session.speculation['acceptance_rate']:.0%} of drafts accepted"
    _log(f"[prefill {t['prefill_tokens']} tokens, reply {t['new_tokens']} tokens{rate}{spec}]")


def cmd_profile(args: argparse.Namespace) -> int:
    from arcompile.cli.profile_report import (
        format_modes,
        format_table,
        plot,
        write_json,
    )
    from arcompile.cli.profiling import profile
    from arcompile.runtimes.onnxruntime.session import check_threads

    check_threads(args.threads)  # before the long run, not after it
    if args.plot:  # fail before the long run, not after it
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ArcompileError("--plot needs matplotlib: pip install 'arcompile[profile]'") from None
    report = profile(args.model, passes=args.passes, kv_cache=args.kv_cache,
                     output_dir=args.output, prompt_tokens=args.prompt_tokens,
                     decode_tokens=args.decode_tokens, agreement_tokens=args.agreement_tokens,
                     held_tokens=args.held_tokens, repeats=args.repeats, threads=args.threads,
                     log=_log, **TransformOptions.from_args(args).given())
    print(format_table(report))
    if format_modes(report):
        print("\n" + format_modes(report))
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        plot(report, args.plot)
        print(f"wrote {args.plot}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from arcompile.cli.describe import inspect_path

    print(inspect_path(args.target, show_constants=args.constants, limit=args.limit,
                       passes=args.passes, log=_log))
    return 0


def add_transform_options(p: argparse.ArgumentParser) -> None:
    """The options of optimize that change what the engine computes (quantization, the int8
    KV cache, layer-skip routing); ``profile`` takes them too. One flag per field of
    ``TransformOptions``, in its order."""
    for f in fields(TransformOptions):
        p.add_argument(f"--{f.name.replace('_', '-')}", default=f.default, **f.metadata["flag"])


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    """Sampling, the stop token and threads: the same for ``run`` and ``chat``."""
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--eos-token-id", type=int, help="stop token (default: the tokenizer's)")
    p.add_argument("--threads", type=int, help="ONNX Runtime threads (default: all cores)")


def add_quiet_option(p: argparse.ArgumentParser, result: str) -> None:
    p.add_argument("-q", "--quiet", action="store_true",
                   help=f"no progress: print only errors (stderr) and {result} (stdout)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="arcompile",
                                description="Compile autoregressive PyTorch models into fast "
                                            "decoding engines (ONNX Runtime).")
    p.add_argument("--version", action="version", version=f"arcompile {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True)

    o = sub.add_parser("optimize", help="trace a model, run passes, write an engine directory",
                       description="MODEL is a torch.export archive, a TorchScript archive, a "
                                   "Hugging Face folder or a GGUF file (detected by content).")
    o.add_argument("model", help="model file or folder")
    o.add_argument("-o", "--output", required=True, help="engine directory to write")
    o.add_argument("--passes", default="default",
                   help="preset (default, none) or comma-separated pass names")
    o.add_argument("--tokenizer", help="folder with a tokenizer to store in the engine")
    o.add_argument("--explain", action="store_true",
                   help="list every candidate a pass did not rewrite, and why")
    o.add_argument("--no-check", action="store_true",
                   help="skip the numeric check after every pass and after lowering")
    o.add_argument("--kv-cache", choices=("auto", "require", "off"), nargs="?", const="auto",
                   default="auto",
                   help="the KV cache (prefill, then one token per step): auto (default) inserts "
                        "it, and if the pass refuses writes the uncached engine and ends with a "
                        "warning saying why; require fails instead (exit 2, nothing written); "
                        "off never inserts it")
    o.add_argument("--no-kv-cache", dest="kv_cache", action="store_const", const="off",
                   help="the same as --kv-cache off")
    o.add_argument("--kv-cache-runtime", choices=("inplace", "concat"), default="inplace",
                   help="inplace (default: GroupQueryAttention writing into buffers bound as "
                        "both past and present) or concat (presents fed back as new arrays)")
    o.add_argument("--max-context", type=int, default=None,
                   help="the most tokens (prompt + new) the engine decodes (default: the "
                        "model's max_position_embeddings, else 2048; at most the rows of a "
                        "learned position table)")
    add_transform_options(o)
    add_quiet_option(o, "the engine's path")
    o.add_argument("--self-draft", choices=("int4", "int8"), default=None,
                   help="also write a round-to-nearest int4 (or int8) copy of the model "
                        "inside the engine (DIR/draft) that drafts for `run --speculative "
                        "self`; the full engine verifies, so greedy output is unchanged")
    o.set_defaults(func=cmd_optimize)

    r = sub.add_parser("run", help="generate with an engine directory")
    r.add_argument("engine", help="engine directory written by `arcompile optimize`")
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="text prompt (needs the engine's tokenizer)")
    src.add_argument("--prompt-ids", help="comma-separated token ids, e.g. 1,2,3")
    r.add_argument("--chat", action="store_true", help="wrap --prompt in the chat template")
    r.add_argument("--max-new-tokens", type=int, default=32)
    r.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    add_sampling_options(r)
    r.add_argument("--skip", type=skip_fraction, nargs="?", const=True, metavar="FRACTION",
                   help="lossy layer skipping (an engine optimized with --skip): the engine's "
                        "choice, or the top FRACTION of its ranking of feed-forward blocks")
    r.add_argument("--speculative",
                   choices=("self", "ngram", "draft", "ngram+self", "ngram+draft"),
                   help="lossless speculative greedy decoding: self (draft with the "
                        "engine's quantized copy, optimized with --self-draft, else with "
                        "feed-forward blocks skipped, optimized with --skip), ngram (prompt "
                        "lookup), draft (the --draft engine drafts) or ngram+self / "
                        "ngram+draft (lookup first); prints the acceptance rate")
    r.add_argument("--draft", metavar="ENGINE",
                   help="with --speculative draft: an engine of the same model to draft "
                        "with, e.g. optimized with --quantize int4")
    r.add_argument("--draft-tokens", type=int, default=4,
                   help="with --speculative: tokens drafted per verifying step (default 4)")
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("chat", help="talk with an engine (its chat template, history in the "
                                    "KV cache)",
                       description="An interactive conversation: type a message, the reply "
                                   "streams. /reset starts over, /exit (or Ctrl-D) leaves, "
                                   "Ctrl-C stops a reply and keeps the session.")
    c.add_argument("engine", help="engine directory with a tokenizer that has a chat template")
    c.add_argument("--system", help="a system message to start the conversation with")
    c.add_argument("--max-new-tokens", type=int, default=256, help="per reply (256)")
    add_sampling_options(c)
    c.add_argument("--speculative",
                   choices=("self", "ngram", "draft", "ngram+self", "ngram+draft"),
                   help="lossless speculative greedy decoding, as in `run` (the in-place "
                        "cache only)")
    c.add_argument("--draft", metavar="ENGINE", help="with --speculative draft: the drafter")
    c.add_argument("--draft-tokens", type=int, default=4,
                   help="with --speculative: tokens drafted per verifying step (default 4)")
    c.add_argument("--stats", action=argparse.BooleanOptionalAction, default=True,
                   help="after each reply, its prefill and reply token counts and speed on "
                        "stderr (default on)")
    c.set_defaults(func=cmd_chat)

    f = sub.add_parser("profile", help="measure latency, memory and accuracy after every pass",
                       description="Runs the pipeline and, before the first pass and after "
                                   "each one, lowers the graph as it stands and measures it on "
                                   "the same prompts against eager PyTorch.")
    f.add_argument("model", help="model file or folder (as for optimize)")
    f.add_argument("--passes", default="default",
                   help="preset (default, cleanup, none) or comma-separated pass names")
    f.add_argument("--kv-cache", action=argparse.BooleanOptionalAction, default=True,
                   help="profile the KV-cache insertion too (default on)")
    f.add_argument("-o", "--output", help="also keep the final engine in this directory")
    f.add_argument("--json", help="write the numbers to this JSON file")
    f.add_argument("--plot", help="write a PNG chart of latency and accuracy per pass")
    f.add_argument("--prompt-tokens", type=int, default=128, help="prefill length (128)")
    f.add_argument("--decode-tokens", type=int, default=128,
                   help="tokens decoded for the ms/token percentiles (128)")
    f.add_argument("--agreement-tokens", type=int, default=64,
                   help="greedy tokens compared with eager PyTorch (64)")
    f.add_argument("--held-tokens", type=int, default=512,
                   help="held-out tokens for perplexity (512)")
    f.add_argument("--repeats", type=int, default=3, help="prefill timings per row (median)")
    f.add_argument("--threads", type=int, help="ONNX Runtime threads (default: all cores)")
    add_transform_options(f)
    add_quiet_option(f, "the table and the files written")
    f.set_defaults(func=cmd_profile)

    i = sub.add_parser("inspect", help="print a model's IR or an engine's manifest")
    i.add_argument("target", help="model file/folder or engine directory")
    i.add_argument("--passes", default="none",
                   help="for a model: passes to run before printing (default none)")
    i.add_argument("--constants", action="store_true", help="also list weights/constants")
    i.add_argument("--limit", type=int, help="print at most this many nodes")
    i.set_defaults(func=cmd_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:  # progress on stderr: bars on a terminal, plain lines elsewhere, none with --quiet
        with progress.reporting(progress.for_stream(quiet=getattr(args, "quiet", False))):
            return args.func(args)
    except ArcompileError as e:
        if args.debug:
            raise
        print(f"arcompile: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("arcompile: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: keep it to one line unless asked
        if args.debug:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"arcompile: internal error: {type(e).__name__}: {first} "
              "(re-run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
