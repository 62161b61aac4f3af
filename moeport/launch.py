"""Starting ranks: spawned CPU processes on this machine, or ranks that torchrun / mpiexec started.

`detect_rank_env()` reads how this process was started. `spawn()` starts N local
ranks, watches them, and stops the job cleanly when one fails: it names the
failed rank and its error, terminates the others and leaves no process behind.
`spawn_mpiexec()` does the same for ranks that mpiexec starts (the MPI collectives).
"""

from __future__ import annotations

import collections
import dataclasses
import multiprocessing
import multiprocessing.connection
import multiprocessing.spawn
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from typing import Any, Callable, Mapping, Sequence

from moeport.base.atomic import atomic_path
from moeport.base.errors import UserError

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
        conn.send_bytes(pickle.dumps(("error", summary, traceback.format_exc(), isinstance(exc, UserError))))
        conn.close()
        os._exit(1)
    # Plain pickle: torch's multiprocessing pickler would share tensor memory that dies with this process.
    conn.send_bytes(pickle.dumps(("ok", result)))
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
                _, summary, details, user_error = message
                failure = RankFailure(rank, summary, details, user_error)
            raise _root_cause(failure, processes, grace_s)
    return results


def _root_cause(failure: RankFailure, processes: Sequence[multiprocessing.Process], grace_s: float) -> RankFailure:
    """The failure to report once one rank has failed, after the others are stopped.

    A rank that dies (killed, out of memory) makes its peers' collectives fail too,
    and a peer may report first; so within `grace_s` a rank that died without
    reporting is preferred, as the cause, over ranks that reported errors.
    """
    others = [i for i in range(len(processes)) if i != failure.rank]
    deadline = time.monotonic() + grace_s
    for i in others:
        processes[i].join(max(0.0, deadline - time.monotonic()))
    # Ranks that report exit 0 or 1 by themselves; a negative code is a signal from outside (or a crash).
    died = [i for i in others if processes[i].exitcode is not None and processes[i].exitcode < 0]
    _stop([processes[i] for i in others], 0.0)
    if died and failure.details:  # the reported error came from a rank whose peer had died
        return RankFailure(died[0], _describe_exit(processes[died[0]].exitcode))
    return failure


# -- ranks started by mpiexec ----------------------------------------------------------------------

#: Variables of an enclosing launch that must not reach the ranks mpiexec starts.
_LAUNCH_VARS = frozenset({"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", SPAWNED_ENV})
_LAUNCH_PREFIXES = ("TORCHELASTIC_", "OMPI_COMM_WORLD_", "PMIX_", "PMI_")
#: How long a failed rank waits for the launcher to stop the job (silently) before it exits by itself.
_FAILED_RANK_WAIT_S = 10.0
#: How long mpiexec may take to end on its own once every rank has reported, and to stop on SIGTERM.
_MPIEXEC_EXIT_S = 30.0
_MPIEXEC_TERM_S = 3.0
_POLL_S = 0.02
_loading_job = False  # set in a rank while it loads its job (and runs the launcher's main module)
_LAUNCHER_PID_ENV = "MOEPORT_LAUNCHER_PID"
_SHM_DIR_ENV = "OMPI_MCA_btl_sm_backing_directory"
# What Open MPI's launcher prints when a rank dies by a signal (the line may wrap anywhere).
_SIGNAL_BANNER = re.compile(
    r"process\s+rank\s+(\d+)\s+with\s+PID\s+\d+\s+on\s+node\s+\S+\s+exited\s+on\s+signal\s+(\d+)"
)


def find_mpiexec() -> str:
    """The mpiexec beside this Python (the `mpi` extra's Open MPI) or else on PATH; UserError when there is none."""
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.path.isfile(beside) and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("mpiexec")
    if found is None:
        raise UserError(
            "collectives.library: mpi needs mpiexec, found neither beside the Python executable nor on PATH: "
            "install the mpi extra (pip install 'moeport[mpi]')"
        )
    return found


def _mpiexec_env(threads: int, shm_dir: str | None) -> dict[str, str]:
    """The environment of an mpiexec job: no variables of an enclosing launch, Open MPI allowed to run as root.

    `shm_dir` (when given) holds Open MPI's shared-memory segments, so that a rank killed
    before it could remove its segment leaves nothing behind once the folder is removed.
    """
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS and not k.startswith(_LAUNCH_PREFIXES)}
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS=str(threads))
    env[_LAUNCHER_PID_ENV] = str(os.getpid())
    if shm_dir is not None:
        env[_SHM_DIR_ENV] = shm_dir
    return env


def _new_shm_dir() -> str | None:
    """A private folder in /dev/shm for the job's shared-memory segments; None if the user chose one or none exists."""
    if _SHM_DIR_ENV in os.environ or not os.path.isdir("/dev/shm") or not os.access("/dev/shm", os.W_OK):
        return None
    return tempfile.mkdtemp(prefix="moeport-mpiexec-", dir="/dev/shm")


