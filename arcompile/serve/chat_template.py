"""Rendering a tokenizer's chat template (``run --chat``, ``Engine.encode(chat=True)``) with
bounded time and output.

A chat template is code from the engine folder (Jinja). transformers renders it in an
``ImmutableSandboxedEnvironment``, which stops attribute escapes but not work: nested
``range(100000)`` loops ran for minutes and ``{{ 'a'*2000000000 }}`` reached 13 GB (issue 22).
Here it is rendered in the same sandbox, set up as transformers sets it up (trim_blocks,
lstrip_blocks, loop controls, ``tojson``, ``raise_exception``, ``strftime_now``), so normal
templates give the same text, with these bounds:

- ``range`` yields lazily and every item checks a deadline (``MAX_SECONDS``), so loops end
  in time whatever they nest; output chunks check it too;
- ``*`` and ``+`` refuse results over ``MAX_OUTPUT`` characters (or items), and so do calls
  given an integer argument above it (``'a'.center(10**9)``), before anything is allocated;
- the rendered text is streamed and refused past ``MAX_OUTPUT`` characters.

Why in-process rather than a child process with a timeout and RLIMIT_AS: a child costs a
process start per prompt, forking a process that holds ONNX Runtime's threads is unsafe, and
RLIMIT_AS is per process, not per template. The bounds above act before the allocation, and
the deadline is polled wherever a template can loop (``range``, every output chunk).
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from arcompile.errors import EngineError

MAX_SECONDS = 2.0  # a real template renders in well under a millisecond
MAX_OUTPUT = 1_000_000  # characters of rendered text (a prompt the model could not hold anyway)


class TemplateLimit(EngineError):
    """A chat template ran past its time or output bound."""


def render(template: str, messages: list[dict], add_generation_prompt: bool = True,
           **variables: Any) -> str:
    """The text ``template`` renders for ``messages``; ``variables``: the tokenizer's special
    tokens (``bos_token``, ...). EngineError (one line) when the template fails or breaks a
    bound."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    deadline = time.monotonic() + MAX_SECONDS

    def check_time() -> None:
        if time.monotonic() > deadline:
            raise TemplateLimit(f"the chat template ran longer than {MAX_SECONDS:g} s; it is "
                                f"not a usable template (drop --chat or fix the tokenizer's "
                                f"chat_template)")

    def bounded_range(*args: int):
        for i in range(*args):
            check_time()
            yield i

    def too_big(what: str) -> TemplateLimit:
        return TemplateLimit(f"the chat template builds {what} over {MAX_OUTPUT} characters "
                             f"(or items); it is not a usable template")

    class Bounded(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "+", "**"})

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if hasattr(seq, "__len__") and isinstance(n, int) and \
                            len(seq) * n > MAX_OUTPUT:
                        raise too_big("a repeated string or list")
            if operator == "+" and hasattr(left, "__len__") and hasattr(right, "__len__") \
                    and len(left) + len(right) > MAX_OUTPUT:
                raise too_big("a string or list")
            if operator == "**" and isinstance(right, int) and right > 64:
                raise too_big("a power")
            return super().call_binop(context, operator, left, right)

        def call(self, context, obj, *args, **kwargs):
            if any(isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_OUTPUT
                   for a in (*args, *kwargs.values())) and obj is not bounded_range:
                raise too_big("a call argument")
            check_time()
            return super().call(context, obj, *args, **kwargs)

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        import json

        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = Bounded(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, range=bounded_range,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        compiled = env.from_string(template)
        size, parts = 0, []
        for chunk in compiled.generate(messages=messages,
                                       add_generation_prompt=add_generation_prompt,
                                       **variables):
            check_time()
            size += len(chunk)
            if size > MAX_OUTPUT:
                raise too_big("output")
            parts.append(chunk)
    except TemplateLimit:
        raise
    except (jinja2.exceptions.TemplateError, RecursionError, MemoryError, OverflowError,
            TypeError, ValueError) as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise EngineError(f"the chat template failed: {type(e).__name__}: {first}") from None
    return "".join(parts)
