"""Ranks that moeport starts itself: `spawn()` runs a job on N new local processes.

Each rank runs `_rank_main`: it sets up its environment, watches its parent
(so no rank outlives the launcher), beats a heartbeat the launcher can read, and
sends its report (see `moeport.launch.failures`) back over a pipe. The launcher
collects the reports and, when one rank fails, stops the others and names the
root cause: a rank that died, or one that stopped answering (stopped by a signal,
or silent) while its peers timed out waiting for it.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import pickle
import threading
import time
from typing import Any, Callable, Iterator, Sequence

from moeport.launch.failures import RankFailure, error_report, failure_from_report, ok_report, signal_name
from moeport.launch.rank_env import SPAWNED_ENV, core_shares, threads_per_rank

#: How often each rank's watcher thread beats (seconds), and how long without a beat counts as silent.
HEARTBEAT_S = 0.5
SILENT_S = 3.0


def _watch_parent(parent_pid: int, heartbeats: Any, rank: int) -> None:
    """In a spawned rank: beat the heartbeat, and exit if the launcher goes away, so no rank is left orphaned."""
    while True:
        heartbeats[rank] = time.monotonic()
        if os.getppid() != parent_pid:
            os._exit(1)
        time.sleep(HEARTBEAT_S)


def _rank_main(
    conn: multiprocessing.connection.Connection,
    env: dict[str, str],
    threads: int,
    parent_pid: int,
    heartbeats: Any,
    cores: set[int] | None,
    target: Callable[..., Any],
    args: Sequence[Any],
) -> None:
    """In a spawned rank: keep to its own `cores` (every thread it starts too), run `target(*args)` and send
    this rank's report to the launcher over `conn`."""
    if cores:
        os.sched_setaffinity(0, cores)
    os.environ.update(env)
    rank = int(env["RANK"])
    threading.Thread(target=_watch_parent, args=(parent_pid, heartbeats, rank), daemon=True).start()
    import torch

    torch.set_num_threads(threads)
    try:
        result = target(*args)
    except BaseException as exc:  # report everything, then exit non-zero
        conn.send_bytes(pickle.dumps(error_report(exc)))
        conn.close()
        os._exit(1)
    # Plain pickle: torch's multiprocessing pickler would share tensor memory that dies with this process.
    conn.send_bytes(pickle.dumps(ok_report(result)))
    conn.close()


def _describe_exit(exitcode: int | None) -> str:
    """Why a spawned rank that sent no report ended: the signal that killed it, or its exit code."""
    if exitcode is not None and exitcode < 0:
        return f"killed by signal {signal_name(-exitcode)}"
    return f"exited with code {exitcode} before reporting a result"


