"""Writing files so that an interrupted or failed write never leaves a half-written file under the final name.

Every file moeport writes goes through `atomic_path` (a whole folder, `atomic_folder`): the writer fills a
temporary file beside the final one, which is fsynced and renamed onto the final
name. The file gets the mode a plain `open(path, "w")` gives under the current
umask (0644 under umask 022): the temporary file is created like one, and keeps
that mode even where the writer replaced it (safetensors writes a 0600 file of
its own and renames it onto the name it is given).

A write that fails (disk full, file too large, permission denied, a folder that
cannot be made) raises WriteError, "cannot write PATH: CAUSE"; the earlier file
at the path is then intact and the temporary file is gone. A write past
RLIMIT_FSIZE is such a failure (EFBIG), not a process killed by SIGXFSZ: CPython
ignores SIGXFSZ from its start.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat
from collections.abc import Iterator

from moeport.base.errors import WriteError

# Created like open(path, "w") creates a file (mode 0666 less the umask), but never over an existing one.
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)


def _cause(exc: OSError) -> str:
    """The failure of `exc` in words ("No space left on device")."""
    return exc.strerror or str(exc)


def _not_a_folder(folder: str) -> str | None:
    """The nearest existing path at or above `folder` when it is not a folder (so `folder` cannot be made), else None."""
    current = folder
    while current and not os.path.lexists(current):
        parent = os.path.dirname(current)
        if parent == current:
            return None
        current = parent
    return current if current and not os.path.isdir(current) else None


def make_folder(folder: str, path: str | None = None) -> None:
    """Make `folder` and its parents where missing, before writing `path` (default: the folder) in it.

    Raises WriteError for `path` when the folder cannot be made.
    """
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        blocker = _not_a_folder(folder)
        cause = f"{blocker} is not a folder" if blocker else f"cannot make folder {folder}: {_cause(exc)}"
        raise WriteError(path or folder, cause, exc.errno) from exc


def _new_temporary(path: str, folder: str) -> str:
    """A new empty file in `folder` named `.NAME.RANDOM.tmp` after `path`, with the mode open(path, "w") would give."""
    name = os.path.basename(path)
    for _ in range(100):
        tmp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, _NEW_FILE_FLAGS, 0o666))
            return tmp
        except FileExistsError:
            continue
        except OSError as exc:
            raise WriteError(path, _cause(exc), exc.errno) from exc
    raise WriteError(path, f"no free temporary name in {folder}", errno.EEXIST)


def _settle(tmp: str, mode: int) -> None:
    """Give `tmp` back `mode` if its writer replaced the file, and flush its data to the device (before the rename)."""
    with open(tmp, "rb") as f:
        if stat.S_IMODE(os.fstat(f.fileno()).st_mode) != mode:
            os.fchmod(f.fileno(), mode)
        os.fsync(f.fileno())


def _remove(tmp: str) -> None:
    """Remove `tmp` where it is left (a failed or interrupted write); never raises."""
    with contextlib.suppress(OSError):
        os.unlink(tmp)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """A temporary path beside `path`; renamed onto `path` only if the block completes.

    Use for writers that take a file name (numpy, safetensors, matplotlib). The
    folder is made if missing. An OSError in the block, the fsync or the rename
    becomes a WriteError naming `path` and the cause; a writer must let the
    OSError of a failed write through with its errno (numpy's own file path
    loses it: see moeport.cli's `_save_npy`).
    """
    folder = os.path.dirname(path) or "."
    make_folder(folder, path)
    tmp = _new_temporary(path, folder)
    try:
        mode = stat.S_IMODE(os.stat(tmp).st_mode)
        yield tmp
        _settle(tmp, mode)
        os.replace(tmp, path)
    except WriteError:
        raise
    except OSError as exc:
        raise WriteError(path, _cause(exc), exc.errno) from exc
    finally:
        _remove(tmp)


def write_text(path: str, text: str) -> None:
    """Write `text` to `path` atomically (UTF-8); a WriteError if it cannot be written."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


@contextlib.contextmanager
def atomic_folder(path: str) -> Iterator[str]:
    """A temporary directory beside `path`, renamed onto it (new, or empty) only if the block completes.

    A failure leaves `path` as it was and removes the temporary directory; an OSError of
    the rename is a WriteError naming `path`.
    """
    parent = os.path.dirname(os.path.abspath(path))
    make_folder(parent, path)
    tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(path))}.{secrets.token_hex(4)}.tmp")
    try:
        os.mkdir(tmp)
    except OSError as exc:
        raise WriteError(path, _cause(exc), exc.errno) from exc
    try:
        yield tmp
        try:
            os.replace(tmp, path)  # onto an empty directory as onto nothing
        except OSError as exc:
            raise WriteError(path, _cause(exc), exc.errno) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
