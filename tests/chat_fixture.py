"""A tiny engine that can chat: the tiny LLaMA with a character-level tokenizer that has a
ChatML chat template (SmolLM2's form). Every id decodes to one character and every character
encodes back to its id, so a reply's text renders to the very tokens that were generated."""

from __future__ import annotations

from pathlib import Path

SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
                 "{{ message['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def chat_tokenizer(folder: Path, vocab: int = 512) -> Path:
    """A tokenizer folder: ``vocab - 3`` single characters (printable ASCII first, then more
    code points), then the three ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    code = 0xC0
    while len(chars) < vocab - len(SPECIALS):
        chars.append(chr(code))
        code += 1
    table = {c: i for i, c in enumerate(chars)}
    tok = Tokenizer(models.BPE(vocab=table, merges=[]))  # no merges: one token per character
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)
    fast.save_pretrained(str(folder))
    return folder


def chat_engine(folder: Path, **options) -> Path:
    """The tiny LLaMA optimized with that tokenizer into ``folder / "engine"``."""
    import tiny_models as tm

    import arcompile

    tokenizer = chat_tokenizer(folder / "tokenizer")
    out = folder / "engine"
    arcompile.optimize(tm.llama(), out, tokenizer=tokenizer, log=None, **options)
    return out