def _state(process: multiprocessing.Process) -> str | None:
    """The kernel's one-letter state of a live process ("T": stopped by a signal), or None where /proc cannot tell."""
    try:
        with open(f"/proc/{process.pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _stop(processes: Sequence[multiprocessing.Process], grace_s: float) -> None:
    """Let the ranks end within `grace_s`, then terminate them (a stopped one, which SIGTERM cannot end, is killed)."""
    deadline = time.monotonic() + grace_s
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in processes:
        if p.is_alive():
            p.kill() if _state(p) in ("T", "t") else p.terminate()
    for p in processes:
        p.join(3.0)
        if p.is_alive():
            p.kill()
            p.join()


def spawn(
    target: Callable[..., Any],
    args: Sequence[Any],
    world_size: int,
    timeout_s: float | None = None,
    grace_s: float = 1.0,
) -> list[Any]:
    """Run `target(*args)` on `world_size` new local processes, one per rank; return their results in rank order.

    Each rank finds RANK / WORLD_SIZE / LOCAL_RANK and the rendezvous address in
    its environment (see `detect_rank_env`) and gets its share of the cores for
    torch's threads. The first rank to fail raises RankFailure here after the
    others are stopped; past `timeout_s` every rank is stopped and RankFailure
    names the ranks still running.
    """
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    ctx = multiprocessing.get_context("spawn")
    threads = threads_per_rank(world_size)
    heartbeats = ctx.RawArray("d", [time.monotonic()] * world_size)  # each rank's last sign of life
    processes, conns = [], []
    try:
        with _quiet_native_warnings():
            _start_ranks(ctx, world_size, store.port, threads, heartbeats, target, args, processes, conns)
        return _collect(processes, conns, heartbeats, timeout_s, grace_s)
    finally:
        _stop(processes, 0.0)
        del store


def _start_ranks(ctx: Any, world_size: int, port: int, threads: int, heartbeats: Any, target: Callable[..., Any],
                 args: Sequence[Any], processes: list, conns: list) -> None:
    """Start one process per rank, each on its own share of the cores, appending each (and the launcher's end
    of its pipe) as it starts."""
    shares = core_shares(world_size)
    for rank in range(world_size):
        parent_end, child_end = ctx.Pipe(duplex=False)
        env = {
            SPAWNED_ENV: "1",
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": str(threads),
        }
        p = ctx.Process(
            target=_rank_main,
            args=(child_end, env, threads, os.getpid(), heartbeats, None if shares is None else shares[rank], target, args),
            name=f"moeport-rank-{rank}",
            daemon=True,
        )
        p.start()
        child_end.close()
        processes.append(p)
        conns.append(parent_end)


@contextlib.contextmanager
def _quiet_native_warnings() -> Iterator[None]:
    """Ranks started inside the block log only errors from torch's C++ side (unless the user chose a level):
    its collectives' warnings about a peer that does not answer would bury the one line moeport reports."""
    if "TORCH_CPP_LOG_LEVEL" in os.environ:
        yield
        return
    os.environ["TORCH_CPP_LOG_LEVEL"] = "ERROR"  # read by each rank as torch starts
    try:
        yield
    finally:
        del os.environ["TORCH_CPP_LOG_LEVEL"]


def _collect(
    processes: Sequence[multiprocessing.Process],
    conns: Sequence[multiprocessing.connection.Connection],
    heartbeats: Any,
    timeout_s: float | None,
    grace_s: float,
) -> list[Any]:
    """Wait for every rank's report; the results in rank order, or RankFailure for the first failure."""
    results: list[Any] = [None] * len(processes)
    pending = set(range(len(processes)))
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while pending:
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            ranks = ", ".join(str(r) for r in sorted(pending))
            _stop(processes, 0.0)
            raise RankFailure(None, f"ranks {ranks} did not finish within {timeout_s:g} s")
        waitables = [conns[r] for r in pending] + [processes[r].sentinel for r in pending]
        multiprocessing.connection.wait(waitables, timeout=remaining)
        for rank in sorted(pending):
            message = None
            if conns[rank].poll():
                try:
                    message = pickle.loads(conns[rank].recv_bytes())
                except EOFError:
                    message = None
            if message is None and processes[rank].is_alive():
                continue
            if message is None:
                processes[rank].join(1.0)
                failure = RankFailure(rank, _describe_exit(processes[rank].exitcode))
            elif message[0] == "ok":
                results[rank] = message[1]
                pending.discard(rank)
                continue
            else:
                failure = failure_from_report(rank, message)
            raise _root_cause(failure, processes, heartbeats, grace_s)
    return results


def _root_cause(
    failure: RankFailure, processes: Sequence[multiprocessing.Process], heartbeats: Any, grace_s: float
) -> RankFailure:
    """The failure to report once one rank has failed, after the others are stopped.

    A rank that dies (killed, out of memory) makes its peers' collectives fail too,
    and a peer may report first; so within `grace_s` a rank that died without
    reporting is preferred, as the cause, over ranks that reported errors. Likewise
    a rank that stopped answering (stopped by a signal, or no heartbeat for SILENT_S)
    while the reporting rank timed out: it is named, with what its peer reported.
    """
    others = [i for i in range(len(processes)) if i != failure.rank]
    deadline = time.monotonic() + grace_s
    for i in others:
        processes[i].join(max(0.0, deadline - time.monotonic()))
    # Ranks that report exit 0 or 1 by themselves; a negative code is a signal from outside (or a crash).
    died = [i for i in others if processes[i].exitcode is not None and processes[i].exitcode < 0]
    silent = [(i, why) for i in others if (why := _silence(processes[i], heartbeats[i])) is not None]
    _stop([processes[i] for i in others], 0.0)
    if died and failure.details:  # the reported error came from a rank whose peer had died
        return RankFailure(died[0], _describe_exit(processes[died[0]].exitcode))
    if silent and failure.summary.startswith("TimeoutError"):  # the reporting rank waited for a silent peer
        rank, why = silent[0]
        return RankFailure(rank, f"stopped answering ({why}); rank {failure.rank} then failed: {failure.summary}",
                           failure.details, failure.user_error)
    return failure


def _silence(process: multiprocessing.Process, last_beat: float) -> str | None:
    """Why a live rank counts as not answering (stopped by a signal, or no heartbeat for SILENT_S), or None."""
    if not process.is_alive():
        return None
    quiet = time.monotonic() - last_beat
    if _state(process) in ("T", "t"):
        return f"stopped by a signal, no sign of life for {quiet:.0f} s"
    if quiet > SILENT_S:
        return f"no sign of life for {quiet:.0f} s"
    return None
