"""Trace a small GPT-2 with random weights to TorchScript, as many users' models arrive.

The model comes from a transformers ``GPT2Config`` (no download); the traced forward maps
token ids [B, T] to logits [B, T, vocab] with no cache. There is no tokenizer, so run it with
token ids:

    arcompile optimize model.pt -o out/gpt2-ts
    arcompile run out/gpt2-ts --prompt-ids 1,2,3 --max-new-tokens 8
"""

from __future__ import annotations

import argparse
import warnings

import torch


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Trace a small random-weight GPT-2 (tokens -> logits) with torch.jit.trace.")
    parser.add_argument("-o", "--output", default="model.pt",
                        help="TorchScript file to write (default: %(default)s)")
    parser.add_argument("--n-layer", type=int, default=2, help="blocks (default: %(default)s)")
    parser.add_argument("--n-embd", type=int, default=64,
                        help="hidden size (default: %(default)s)")
    parser.add_argument("--n-head", type=int, default=4,
                        help="attention heads; must divide --n-embd (default: %(default)s)")
    parser.add_argument("--vocab-size", type=int, default=512,
                        help="vocabulary size (default: %(default)s)")
    parser.add_argument("--n-positions", type=int, default=128,
                        help="longest sequence (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default: %(default)s)")
    args = parser.parse_args()
    if args.n_embd % args.n_head:
        parser.error("--n-head must divide --n-embd")

    from transformers import GPT2Config, GPT2LMHeadModel

    from arcompile.frontend.export import LogitsOnly

    # GPT-2's end-of-text token is its last id; keep that, inside the smaller vocabulary.
    eot = args.vocab_size - 1
    config = GPT2Config(vocab_size=args.vocab_size, n_positions=args.n_positions,
                        n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head,
                        bos_token_id=eot, eos_token_id=eot)
    torch.manual_seed(args.seed)
    model = LogitsOnly(GPT2LMHeadModel(config)).eval()

    # B=2, T=8: neither 0 nor 1, so the trace does not treat a dim of size 1 as special.
    tokens = torch.randint(0, args.vocab_size, (2, 8),
                           generator=torch.Generator().manual_seed(args.seed))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about Python control flow in HF code
        traced = torch.jit.trace(model, (tokens,), check_trace=False)
    traced.save(args.output)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.output} (TorchScript, GPT-2 {args.n_layer} layers, hidden "
          f"{args.n_embd}, vocab {args.vocab_size}, {n_params / 1e6:.2f}M parameters)")


if __name__ == "__main__":
    main()
