"""Starting ranks: spawned CPU processes on this machine, or ranks that torchrun / mpiexec started.

`detect_rank_env()` reads how this process was started. `spawn()` starts N local
ranks, watches them, and stops the job cleanly when one fails: it names the
failed rank and its error, terminates the others and leaves no process behind.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
import traceback
from typing import Any, Callable, Mapping, Sequence

from moeport.errors import UserError

SPAWNED_ENV = "MOEPORT_SPAWNED"


@dataclasses.dataclass(frozen=True)
class RankEnv:
    """Who this process is in the job, and how it was started.

    `launcher` is "spawn" (moeport's own), "torchrun", "mpiexec" or "single".
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "single"
    master_addr: str | None = None
    master_port: int | None = None


def _int_env(environ: Mapping[str, str], *names: str) -> int | None:
    for name in names:
        if name in environ:
            return int(environ[name])
    return None


def detect_rank_env(environ: Mapping[str, str] | None = None) -> RankEnv:
    """How this process was started, read from the environment variables launchers set."""
    env = os.environ if environ is None else environ
    port = _int_env(env, "MASTER_PORT")
    addr = env.get("MASTER_ADDR")
    if env.get(SPAWNED_ENV) == "1":
        return RankEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]), "spawn", addr, port)
    if "TORCHELASTIC_RUN_ID" in env or ("RANK" in env and "WORLD_SIZE" in env and addr):
        local = _int_env(env, "LOCAL_RANK") or 0
        return RankEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), local, "torchrun", addr, port)
    rank = _int_env(env, "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK")
    size = _int_env(env, "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MPI_LOCALNRANKS")
    if rank is not None and size is not None:
        local = _int_env(env, "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK") or 0
        return RankEnv(rank, size, local, "mpiexec", addr, port)
    return RankEnv()


def usable_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def threads_per_rank(ranks_on_machine: int) -> int:
    """torch threads for each of `ranks_on_machine` ranks so that together they do not oversubscribe the cores."""
    return max(1, usable_cores() // max(1, ranks_on_machine))


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


def _watch_parent(parent_pid: int) -> None:
    """In a spawned rank: exit if the launcher goes away, so no rank is left orphaned."""
    while True:
        if os.getppid() != parent_pid:
            os._exit(1)
        time.sleep(0.5)


def _rank_main(
    conn: multiprocessing.connection.Connection,
    env: dict[str, str],
    threads: int,
    parent_pid: int,
    target: Callable[..., Any],
    args: Sequence[Any],
) -> None:
    os.environ.update(env)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    import torch

    torch.set_num_threads(threads)
    try:
        result = target(*args)
    except BaseException as exc:  # report everything, then exit non-zero
        lines = traceback.format_exception_only(type(exc), exc)
        summary = lines[-1].strip() if lines else type(exc).__name__
        if isinstance(exc, UserError):
            summary = str(exc)
        conn.send(("error", summary, traceback.format_exc(), isinstance(exc, UserError)))
        conn.close()
        os._exit(1)
    conn.send(("ok", result))
    conn.close()


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with code {exitcode} before reporting a result"


def _stop(processes: Sequence[multiprocessing.Process], grace_s: float) -> None:
    deadline = time.monotonic() + grace_s
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in processes:
        if p.is_alive():
            p.terminate()
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
    processes, conns = [], []
    try:
        for rank in range(world_size):
            parent_end, child_end = ctx.Pipe(duplex=False)
            env = {
                SPAWNED_ENV: "1",
                "RANK": str(rank),
                "WORLD_SIZE": str(world_size),
                "LOCAL_RANK": str(rank),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(store.port),
                "OMP_NUM_THREADS": str(threads),
            }
            p = ctx.Process(
                target=_rank_main,
                args=(child_end, env, threads, os.getpid(), target, args),
                name=f"moeport-rank-{rank}",
                daemon=True,
            )
            p.start()
            child_end.close()
            processes.append(p)
            conns.append(parent_end)
        return _collect(processes, conns, timeout_s, grace_s)
    finally:
        _stop(processes, 0.0)
        del store


def _collect(
    processes: Sequence[multiprocessing.Process],
    conns: Sequence[multiprocessing.connection.Connection],
    timeout_s: float | None,
    grace_s: float,
) -> list[Any]:
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
                    message = conns[rank].recv()
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
                _, summary, details, user_error = message
                failure = RankFailure(rank, summary, details, user_error)
            _stop([p for i, p in enumerate(processes) if i != rank], grace_s)
            raise failure
    return results
