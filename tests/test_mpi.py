"""The MPI communicator on real ranks started by mpiexec: every op and dtype, bit-exact, groups, async, failures."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("mpi4py", reason="the mpi extra is not installed")

from conftest import process_alive  # noqa: E402
from moeport.base.errors import UserError  # noqa: E402
from moeport.collectives.base import ReduceOp  # noqa: E402
from moeport.conformance import failed, format_matrix, merge, run_suite  # noqa: E402
from moeport.launch import spawn_mpiexec  # noqa: E402
from moeport.profile import load_profile  # noqa: E402
from moeport.testing import RankError, run_ranks  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int64)
ALL_FALLBACKS = ["uneven_all_to_all", "reduce_scatter", "avg", "async"]
WAIT_S = 30.0


def tagged(rank: int, rows: int, dtype: torch.dtype, width: int = 3, salt: int = 0) -> torch.Tensor:
    """Rank-tagged small integers (exact in every dtype here, and so are their sums over 4 ranks)."""
    base = torch.arange(rows * width, dtype=torch.int64).reshape(rows, width)
    return ((base * 7 + salt) % 13 + 4 * rank + 1).to(dtype)


class Checker:
    """Collects bit-exact comparisons on one rank: the failures, and every result for comparing runs."""

    def __init__(self, comm) -> None:
        self.comm = comm
        self.rank, self.world = comm.rank, comm.world_size
        self.failures: list[str] = []
        self.results: dict[str, object] = {}

    def expect(self, name: str, got: torch.Tensor, want: torch.Tensor) -> None:
        """Record `got` under `name`; a failure unless it has `want`'s dtype, shape and bits."""
        self.results[name] = got.tolist() if got.numel() <= 64 else float(got.double().sum())
        if got.dtype != want.dtype or got.shape != want.shape or not torch.equal(got, want):
            self.failures.append(f"rank {self.rank}: {name}: got {got.dtype} {tuple(got.shape)} {self.results[name]}, "
                                 f"expected {want.dtype} {tuple(want.shape)}")


