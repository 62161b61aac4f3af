"""Ranks that mpiexec starts: `spawn_mpiexec()` runs a job on N ranks for the MPI collectives.

The launcher side (`spawn_mpiexec`, `find_mpiexec`) writes the job to a file,
starts mpiexec in a session of its own, forwards its stderr (`_StderrTee`),
collects the ranks' report files (the format of `moeport.launch.failures`) and
kills the whole session on every way out. The rank side (`_mpiexec_rank_main`,
run by `python -m moeport.launch JOB_FILE`) loads and runs the job, writes its
report and watches the launcher, so no rank is left orphaned.
"""

from __future__ import annotations

import collections
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
from typing import Any, Callable, Sequence

from moeport.base.atomic import atomic_path
from moeport.base.errors import UserError
from moeport.launch.failures import RankFailure, error_report, failure_from_report, ok_report, signal_name
from moeport.launch.rank_env import SPAWNED_ENV, detect_rank_env, threads_per_rank

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
    """The file where rank `rank` of the job in `workdir` writes its report."""
    return os.path.join(workdir, f"rank-{rank}.report")


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
        return ok_report(target(*args))
    except BaseException as exc:  # reported to the launcher, then this rank exits non-zero
        return error_report(exc)
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
        report = error_report(exc)
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
    return failure_from_report(rank, reports[rank])


def _death(returncode: int, reports: dict[int, tuple], world_size: int, stderr_text: str) -> RankFailure:
    """Why mpiexec ended before every rank reported: the rank Open MPI saw die, or the first silent one."""
    missing = [r for r in range(world_size) if r not in reports]
    banner = _SIGNAL_BANNER.search(stderr_text)
    if banner is not None:
        rank, number = int(banner.group(1)), int(banner.group(2))
        return RankFailure(rank, f"killed by signal {signal_name(number)}", stderr_text)
    rank = missing[0] if missing else None
    if returncode > 128 or returncode < 0:
        number = returncode - 128 if returncode > 128 else -returncode
        return RankFailure(rank, f"killed by signal {signal_name(number)}", stderr_text)
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

