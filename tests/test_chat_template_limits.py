"""Chat templates are rendered with bounded time and output (``arcompile/chat_template.py``):
nested range loops and huge repeated strings fail within seconds with one-line EngineErrors,
without allocating, while a normal (ChatML, SmolLM2's form) template renders exactly as
transformers renders it."""

from __future__ import annotations

import resource
import time

import pytest

from arcompile.errors import EngineError
from arcompile.serve.chat_template import MAX_SECONDS, render

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
          "Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt "
          "%}{{ '<|im_start|>assistant\n' }}{% endif %}")
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
HOSTILE = {
    "nested loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
                    "{% endfor %}",
    "repeated string": "{{ 'a'*2000000000 }}",
    "repeated list": "{{ ([1]*1000)*1000000 }}",
    "big call argument": "{{ 'a'.center(2000000000) }}",
    "output": "{% for i in range(2000000) %}abcdefgh{% endfor %}",
    "recursion": "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
}


def hf_tokenizer(template: str):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<|im_start|>", "<|im_end|>", "<unk>"]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|im_start|>",
                                  eos_token="<|im_end|>", unk_token="<unk>")
    tok.chat_template = template
    return tok


def test_a_normal_template_renders_as_transformers_renders_it():
    tok = hf_tokenizer(CHATML)
    for generation in (True, False):
        want = tok.apply_chat_template(MESSAGES, add_generation_prompt=generation,
                                       tokenize=False)
        assert render(CHATML, MESSAGES, generation, **tok.special_tokens_map) == want
    assert render("{{ bos_token }}{{ messages|tojson }}", MESSAGES, bos_token="<s>") == \
        hf_tokenizer("{{ bos_token }}{{ messages|tojson }}").apply_chat_template(
            MESSAGES, tokenize=False).replace("<|im_start|>", "<s>")


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_templates_fail_fast_without_allocating(name):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    start = time.perf_counter()
    with pytest.raises(EngineError) as info:
        render(HOSTILE[name], MESSAGES)
    assert time.perf_counter() - start < MAX_SECONDS + 3
    assert "\n" not in str(info.value) and "chat template" in str(info.value)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown < 200_000, f"{grown} KiB"


def test_engine_encode_uses_the_bounded_renderer(tmp_path):
    """``Engine.encode(chat=True)`` (``run --chat``) goes through ``render``."""
    import arcompile.serve.engine as engine_module

    class Fake:
        _tokenizer = hf_tokenizer(HOSTILE["nested loops"])
        tokenizer = _tokenizer

    start = time.perf_counter()
    with pytest.raises(EngineError, match="longer than"):
        engine_module.Engine.encode(Fake(), "hi", chat=True)
    assert time.perf_counter() - start < MAX_SECONDS + 3
    Fake.tokenizer = hf_tokenizer(CHATML)
    assert engine_module.Engine.encode(Fake(), "hi", chat=True) == \
        Fake.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                           add_generation_prompt=True, tokenize=True,
                                           return_dict=False)