def _reductions(c: Checker, dtype: torch.dtype) -> None:
    comm, w, r = c.comm, c.world, c.rank
    inputs = [tagged(q, 2, dtype, salt=1) for q in range(w)]
    stacked = torch.stack([t.double() for t in inputs])
    for op, want in ((ReduceOp.SUM, stacked.sum(0)), (ReduceOp.MAX, stacked.max(0).values),
                     (ReduceOp.MIN, stacked.min(0).values)):
        c.expect(f"all_reduce.{op.value}[{dtype}]", comm.all_reduce(inputs[r].clone(), op), want.to(dtype))
    # AVG on values whose sum divides by the group size: the exact mean in every dtype.
    avg_in = [tagged(0, 2, torch.int64) + w * q for q in range(w)]
    want_avg = (torch.stack(avg_in).sum(0) // w).to(dtype)
    c.expect(f"all_reduce.avg[{dtype}]", comm.all_reduce(avg_in[r].to(dtype), ReduceOp.AVG), want_avg)
    # A non-contiguous tensor is reduced in place through a staging copy.
    strided = tagged(r, 4, dtype, width=3).t()
    comm.all_reduce(strided)
    c.expect(f"all_reduce.strided[{dtype}]", strided, sum(tagged(q, 4, torch.float64).t() for q in range(w)).to(dtype))
    full = [tagged(q, 2 * w, dtype, salt=2) for q in range(w)]
    total = sum(t.double() for t in full)
    c.expect(f"reduce_scatter[{dtype}]", comm.reduce_scatter(full[r]), total[2 * r:2 * r + 2].to(dtype))
    out = torch.empty(2, 3, dtype=dtype)
    comm.reduce_scatter(full[r], output=out, op=ReduceOp.MAX)
    peak = torch.stack([t.double() for t in full]).max(0).values
    c.expect(f"reduce_scatter.max[{dtype}]", out, peak[2 * r:2 * r + 2].to(dtype))


def _gathers(c: Checker, dtype: torch.dtype) -> None:
    comm, w, r = c.comm, c.world, c.rank
    want = torch.cat([tagged(q, 2, dtype) for q in range(w)])
    c.expect(f"all_gather[{dtype}]", comm.all_gather(tagged(r, 2, dtype)), want)
    out = torch.empty(2 * w, 3, dtype=dtype)
    comm.all_gather(tagged(r, 2, dtype), output=out)
    c.expect(f"all_gather.output[{dtype}]", out, want)
    src = w - 1
    c.expect(f"broadcast[{dtype}]", comm.broadcast(tagged(r, 3, dtype), src=src), tagged(src, 3, dtype))


def _splits(src: int, dst: int, kind: str) -> int:
    return {"equal": 2, "empty": 0}.get(kind, (3 * src + dst) % 4)  # uneven: some pairs send nothing


def all_to_all_case(c: Checker, dtype: torch.dtype, kind: str, async_op: bool = False) -> None:
    """An all_to_all whose every row is known in advance: equal, uneven (zero-size splits) or empty."""
    comm, w, r = c.comm, c.world, c.rank
    sends = [[tagged(s, _splits(s, d, kind), dtype, salt=d) for d in range(w)] for s in range(w)]
    ins = [_splits(r, d, kind) for d in range(w)]
    outs = [_splits(s, r, kind) for s in range(w)]
    result = comm.all_to_all(torch.cat(sends[r]), input_splits=ins, output_splits=outs, async_op=async_op)
    got = result.wait(WAIT_S) if async_op else result
    name = f"all_to_all.{kind}{'.async' if async_op else ''}[{dtype}]"
    c.expect(name, got, torch.cat([sends[s][r] for s in range(w)]))


def _point_to_point(c: Checker, dtype: torch.dtype) -> None:
    """Every rank sends right and receives from the left, both async and large: must not deadlock.

    (With the async fallback forced a send blocks until received, so the ranks then take turns.)
    """
    comm, w, r = c.comm, c.world, c.rank
    right, left = (r + 1) % w, (r - 1) % w
    incoming = torch.empty(2048, 64, dtype=dtype)
    outgoing = tagged(r, 2048, dtype, width=64, salt=right)
    if "async" in comm.fallbacks and r % 2:
        received = comm.recv(incoming, left, async_op=True)
        sent = comm.send(outgoing, right, async_op=True)
    else:
        sent = comm.send(outgoing, right, async_op=True)
        received = comm.recv(incoming, left, async_op=True)
    got = received.wait(WAIT_S)
    sent.wait(WAIT_S)
    c.expect(f"send_recv[{dtype}]", got, tagged(left, 2048, dtype, width=64, salt=r))
    small = torch.empty(3, 3, dtype=dtype)
    if r % 2 == 0:  # synchronous pairs, ordered so that no cycle of blocked sends forms
        comm.send(tagged(r, 3, dtype), right)
        comm.recv(small, left)
    else:
        comm.recv(small, left)
        comm.send(tagged(r, 3, dtype), right)
    c.expect(f"send_recv.sync[{dtype}]", small, tagged(left, 3, dtype))


def _async(c: Checker, dtype: torch.dtype) -> None:
    """Several ops in flight at once, completed out of order."""
    comm, w, r = c.comm, c.world, c.rank
    h_reduce = comm.all_reduce(tagged(r, 4, dtype, salt=3), async_op=True)
    h_gather = comm.all_gather(tagged(r, 2, dtype), async_op=True)
    h_scatter = comm.reduce_scatter(tagged(r, 2 * w, dtype), async_op=True)
    deadline = time.monotonic() + WAIT_S
    while not (h_gather.is_completed() and h_scatter.is_completed() and h_reduce.is_completed()):
        assert time.monotonic() < deadline, "async ops never reported completion"
        time.sleep(0.001)
    full = sum(tagged(q, 2 * w, torch.float64) for q in range(w))
    c.expect(f"async.reduce_scatter[{dtype}]", h_scatter.wait(WAIT_S), full[2 * r:2 * r + 2].to(dtype))
    c.expect(f"async.all_gather[{dtype}]", h_gather.wait(WAIT_S), torch.cat([tagged(q, 2, dtype) for q in range(w)]))
    want = sum(tagged(q, 4, torch.float64, salt=3) for q in range(w)).to(dtype)
    c.expect(f"async.all_reduce[{dtype}]", h_reduce.wait(WAIT_S), want)
    all_to_all_case(c, dtype, "uneven", async_op=True)


def check_ops(rt):
    """Every op in every dtype on the world communicator: (failures, results, fallbacks in use)."""
    c = Checker(rt.comm)
    for dtype in DTYPES:
        _reductions(c, dtype)
        _gathers(c, dtype)
        for kind in ("equal", "uneven", "empty"):
            all_to_all_case(c, dtype, kind)
        _point_to_point(c, dtype)
        _async(c, dtype)
    c.expect("all_to_all.1d", rt.comm.all_to_all(torch.arange(c.world) + 10 * c.rank),
             torch.arange(c.world).mul(0).add(c.rank) + 10 * torch.arange(c.world))
    rt.comm.barrier()
    assert rt.comm.barrier(async_op=True).wait(WAIT_S) is None
    return c.failures, c.results, sorted(rt.comm.fallbacks), rt.comm.library


@functools.lru_cache(maxsize=None)
def native_ops(world_size: int):
    """check_ops on `world_size` ranks with the shipped cpu-mpi profile (cached: the fallback test compares to it)."""
    return run_ranks(check_ops, world_size, "cpu-mpi", timeout_s=90)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world_size", [2, 4])
def test_every_op_and_dtype_is_bit_exact(world_size):
    results = native_ops(world_size)
    failures = [f for r in results for f in r[0]]
    assert not failures, "\n".join(failures)
    assert all(r[2] == [] and r[3] == "mpi" for r in results)
    assert len(results[0][1]) == 19 * len(DTYPES) + 1  # every check ran


@pytest.mark.timeout(120)
def test_forced_fallbacks_give_identical_results():
    profile = load_profile("cpu-mpi").replace(**{"collectives.fallbacks": ALL_FALLBACKS})
    forced = run_ranks(check_ops, 4, profile, timeout_s=90)
    assert not [f for r in forced for f in r[0]]
    assert all(r[2] == sorted(ALL_FALLBACKS) for r in forced)
    for rank, (with_fallbacks, native) in enumerate(zip(forced, native_ops(4))):
        assert with_fallbacks[1] == native[1], f"rank {rank} differs"


def check_subgroups(rt):
    """Pairs and interleaved groups (every rank calls new_group for each), and the Runtime's ep / dp groups."""
    comm, w, r = rt.comm, rt.comm.world_size, rt.comm.rank
    c = Checker(comm)
    layouts = []
    for groups in ([[q, q + 1] for q in range(0, w, 2)], [list(range(0, w, 2)), list(range(1, w, 2))]):
        made = [comm.new_group(members) for members in groups]
        mine = next(g for g in groups if r in g)
        group = made[groups.index(mine)]
        assert all(g is None for g in made if g is not group), "new_group must give non-members None"
        assert group.forced_fallbacks == comm.forced_fallbacks and group.library == "mpi"
        layouts.append((group.rank, group.world_size, group.global_ranks))
        c.expect(f"group{mine}.all_reduce", group.all_reduce(tagged(r, 2, torch.bfloat16)),
                 sum(tagged(q, 2, torch.float64) for q in mine).to(torch.bfloat16))
        sub = Checker(group)
        all_to_all_case(sub, torch.float16, "uneven")
        c.failures += sub.failures
        single = group.new_group([group.rank])
        c.expect(f"group{mine}.single", single.all_gather(tagged(r, 1, torch.int64)), tagged(r, 1, torch.int64))
    groups_of = {name: getattr(rt.groups, name).global_ranks for name in ("ep", "dp")}
    return c.failures, layouts, groups_of


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world_size", [2, 4])
def test_subgroups(world_size):
    profile = load_profile("cpu-mpi").replace(**{"parallel.ep": 2, "collectives.fallbacks": ["avg"]})
    results = run_ranks(check_subgroups, world_size, profile, timeout_s=90)
    assert not [f for r in results for f in r[0]]
    for rank, (_, layouts, groups_of) in enumerate(results):
        pair = [rank - rank % 2, rank - rank % 2 + 1]
        interleaved = list(range(rank % 2, world_size, 2))
        assert layouts == [(rank % 2, 2, pair), (interleaved.index(rank), len(interleaved), interleaved)]
        assert groups_of == {"ep": pair, "dp": interleaved}


def check_wait_timeouts(rt):
    """A wait that runs out names the op; waiting again once the peer has joined gives the result."""
    comm, r = rt.comm, rt.comm.rank
    messages = []
    if r == 0:
        handle = comm.recv(torch.empty(3), 1, async_op=True)
        with pytest.raises(TimeoutError) as caught:
            handle.wait(0.2)
        messages.append(str(caught.value))
        comm.barrier()
        got = handle.wait(WAIT_S)
        assert torch.equal(got, torch.full((3,), 7.0)), got
        handle = comm.all_reduce(torch.ones(2), async_op=True)
        with pytest.raises(TimeoutError) as caught:
            handle.wait(0.2)
        messages.append(str(caught.value))
        assert torch.equal(handle.wait(WAIT_S), torch.full((2,), 2.0))
    else:
        comm.barrier()
        comm.send(torch.full((3,), 7.0), 0)
        time.sleep(1.0)
        comm.all_reduce(torch.ones(2))
    return messages


@pytest.mark.timeout(60)
def test_wait_timeout_names_the_op():
    messages = run_ranks(check_wait_timeouts, 2, "cpu-mpi", timeout_s=45)[0]
    assert len(messages) == 2
    assert "recv" in messages[0] and "0.2 s" in messages[0]
    assert "all_reduce" in messages[1] and "did not complete" in messages[1]


@pytest.mark.timeout(90)
def test_conformance_suite_passes():
    matrix = merge(run_ranks(run_suite, 2, "cpu-mpi", timeout_s=75))
    assert not failed(matrix), format_matrix(matrix)
    for op in ("all_to_all.uneven", "reduce_scatter", "all_reduce.avg", "async", "subgroups"):
        assert matrix[op]["bfloat16"]["status"] == "pass", op


def failing(rt):
    """Rank 1 raises while rank 0 waits in a barrier."""
    if rt.rank == 1:
        raise ValueError("rank one is unhappy")
    rt.comm.barrier()


def failing_on_input(rt):
    """Rank 0 fails on the user's input (a UserError: reported as its one line)."""
    if rt.rank == 0:
        raise UserError("model.checkpoint: no such file")
    rt.comm.barrier()


@pytest.mark.timeout(60)
def test_failing_rank_is_named():
    with pytest.raises(RankError, match=r"rank 1 failed: ValueError: rank one is unhappy") as caught:
        run_ranks(failing, 2, "cpu-mpi", timeout_s=45)
    assert "Traceback" in str(caught.value) and "failing" in str(caught.value)
    with pytest.raises(RankError, match=r"^model.checkpoint: no such file"):
        run_ranks(failing_on_input, 4, "cpu-mpi", timeout_s=45)


def dying(rt):
    """Rank 1 is killed (as by the OOM killer) and never reports."""
    if rt.rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    rt.comm.barrier()


@pytest.mark.timeout(60)
def test_rank_killed_by_a_signal_is_named():
    with pytest.raises(RankError, match=r"rank 1 failed: killed by signal SIGKILL"):
        run_ranks(dying, 2, "cpu-mpi", timeout_s=45)


def rank_info(tag):
    """Who this rank is, as the launcher set it up."""
    from moeport.launch import detect_rank_env

    env = detect_rank_env()
    return env.rank, env.world_size, env.launcher, torch.get_num_threads(), tag


@pytest.mark.timeout(60)
def test_spawn_mpiexec_returns_results_in_rank_order():
    results = spawn_mpiexec(rank_info, ("x",), 3, timeout_s=45)
    assert [r[:3] for r in results] == [(rank, 3, "mpiexec") for rank in range(3)]
    assert all(r[3] >= 1 and r[4] == "x" for r in results)


def sleeper(folder):
    """Note this rank's pid and the job's folders (its job file is the last argument), then sleep."""
    with open(f"/proc/{os.getpid()}/cmdline", "rb") as f:
        job_dir = os.path.dirname(f.read().split(b"\0")[-2].decode())
    with open(os.path.join(folder, f"pid-{os.getpid()}"), "w") as f:
        f.write("\n".join([job_dir, os.environ.get("OMPI_MCA_btl_sm_backing_directory", job_dir)]))
    time.sleep(60)


def _left_behind(folder) -> list:
    """The noted ranks still alive and the noted job folders still present."""
    alive = [int(name.split("-")[1]) for name in os.listdir(folder) if process_alive(int(name.split("-")[1]))]
    dirs = set()
    for name in os.listdir(folder):
        with open(os.path.join(folder, name)) as f:
            dirs.update(f.read().split("\n"))
    return alive + sorted(d for d in dirs if os.path.exists(d))


@pytest.mark.timeout(60)
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc to look for leftover processes")
def test_timeout_stops_every_rank(tmp_path):
    start = time.monotonic()
    # 15 s: long enough for three ranks to start (import torch, note their pid) on a loaded 2-core machine
    with pytest.raises(Exception, match=r"ranks 0, 1, 2 did not finish within 15 s"):
        spawn_mpiexec(sleeper, (str(tmp_path),), 3, timeout_s=15)
    assert time.monotonic() - start < 30
    assert len(os.listdir(tmp_path)) == 3
    assert not _left_behind(tmp_path)


LAUNCHER = """
import sys
from moeport.launch import spawn_mpiexec
from test_mpi import sleeper
if __name__ == "__main__":
    spawn_mpiexec(sleeper, (sys.argv[1],), 2)
"""


@pytest.mark.timeout(60)
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc to look for leftover processes")
def test_killed_launcher_leaves_no_rank_behind(tmp_path):
    script = tmp_path / "launcher.py"
    script.write_text(LAUNCHER)
    folder = tmp_path / "pids"
    folder.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    launcher = subprocess.Popen([sys.executable, str(script), str(folder)], env=env)
    try:
        deadline = time.monotonic() + 30
        while len(os.listdir(folder)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(os.listdir(folder)) == 2
    finally:
        launcher.kill()
        launcher.wait()
    deadline = time.monotonic() + 10
    while _left_behind(folder) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _left_behind(folder)


def test_missing_mpiexec_is_a_user_error(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UserError, match=r"mpiexec.*pip install 'moeport\[mpi\]'"):
        spawn_mpiexec(sleeper, (str(tmp_path),), 2)