def _watch_launcher(mpiexec_pid: int, launcher_pid: int, workdir: str) -> None:
    """In a rank mpiexec started: exit if mpiexec or the launching process goes away, so no rank is orphaned.

    A launcher that was killed could not remove the job's folders, so the ranks do.
    """
    while True:
        try:
            os.kill(launcher_pid, 0)
        except ProcessLookupError:
            shutil.rmtree(workdir, ignore_errors=True)
            if os.environ.get(_SHM_DIR_ENV, "").startswith("/dev/shm/moeport-mpiexec-"):
                shutil.rmtree(os.environ[_SHM_DIR_ENV], ignore_errors=True)
            os._exit(1)
        except PermissionError:
            pass
        if os.getppid() != mpiexec_pid:
            os._exit(1)
        time.sleep(0.5)


def _report_path(workdir: str, rank: int) -> str:
    return os.path.join(workdir, f"rank-{rank}.report")


def _error_report(exc: BaseException) -> tuple[str, str, str, bool]:
    """("error", one-line summary, traceback, whether it is a UserError) for a rank's exception."""
    lines = traceback.format_exception_only(type(exc), exc)
    summary = str(exc) if isinstance(exc, UserError) else (lines[-1].strip() if lines else type(exc).__name__)
    details = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return ("error", summary, details, isinstance(exc, UserError))


def _write_report(path: str, report: tuple) -> None:
    """Write a rank's report atomically: the launcher never reads half a file."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            pickle.dump(report, f)


def _run_job(job_path: str) -> tuple:
    """Load the job (the launcher's sys.path and main module first, then target and args) and run it."""
    global _loading_job
    try:
        _loading_job = True
        with open(job_path, "rb") as f:
            setup = pickle.load(f)
            multiprocessing.spawn.prepare(setup["preparation"])
            import torch

            torch.set_num_threads(setup["threads"])
            target, args = pickle.load(f)
        _loading_job = False
        return ("ok", target(*args))
    except BaseException as exc:  # reported to the launcher, then this rank exits non-zero
        return _error_report(exc)
    finally:
        _loading_job = False


def _mpiexec_rank_main(job_path: str) -> None:
    """In a rank that mpiexec started for `spawn_mpiexec`: run the job and write this rank's report.

    A failed rank then waits for the launcher to stop the job, so Open MPI's
    abort banner does not bury the error the launcher reports.
    """
    launcher = int(os.environ.get(_LAUNCHER_PID_ENV, os.getppid()))
    workdir = os.path.dirname(job_path)
    threading.Thread(target=_watch_launcher, args=(os.getppid(), launcher, workdir), daemon=True).start()
    path = _report_path(workdir, detect_rank_env().rank)
    report = _run_job(job_path)
    try:
        _write_report(path, report)
    except Exception as exc:  # e.g. a result that cannot be pickled
        report = _error_report(exc)
        _write_report(path, report)
    if report[0] != "ok":
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(_FAILED_RANK_WAIT_S)
        os._exit(1)


class _StderrTee(threading.Thread):
    """Forwards mpiexec's stderr to ours as it comes, keeping the last lines to explain a rank's death."""

    def __init__(self, stream: Any) -> None:
        super().__init__(name="moeport-mpiexec-stderr", daemon=True)
        self.stream = stream
        self.tail: collections.deque[str] = collections.deque(maxlen=200)

    def run(self) -> None:
        for raw in iter(self.stream.readline, b""):
            line = raw.decode(errors="replace")
            self.tail.append(line)
            try:
                sys.stderr.write(line)
                sys.stderr.flush()
            except (OSError, ValueError):
                pass

    def text(self) -> str:
        """The last lines mpiexec wrote to stderr."""
        return "".join(self.tail)


def _session_members(sid: int) -> list[int] | None:
    """Live processes of session `sid` (from /proc); None where /proc cannot tell."""
    if not os.path.isdir("/proc"):
        return None
    members = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 3 and fields[0] != "Z" and int(fields[3]) == sid:
            members.append(int(name))
    return members


def _kill_session(sid: int) -> None:
    """SIGKILL every process of session `sid` (mpiexec's: it and every rank, whatever their process groups)."""
    for _ in range(50):
        members = _session_members(sid)
        if members is None:
            try:
                os.killpg(sid, signal.SIGKILL)
            except OSError:
                pass
            return
        if not members:
            return
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.02)


