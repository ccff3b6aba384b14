"""Tiny models with random weights: the fixtures for shapes and ops (DESIGN.md).

Each builder returns an eval-mode module mapping tokens [B, T] to logits [B, T, V]. They are
small enough that exporting, optimizing and lowering one takes a second or two.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arcompile.frontend.export import LogitsOnly  # noqa: E402
from examples.nanogpt import NanoGPTConfig  # noqa: E402
from examples.nanogpt import build as build_nanogpt

VOCAB = 512


def _hf(config_cls_name: str, model_cls_name: str, **kw) -> torch.nn.Module:
    import transformers

    config = getattr(transformers, config_cls_name)(vocab_size=VOCAB, bos_token_id=1,
                                                    eos_token_id=2, pad_token_id=0, **kw)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls_name)(config).eval()
    return LogitsOnly(model).eval()


def gpt2() -> torch.nn.Module:
    return _hf("GPT2Config", "GPT2LMHeadModel", n_layer=2, n_embd=64, n_head=4, n_positions=128)


def llama() -> torch.nn.Module:
    """LLaMA-shaped like SmolLM2: GQA (4 query heads, 2 KV heads), RoPE, tied embeddings."""
    return _hf("LlamaConfig", "LlamaForCausalLM", hidden_size=64, intermediate_size=128,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=128, rope_theta=10000.0, tie_word_embeddings=True)


def gpt_neox() -> torch.nn.Module:
    """Partial rotary (rotary_pct 0.25), parallel residual."""
    return _hf("GPTNeoXConfig", "GPTNeoXForCausalLM", hidden_size=64, intermediate_size=128,
               num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
               rotary_pct=0.25)


def opt() -> torch.nn.Module:
    """Learned positions with OPT's offset of 2."""
    return _hf("OPTConfig", "OPTForCausalLM", hidden_size=64, ffn_dim=128, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=64)


def nanogpt() -> torch.nn.Module:
    return build_nanogpt(cfg=NanoGPTConfig(vocab_size=VOCAB))


def trace_torchscript(module: torch.nn.Module, path: Path) -> Path:
    """What many users have: ``torch.jit.trace(model, example).save("model.pt")``."""
    example = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        traced = torch.jit.trace(module, (example,), check_trace=False)
    traced.save(str(path))
    return path


def model_and_source(name: str, folder: Path) -> tuple[torch.nn.Module, object]:
    """The eager fixture and what to hand to arcompile: GPT-2 as the form many users have, a
    traced TorchScript .pt in ``folder``; the others as the module itself."""
    module = BUILDERS[name]()
    if name == "gpt2":
        return module, str(trace_torchscript(module, folder / "gpt2.pt"))
    return module, module


def engine_pairs(tmp_path_factory, first: dict, second: dict, check=None):
    """A fixture's getter: name -> (eager module, engine built with ``first``'s optimize
    options, engine built with ``second``'s), each model built once. ``check(report)`` sees
    the first build's report."""
    import arcompile

    built: dict = {}

    def get(name: str):
        if name not in built:
            folder = tmp_path_factory.mktemp(name)
            module, source = model_and_source(name, folder)
            report = arcompile.optimize(source, folder / "first", log=None, **first)
            if check is not None:
                check(report)
            arcompile.optimize(source, folder / "second", log=None, **second)
            built[name] = (module, arcompile.load(folder / "first"),
                           arcompile.load(folder / "second"))
        return built[name]
    return get


BUILDERS = {"gpt2": gpt2, "llama": llama, "gpt_neox": gpt_neox, "opt": opt, "nanogpt": nanogpt}


def gptj() -> torch.nn.Module:
    """GPT-J: interleaved rotary (``rotate_every_two``) on the first 4 of 16 head dims, cos/sin
    looked up in a constant sin|cos table by position id."""
    return _hf("GPTJConfig", "GPTJForCausalLM", n_embd=64, n_inner=128, n_layer=2, n_head=4,
               n_positions=128, rotary_dim=4)


def gpt2_eager() -> torch.nn.Module:
    """GPT-2 with transformers' hand-written eager attention (matmul, additive mask, softmax)."""
    return _hf("GPT2Config", "GPT2LMHeadModel", n_layer=2, n_embd=64, n_head=4, n_positions=128,
               attn_implementation="eager")


# Builders for other ways of writing the same architectures (the fusion passes' fixtures).
VARIANTS = {"gpt2_eager": gpt2_eager}
