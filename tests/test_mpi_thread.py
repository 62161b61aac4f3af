"""The MPI communication thread keeps progressing requests in flight with no new job to wake it (no MPI needed).

A request's completion must never depend on another job being queued: with requests in
flight the thread polls (take a job without waiting, else sleep), and never calls
`SimpleQueue.get(timeout=...)`, which in CPython 3.11 can wait until the next job once its
short deadline has passed inside it (see collectives/mpi_thread.py): a hang seen in CI.
"""

from __future__ import annotations

import queue
import time

from moeport.collectives import mpi_thread
from moeport.collectives.mpi_thread import CommThread, InFlight


class _Request:
    """An MPI request stand-in that completes after `polls` calls of Test()."""

    def __init__(self, polls: int) -> None:
        self.polls = polls

    def Test(self) -> bool:  # noqa: N802 (mpi4py's name)
        self.polls -= 1
        return self.polls <= 0


class _RecordingQueue(queue.SimpleQueue):
    """A SimpleQueue that remembers how each get() was asked to wait."""

    calls: list[tuple] = []

    def get(self, *args, **kwargs):
        type(self).calls.append((args, kwargs))
        return super().get(*args, **kwargs)


def test_requests_in_flight_complete_without_another_job_and_no_get_waits_with_a_deadline(monkeypatch):
    monkeypatch.setattr(mpi_thread.queue, "SimpleQueue", _RecordingQueue)
    _RecordingQueue.calls = []
    thread = CommThread()
    try:
        sends = [thread.submit(lambda n=n: InFlight(_Request(50 * (n + 1)), f"sent {n}", None, f"send to {n}"), "send")
                 for n in range(3)]
        assert [future.result(10) for future in sends] == ["sent 0", "sent 1", "sent 2"]
        assert thread.call(lambda: "after", "barrier", 10) == "after"
    finally:
        assert thread.stop(10)
    timed = [call for call in _RecordingQueue.calls if call[1].get("timeout") is not None or len(call[0]) > 1]
    assert not timed, timed


def test_a_timeout_names_the_requests_in_flight():
    thread = CommThread()
    try:
        thread.submit(lambda: InFlight(_Request(10**9), None, None, "recv from 1"), "recv")
        deadline = time.monotonic() + 10
        while "queued, 0 sends" in (message := str(thread.timeout_error("barrier", 5))) and time.monotonic() < deadline:
            time.sleep(0.01)  # until the thread has taken the job
    finally:
        thread.stop(0.5)
    assert message.startswith("MPI barrier did not complete within 5 s") and "recv from 1, in flight for" in message