def _stop_mpiexec(proc: subprocess.Popen, term_s: float) -> None:
    """Stop mpiexec and everything it started: SIGTERM (it stops the ranks and cleans up), then SIGKILL for all."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(term_s)
        except subprocess.TimeoutExpired:
            pass
    _kill_session(proc.pid)
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def _read_reports(workdir: str, world_size: int, reports: dict[int, tuple], when: dict[int, int]) -> None:
    """Add the reports written since the last look to `reports` (and their modification times to `when`)."""
    for rank in range(world_size):
        path = _report_path(workdir, rank)
        if rank not in reports and os.path.exists(path):
            when[rank] = os.stat(path).st_mtime_ns
            with open(path, "rb") as f:
                reports[rank] = pickle.load(f)


def _first_error(reports: dict[int, tuple], when: dict[int, int]) -> RankFailure | None:
    """The failure of the rank that reported an error first, if any did."""
    failed = sorted((when[r], r) for r, report in reports.items() if report[0] != "ok")
    if not failed:
        return None
    rank = failed[0][1]
    _, summary, details, user_error = reports[rank]
    return RankFailure(rank, summary, details, user_error)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def _death(returncode: int, reports: dict[int, tuple], world_size: int, stderr_text: str) -> RankFailure:
    """Why mpiexec ended before every rank reported: the rank Open MPI saw die, or the first silent one."""
    missing = [r for r in range(world_size) if r not in reports]
    banner = _SIGNAL_BANNER.search(stderr_text)
    if banner is not None:
        rank, number = int(banner.group(1)), int(banner.group(2))
        return RankFailure(rank, f"killed by signal {_signal_name(number)}", stderr_text)
    rank = missing[0] if missing else None
    if returncode > 128 or returncode < 0:
        number = returncode - 128 if returncode > 128 else -returncode
        return RankFailure(rank, f"killed by signal {_signal_name(number)}", stderr_text)
    return RankFailure(rank, f"exited before reporting a result (mpiexec exit code {returncode})", stderr_text)


def _collect_mpiexec(
    proc: subprocess.Popen, workdir: str, world_size: int, timeout_s: float | None, tee: _StderrTee
) -> list[Any]:
    """Wait for every rank's report; the results in rank order, or RankFailure for the first failure."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    reports: dict[int, tuple] = {}
    when: dict[int, int] = {}
    while True:
        exited = proc.poll() is not None
        _read_reports(workdir, world_size, reports, when)
        failure = _first_error(reports, when)
        if failure is not None:
            raise failure
        if len(reports) == world_size:
            try:
                proc.wait(_MPIEXEC_EXIT_S)  # let MPI finalise and clean up on its own
            except subprocess.TimeoutExpired:
                pass
            return [reports[r][1] for r in range(world_size)]
        if exited:
            tee.join(1.0)
            raise _death(proc.returncode, reports, world_size, tee.text())
        if deadline is not None and time.monotonic() >= deadline:
            ranks = ", ".join(str(r) for r in range(world_size) if r not in reports)
            raise RankFailure(None, f"ranks {ranks} did not finish within {timeout_s:g} s")
        time.sleep(_POLL_S)


def _write_job(path: str, target: Callable[..., Any], args: Sequence[Any], threads: int) -> None:
    """The job file: what a rank needs to unpickle the job (as multiprocessing's spawn passes it), then the job."""
    preparation = multiprocessing.spawn.get_preparation_data("moeport-rank")
    preparation.pop("authkey", None)  # not picklable, and the ranks do not talk to this process
    with open(path, "wb") as f:
        pickle.dump({"preparation": preparation, "threads": threads}, f)
        pickle.dump((target, tuple(args)), f)


def spawn_mpiexec(
    target: Callable[..., Any],
    args: Sequence[Any],
    world_size: int,
    timeout_s: float | None = None,
) -> list[Any]:
    """Run `target(*args)` on `world_size` ranks started by mpiexec; return their results in rank order.

    The contract of `spawn`, for jobs whose collectives are MPI: target and args
    are pickled to a file that each rank (`python -m moeport.launch FILE`) loads;
    each rank gets its share of the cores for torch's threads and writes its
    result or its error to a report file. The first rank to report an error
    raises RankFailure here (a rank that died without reporting is named with
    its signal); past `timeout_s` RankFailure names the ranks still running.
    mpiexec runs in a session of its own, which is stopped on every way out, so
    no rank outlives the call. UserError if mpiexec cannot be found.
    """
    if _loading_job:
        raise RuntimeError(
            "spawn_mpiexec was called while a rank was loading its job, from the launching script's top level: "
            "guard the script's entry point with `if __name__ == '__main__':`"
        )
    mpiexec = find_mpiexec()
    threads = threads_per_rank(world_size)
    workdir = tempfile.mkdtemp(prefix="moeport-mpiexec-")
    shm_dir = _new_shm_dir()
    try:
        job_path = os.path.join(workdir, "job.pkl")
        _write_job(job_path, target, args, threads)
        command = [
            mpiexec, "-n", str(world_size), "--oversubscribe", "--bind-to", "none",
            sys.executable, "-m", "moeport.launch", job_path,
        ]
        proc = subprocess.Popen(
            command, env=_mpiexec_env(threads, shm_dir), stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True,
        )
        tee = _StderrTee(proc.stderr)
        tee.start()
        try:
            return _collect_mpiexec(proc, workdir, world_size, timeout_s, tee)
        finally:
            _stop_mpiexec(proc, _MPIEXEC_TERM_S)
            tee.join(5.0)
            proc.stderr.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if shm_dir is not None:
            shutil.rmtree(shm_dir, ignore_errors=True)


if __name__ == "__main__":
    # A rank started by spawn_mpiexec: `python -m moeport.launch JOB_FILE`. Run through the imported module,
    # so the job sees the same moeport.launch as everything else.
    from moeport.launch import _mpiexec_rank_main as _main

    _main(sys.argv[1])
