"""The one thread of a process that makes every MPI call, in the order the calls were submitted.

Why a thread: Open MPI's non-blocking collectives, as measured here, make no progress
unless some thread keeps calling into MPI, so an `Ialltoallv` issued before a compute
phase would only move data once the caller waits. Instead every MPI call of the process
runs on ONE dedicated thread, in submission order (a single FIFO queue, so every rank
issues its collectives in the same order): a communicator queues a job and gets a
future, and the thread makes the blocking MPI call, which releases the GIL and
progresses the transfer while the caller computes. Point-to-point sends and receives are
issued non-blocking and polled by the thread, so an async send followed by an async
receive on both sides of a pair cannot deadlock.

While requests are in flight the thread polls: it takes a job without waiting or else
sleeps POLL_S, and waits on the queue only when nothing is in flight. It never calls
`SimpleQueue.get(timeout=...)`: in CPython 3.11 a get whose short deadline passes inside
it (the thread preempted on a loaded machine) waits on with a negative timeout, that is
until the next job. A rank's send then stayed in flight, untested, while its peer waited
in the next collective: a hang that looked like Open MPI's shared-memory transport, seen
over Open MPI's sm, UCX and TCP alike, with gdb showing the thread inside that get.

The world MPICommunicator owns the thread (its subgroups share it) and ends it in
`close()`, or at interpreter exit before mpi4py finalises MPI.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
from typing import Any, Callable

#: How long the communication thread sleeps between polls of point-to-point requests in flight, in seconds.
POLL_S = 0.0001


class InFlight:
    """What a job returns when its MPI request is still in flight: the thread completes it later."""

    def __init__(self, request: Any, result: Any, keep: Any, what: str = "request") -> None:
        self.request = request
        self.result = result
        self.keep = keep  # buffers that must outlive the request
        self.what = what  # e.g. "send to 1": how a timeout's report names it
        self.since = time.monotonic()


class CommThread:
    """The one thread of this process that makes every MPI call, in the order the jobs were submitted."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._inflight: list[tuple[concurrent.futures.Future, InFlight]] = []
        self._stopping = False
        self._current: str | None = None
        self._current_since = 0.0
        self._thread = threading.Thread(target=self._run, name="moeport-mpi", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """Whether the thread still takes jobs."""
        return self._thread.is_alive() and not self._stopping

    def submit(self, job: Callable[[], Any], what: str) -> concurrent.futures.Future:
        """Queue `job` (MPI operation `what`) for the thread; the future gets its result (or its exception)."""
        if not self.alive:
            raise RuntimeError(f"MPI {what}: the MPI communicator is closed")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((future, job, what))
        return future

    def call(self, job: Callable[[], Any], what: str, timeout: float | None) -> Any:
        """Run `job` on the thread and wait for its result."""
        future = self.submit(job, what)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise self.timeout_error(what, timeout) from None

    def timeout_error(self, what: str, timeout: float | None) -> TimeoutError:
        """The TimeoutError of a wait for `what`, saying where the thread is (the op a peer has not joined)."""
        now = time.monotonic()
        current, since = self._current, self._current_since
        where = f"inside MPI {current} for {now - since:.1f} s" if current else "idle"
        inflight = [pending for _, pending in list(self._inflight)]
        named = "".join(f"; {p.what}, in flight for {now - p.since:.1f} s" for p in inflight)
        return TimeoutError(
            f"MPI {what} did not complete within {timeout:g} s (communication thread {where}; "
            f"{self._queue.qsize()} queued, {len(inflight)} sends/receives in flight{named})"
        )

    def stop(self, timeout: float) -> bool:
        """Let the thread finish the jobs queued so far, then end it; False if it is still busy after `timeout`."""
        if self._thread.is_alive() and not self._stopping:
            self._stopping = True
            self._queue.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while True:
            self._reap()
            try:
                item = self._queue.get_nowait() if self._inflight else self._queue.get()
            except queue.Empty:
                time.sleep(POLL_S)
                continue
            if item is None:
                break
            future, job, what = item
            if not future.set_running_or_notify_cancel():
                continue
            self._current_since = time.monotonic()
            self._current = what
            try:
                result = job()
            except BaseException as exc:  # handed to the waiter
                future.set_exception(exc)
                continue
            finally:
                self._current = None
            if isinstance(result, InFlight):
                self._inflight.append((future, result))
            else:
                future.set_result(result)
        for future, _ in self._inflight:
            future.set_exception(RuntimeError("the MPI communicator was closed before the operation completed"))
        self._inflight.clear()

    def _reap(self) -> None:
        """Complete the point-to-point requests that have finished (each Test also drives MPI's progress)."""
        still = []
        for future, pending in self._inflight:
            try:
                done = pending.request.Test()
            except BaseException as exc:
                future.set_exception(exc)
                continue
            if done:
                future.set_result(pending.result)
            else:
                still.append((future, pending))
        self._inflight = still
