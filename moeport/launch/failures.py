"""How a rank's outcome reaches its launcher, and how a failure is named: one format for every launcher.

A rank's report is a tuple, plain-picklable:

- `("ok", result)` when the rank's job returned `result` (`ok_report`);
- `("error", summary, details, user_error)` when it raised (`error_report`):
  `summary` is one line naming the error (the message alone for a `UserError`
  or a `WriteError`), `details` the full traceback and `user_error` whether it
  was a `UserError` (the user's input was wrong: exit 2; else exit 1).

`failure_from_report` turns an error report into the `RankFailure` the
launcher raises. `spawn` sends reports over a pipe, `spawn_mpiexec`'s ranks
write them to files, and `moeport.jobs.run_on_ranks` (under torchrun or
mpiexec, in-process) builds one for its own rank.
"""

from __future__ import annotations

import signal
import traceback
from typing import Any

from moeport.base.errors import UserError, WriteError


class RankFailure(Exception):
    """A rank raised, died or ran past its time; names the rank and its error in one line.

    `details` holds the rank's traceback where there was one; `user_error` says
    the rank failed on the user's input (exit 2 rather than 1).
    """

    def __init__(self, rank: int | None, summary: str, details: str = "", user_error: bool = False) -> None:
        self.rank = rank
        self.summary = summary
        self.details = details
        self.user_error = user_error
        where = "job" if rank is None else f"rank {rank}"
        super().__init__(summary if user_error else f"{where} failed: {summary}")


def ok_report(result: Any) -> tuple[str, Any]:
    """The report of a rank whose job returned `result`: ("ok", result)."""
    return ("ok", result)


def error_report(exc: BaseException) -> tuple[str, str, str, bool]:
    """The report of a rank whose job raised `exc`: ("error", summary, details, user_error).

    The summary is the message of a UserError or a WriteError (already one line
    naming the file and the cause), else the last line Python prints for the
    exception ("ValueError: ..."); details is the full traceback.
    """
    if isinstance(exc, (UserError, WriteError)):
        summary = str(exc)
    else:
        lines = traceback.format_exception_only(type(exc), exc)
        summary = lines[-1].strip() if lines else type(exc).__name__
    details = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return ("error", summary, details, isinstance(exc, UserError))


def failure_from_report(rank: int | None, report: tuple) -> RankFailure:
    """The RankFailure a launcher raises for rank `rank`'s error report (see `error_report`)."""
    _, summary, details, user_error = report
    return RankFailure(rank, summary, details, user_error)


def signal_name(number: int) -> str:
    """The name of signal `number` ("SIGKILL"), or the number itself when it names no signal."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)
