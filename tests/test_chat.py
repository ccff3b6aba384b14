"""`arcompile chat` and ChatSession: the conversation stays in the KV cache, so a turn
prefills only its new text; typed through a pseudo-terminal as a person would."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from chat_fixture import chat_engine

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """name -> a tiny chat engine: the default (in-place cache), concat, no cache, and one
    with its own int4 drafter (optimize --self-draft int4)."""
    made = {}

    def get(name: str) -> Path:
        if name not in made:
            options = {"inplace": {}, "concat": {"kv_cache_runtime": "concat"},
                       "uncached": {"kv_cache": False}, "self_draft": {"self_draft": "int4"}}[name]
            made[name] = chat_engine(tmp_path_factory.mktemp(f"chat-{name}"), **options)
        return made[name]
    return get


def _tokens(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("kind", ["inplace", "concat"])
def test_second_turn_prefills_only_the_new_text(engines, kind):
    import arcompile
    from arcompile.serve.chat import ChatSession

    eng = arcompile.load(engines(kind))
    tok = eng.tokenizer
    session = ChatSession(eng, max_new_tokens=6)
    first = "Hello there, a first message of some length."  # the tiny model: 128 tokens
    reply = list(session.send(first))
    assert session.turns[0]["prefill_tokens"] == len(tok.apply_chat_template(
        [{"role": "user", "content": first}], add_generation_prompt=True, tokenize=True,
        return_dict=False))
    second = "And now?"
    list(session.send(second))
    # new: the first reply's last token (generated, not yet fed; when it is the stop token it
    # is the template's <|im_end|>), then the template's markers around the second message
    after = "\n" if reply[-1] in session.stops else "<|im_end|>\n"
    new = 1 + len(_tokens(tok, f"{after}<|im_start|>user\n{second}<|im_end|>\n"
                               f"<|im_start|>assistant\n"))
    assert session.prefill_counts[1] == new
    whole = tok.apply_chat_template(session.messages, add_generation_prompt=True,
                                    tokenize=True, return_dict=False)
    assert new < len(whole) / 3  # the conversation so far was not prefilled again


def test_cached_turns_match_recomputing_the_conversation(engines):
    """The reply to the second turn, from the cache, is the one a fresh greedy decode of the
    whole rendered conversation gives; and an engine without a cache says it recomputes."""
    import arcompile
    from arcompile.serve.chat import ChatSession

    cached = ChatSession(arcompile.load(engines("inplace")), max_new_tokens=5)
    plain = ChatSession(arcompile.load(engines("uncached")), max_new_tokens=5)
    assert cached.cached and not plain.cached
    for text in ("Hi!", "What next?"):
        got, want = list(cached.send(text)), list(plain.send(text))
        assert got == want
    assert plain.prefill_counts[1] > cached.prefill_counts[1]  # recomputed: the whole talk


def test_reset_and_the_buffers_growing(engines):
    """Buffers that grow between turns keep the rows: the same replies as buffers that were
    big enough from the start; /reset starts a conversation afresh."""
    import arcompile
    from arcompile.serve import chat
    from arcompile.serve.chat import ChatSession

    eng = arcompile.load(engines("inplace"))
    roomy = ChatSession(eng, max_new_tokens=4)
    want = [list(roomy.send("x" * 8)), list(roomy.send("y" * 20))]
    session = ChatSession(eng, max_new_tokens=4)
    old = chat.FIRST_CAPACITY
    chat.FIRST_CAPACITY = 32  # so the second turn outgrows the first buffers
    try:
        got = [list(session.send("x" * 8))]
        assert session._cache[0].shape()[2] == 32
        got.append(list(session.send("y" * 20)))
        assert session._cache[0].shape()[2] >= 64
    finally:
        chat.FIRST_CAPACITY = old
    assert got == want and session.prefill_counts == roomy.prefill_counts
    session.reset()
    assert session.messages == [] and list(session.send("x" * 8)) == want[0]
    assert session.prefill_counts[-1] == roomy.prefill_counts[0]


def _spawn(engine: Path, *flags: str, slow: Path | None = None):
    """``arcompile chat`` in a pseudo-terminal; ``slow``: a folder whose sitecustomize makes
    each reply token take 50 ms (the tiny model answers faster than Ctrl-C can be sent)."""
    pexpect = pytest.importorskip("pexpect")
    path = str(ROOT) if slow is None else f"{slow}{os.pathsep}{ROOT}"
    env = {**os.environ, "PYTHONPATH": path, "TERM": "xterm"}
    env.pop("CI", None)
    return pexpect.spawn(sys.executable, ["-m", "arcompile", "chat", str(engine),
                                          "--max-new-tokens", "6", *flags],
                         env=env, encoding="utf-8", timeout=60, dimensions=(40, 120))


def test_chat_in_a_terminal(engines):
    """Typed as a person would: two messages, a command, /reset, Ctrl-C at the prompt, /exit."""
    child = _spawn(engines("inplace"))
    child.expect("KV cache")
    child.expect(">>> ")
    child.sendline("Hello there, a first message.")
    child.expect(r"\[prefill (\d+) tokens, reply (\d+) tokens")
    first = int(child.match.group(1))
    child.expect(">>> ")
    child.sendline("And a second one.")
    child.expect(r"\[prefill (\d+) tokens")
    second = int(child.match.group(1))
    assert second < first  # the history came from the cache
    child.expect(">>> ")
    child.sendline("/nonsense")
    child.expect("unknown command")
    child.expect(">>> ")
    child.sendintr()  # Ctrl-C at the prompt: a hint, not the end
    child.expect("Ctrl-D leaves")
    child.expect(">>> ")
    child.sendline("/reset")
    child.expect("conversation cleared")
    child.expect(">>> ")
    child.sendline("Hello there, a first message.")
    child.expect(r"\[prefill (\d+) tokens")
    assert int(child.match.group(1)) == first  # a fresh conversation
    child.expect(">>> ")
    child.sendline("/exit")
    child.expect(pexpect_eof())
    child.close()
    assert child.exitstatus == 0


SLOW_TOKENS = """
import time
import arcompile.serve.chat as chat

