"""The two errors moeport reports as one line without a traceback.

UserError: the user's input was wrong (exit code 2). WriteError: an output file
could not be written (exit code 1). `format_validation_error` turns a pydantic
validation error into such a line (the file, the key path, what was expected).
"""

from __future__ import annotations

from typing import Any


class UserError(Exception):
    """A mistake in the user's input (profile, checkpoint, command line, launch).

    The message is one line that says what is wrong, where (file, key path,
    tensor name) and what was expected; the CLI prints it without a traceback.
    """


class WriteError(OSError):
    """An output file could not be written: not the user's input, but not a moeport bug either.

    Raised by moeport.base.atomic when a write fails (disk full, file too large,
    permission denied, a folder that cannot be made); the earlier file at `path`
    is then intact and no temporary file is left. The message is one line,
    "cannot write PATH: CAUSE"; the CLI prints it and exits 1. It is an OSError
    (with the failure's errno) so that callers catching OSError still catch it.
    """

    def __init__(self, path: str, cause: str, errno: int | None = None) -> None:
        super().__init__(f"cannot write {path}: {cause}")
        self.path = path
        self.cause = cause
        self.errno = errno

    def __reduce__(self):
        return (type(self), (self.path, self.cause, self.errno))


def format_validation_error(source: str, error: dict[str, Any], prefix: str = "") -> str:
    """One line for a pydantic validation error (one of `ValidationError.errors()`): the source, the key path (after `prefix`) and what was expected."""
    path = ".".join([prefix] * bool(prefix) + [str(p) for p in error["loc"]]) or "(top level)"
    kind, message = error["type"], error["msg"]
    if kind == "extra_forbidden":
        return f"{source}: {path}: unknown key"
    if kind == "value_error":
        return f"{source}: {path}: {message.removeprefix('Value error, ')}"
    if kind == "missing":
        return f"{source}: {path}: required key is missing"
    message = message.replace("Input should be", "expected").replace("input should be", "expected")
    return f"{source}: {path}: {message}, got {error['input']!r}"
