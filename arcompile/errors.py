"""Errors arcompile raises on purpose.

Every error a user can cause derives from ArcompileError; the CLI prints such an error as
one line and exits non-zero, while anything else is a bug and keeps its traceback.
"""


class ArcompileError(Exception):
    """An error the user can act on; its message is one line that says what to do."""


class ModelLoadError(ArcompileError):
    """The model file is missing, corrupt, not a model, or unsafe to load."""


class UnsafeModelError(ModelLoadError):
    """Loading the file would execute code from it (a full pickle)."""


class UnsupportedOpError(ArcompileError):
    """An op has no lowering (or no conversion) in the chosen backend."""


class VerifyError(ArcompileError):
    """The IR graph is malformed; raised by the verifier between passes."""


class PassError(ArcompileError):
    """A pass failed; the message names the passes that ran before it."""


class EngineError(ArcompileError):
    """An engine directory is missing, altered, or of a format this version cannot read."""


class DecodeError(ArcompileError):
    """Generation was asked for something the engine cannot do."""


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message (at most 300 characters), or its
    type's name when the message is empty. A final full stop is dropped."""
    for line in str(e).splitlines():
        if line.strip():
            # callers append "; what to do", so a final full stop would read twice
            return line.strip()[:300].rstrip(".")
    return type(e).__name__