_decode = chat.ChatSession._decode


def _slow(self, *args, **kwargs):
    for token in _decode(self, *args, **kwargs):
        time.sleep(0.05)
        yield token


chat.ChatSession._decode = _slow
"""


def test_ctrl_c_stops_a_reply_and_keeps_the_session(engines, tmp_path):
    (tmp_path / "sitecustomize.py").write_text(SLOW_TOKENS)
    child = _spawn(engines("inplace"), "--max-new-tokens", "80", slow=tmp_path)
    child.expect(">>> ")
    child.sendline("Talk for long.")
    child.expect_exact("Talk for long.")  # the terminal's echo of the line
    child.expect(r"\S")  # the reply has started streaming
    child.sendintr()
    child.expect(r"\[stopped\]")
    child.expect(r"\[prefill \d+ tokens, reply (\d+) tokens")
    assert int(child.match.group(1)) < 80
    child.expect(">>> ")
    child.sendline("Still there?")
    child.expect(r"\[prefill (\d+) tokens")
    assert int(child.match.group(1)) < 60  # the stopped reply stayed in the cache
    child.expect(">>> ")
    child.sendeof()  # Ctrl-D leaves
    child.expect(pexpect_eof())
    child.close()
    assert child.exitstatus == 0


def test_uncached_engine_says_it_recomputes(engines):
    child = _spawn(engines("uncached"))
    child.expect("no KV cache: every turn recomputes")
    child.expect(">>> ")
    child.sendline("/exit")
    child.expect(pexpect_eof())


def test_engine_without_chat_template_is_refused(engines):
    import arcompile
    from arcompile.errors import EngineError
    from arcompile.serve.chat import ChatSession

    eng = arcompile.load(engines("inplace"))
    eng.tokenizer.chat_template = None
    with pytest.raises(EngineError, match="no chat template"):
        ChatSession(eng)


def pexpect_eof():
    import pexpect

    return pexpect.EOF


def test_speculative_chat_is_greedy_chat(engines):
    """--speculative (n-gram lookup: it needs only the cache) drafts from where the
    conversation stands; the replies are greedy's, turn after turn, and so are the prefills."""
    import arcompile
    from arcompile.errors import DecodeError
    from arcompile.serve.chat import ChatSession

    eng = arcompile.load(engines("inplace"))
    plain = ChatSession(eng, max_new_tokens=12)
    fast = ChatSession(eng, max_new_tokens=12, speculative="ngram", draft_tokens=3)
    for text in ("abcabcabc", "abcabc again"):
        assert list(fast.send(text)) == list(plain.send(text))
    assert fast.prefill_counts == plain.prefill_counts
    assert fast.speculation is not None and fast.speculation["tokens"] >= 1
    with pytest.raises(DecodeError, match="greedy"):
        ChatSession(eng, speculative="ngram", do_sample=True)
    with pytest.raises(DecodeError, match="in-place"):
        ChatSession(arcompile.load(engines("concat")), speculative="ngram")


def test_speculative_chat_with_the_engines_own_drafter(engines):
    """--speculative self on an engine optimized with --self-draft int4: its int4 copy drafts
    into the conversation's buffers; the replies are still greedy's."""
    import arcompile
    from arcompile.serve.chat import ChatSession

    eng = arcompile.load(engines("self_draft"))
    plain = ChatSession(eng, max_new_tokens=10)
    fast = ChatSession(eng, max_new_tokens=10, speculative="self", draft_tokens=3)
    for text in ("Hello!", "Once more."):
        assert list(fast.send(text)) == list(plain.send(text))
    assert "self-draft" in fast.speculation["drafter"] and fast.speculation["drafted"] > 0
