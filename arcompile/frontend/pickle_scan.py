"""Naming what a pickle would import, without unpickling it.

``torch.save(model)`` and plain pickles rebuild objects by importing and calling whatever the
file names, so arcompile refuses them. To say what a file is, ``pickletools.genops`` lists the
opcodes (it decodes, it never executes) and the GLOBAL / STACK_GLOBAL / INST opcodes give the
``module.name`` each would import: the model's class, or ``posix.system`` in a hostile file.
"""

from __future__ import annotations

import io
import pickletools
import re
from typing import IO, Iterator

from arcompile.errors import ModelLoadError, UnsafeModelError

_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING",
               "BINSTRING", "STRING"}
_MEMO_GET = {"GET", "BINGET", "LONG_BINGET"}
_MEMO_PUT = {"PUT", "BINPUT", "LONG_BINPUT"}
# what torch.save writes for tensors and state dicts (torch's weights-only unpickler allows these)
_WEIGHTS_ONLY = re.compile(r"torch\._utils\._rebuild_\w+|torch\._tensor\._rebuild_\w+"
                           r"|torch\.\w*Storage|torch\.storage\.\w*Storage|torch\.Size"
                           r"|torch\.device|torch\.(float|bfloat|int|uint|bool|complex)\w*"
                           r"|collections\.OrderedDict|builtins\.(set|frozenset|bytearray|slice)")
HOW_TO_EXPORT = ("export it instead: torch.export.save(torch.export.export(model, (tokens,)), "
                 "'model.pt2') or torch.jit.trace(model, tokens).save('model.pt')")


def pickle_globals(stream: IO[bytes], stop_at_unsafe: bool = True) -> Iterator[str]:
    """``module.name`` of every global a sequence of pickles in ``stream`` references.

    Legacy torch.save files are several pickles back to back followed by raw tensor bytes;
    scanning stops quietly where the bytes stop parsing as a pickle.
    """
    while True:
        found_stop = False
        try:
            for name in _globals_in_one(stream):
                if name is None:
                    found_stop = True
                    break
                yield name
                if stop_at_unsafe and not _WEIGHTS_ONLY.fullmatch(name):
                    return
        except (ValueError, EOFError, UnicodeDecodeError, OverflowError):
            return
        if not found_stop:
            return


def _globals_in_one(stream: IO[bytes]) -> Iterator[str | None]:
    memo: dict[int, object] = {}
    recent: list[object] = []  # the last values pushed, enough to see STACK_GLOBAL's operands
    for op, arg, _pos in pickletools.genops(stream):
        name = op.name
        if name in _STRING_OPS:
            recent.append(arg)
        elif name in _MEMO_GET:
            recent.append(memo.get(arg))
        elif name in _MEMO_PUT:
            memo[arg] = recent[-1] if recent else None
        elif name == "MEMOIZE":
            memo[len(memo)] = recent[-1] if recent else None
        elif name in ("GLOBAL", "INST"):
            module, _, attr = str(arg).partition(" ")
            yield f"{module}.{attr}"
            recent.append(None)
        elif name == "STACK_GLOBAL":
            module, attr = recent[-2:] if len(recent) >= 2 else (None, None)
            yield f"{module}.{attr}" if isinstance(module, str) else "<unknown global>"
            recent.append(None)
        elif name == "STOP":
            yield None
            return
        elif op.stack_after:
            recent.append(None)
        del recent[:-4]


def looks_like_pickle(head: bytes) -> bool:
    """Protocol 2+ pickles start with PROTO; older ones are checked by parsing ``head``."""
    if len(head) >= 2 and head[0] == 0x80 and 1 <= head[1] <= 5:
        return True
    try:
        ops = list(pickletools.genops(io.BytesIO(head)))
    except Exception:  # genops raises ValueError and others on anything that is not a pickle
        return False
    return bool(ops) and ops[-1][0].name == "STOP" and any(
        op.name in ("GLOBAL", "INST", "REDUCE", "BUILD") for op, _, _ in ops)


def refusal(source: str, stream: IO[bytes], what: str) -> ModelLoadError:
    """The error for a pickled file: UnsafeModelError naming the first global outside what
    weights-only loading allows, or a ModelLoadError when the pickle holds only tensors."""
    names = list(pickle_globals(stream))
    unsafe = [n for n in names if not _WEIGHTS_ONLY.fullmatch(n)]
    if unsafe:
        return UnsafeModelError(f"{source} is {what}: a pickled Python object (it references "
                                f"{unsafe[0]}) that arcompile will not unpickle, since "
                                f"unpickling runs code from the file; {HOW_TO_EXPORT}")
    return ModelLoadError(f"{source} is {what} holding only tensors (a state_dict?): weights "
                          f"without the model's program; {HOW_TO_EXPORT}")
