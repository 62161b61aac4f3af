"""The two errors moeport reports as one line without a traceback.

UserError: the user's input was wrong (exit code 2). WriteError: an output file
could not be written (exit code 1).
"""


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
