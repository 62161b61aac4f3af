"""Ranks started by torchrun and by mpiexec find each other through the Runtime."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.timeout(180)

SCRIPT = textwrap.dedent('''
    import torch
    from moeport.profile import load_profile
    from moeport.runtime import Runtime

    with Runtime.start(load_profile("cpu-gloo")) as rt:
        t = torch.tensor([rt.rank + 1.0])
        rt.comm.all_reduce(t)
        print(f"rank {rt.rank}/{rt.world_size} via {rt.rank_env.launcher}: {t.item()}", flush=True)
''')


def _script(tmp_path):
    path = tmp_path / "job.py"
    path.write_text(SCRIPT)
    return str(path)


def test_torchrun(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI", "MOEPORT_"))}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", _script(tmp_path)],
        capture_output=True, text=True, timeout=150, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in range(2):
        assert f"rank {rank}/2 via torchrun: 3.0" in result.stdout


def mpiexec_command(n: int) -> list[str]:
    """`mpiexec -n N` that works as root and with more ranks than cores."""
    exe = shutil.which("mpiexec") or os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return [exe, "-n", str(n), "--oversubscribe", "--bind-to", "none"]


def mpi_env() -> dict[str, str]:
    """Environment for Open MPI runs in tests: root allowed, no launcher variables leaking in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOEPORT_", "RANK", "WORLD_SIZE", "MASTER_"))}
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_rmaps_base_oversubscribe="1")
    return env


def test_mpiexec_with_torch_collectives(tmp_path):
    pytest.importorskip("mpi4py", reason="the mpi extra is not installed")
    result = subprocess.run(
        [*mpiexec_command(2), sys.executable, _script(tmp_path)],
        capture_output=True, text=True, timeout=150, env=mpi_env(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in range(2):
        assert f"rank {rank}/2 via mpiexec: 3.0" in result.stdout


FAILING = textwrap.dedent('''
    import sys
    from moeport.jobs import run_on_ranks
    from moeport.launch import RankFailure
    from moeport.profile import load_profile

    def boom(rt):
        if rt.rank == 1:
            raise RuntimeError("boom")
        return rt.rank

    if __name__ == "__main__":
        try:
            run_on_ranks(boom, (), load_profile("cpu-gloo").replace(**{"collectives.timeout_s": 10.0}))
        except RankFailure as failure:
            print(f"moeport: error: {failure}", file=sys.stderr)
            sys.exit(1)
''')


def test_torchrun_rank_that_fails_says_so_in_one_line(tmp_path):
    path = tmp_path / "failing.py"
    path.write_text(FAILING)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI", "MOEPORT_"))}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(path)],
        capture_output=True, text=True, timeout=150, env=env,
    )
    assert result.returncode != 0
    assert "moeport: error: rank 1 failed: RuntimeError: boom" in result.stderr.splitlines()


def cores_of_this_rank(rt) -> list[int]:
    """The cores this rank may run on."""
    return sorted(os.sched_getaffinity(0))


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="the platform cannot pin a process to cores")
def test_spawned_ranks_keep_to_their_own_share_of_the_cores():
    from moeport.launch.rank_env import core_shares
    from moeport.testing import run_ranks

    usable = sorted(os.sched_getaffinity(0))
    got = run_ranks(cores_of_this_rank, 2, "cpu-gloo", timeout_s=120)
    if len(usable) >= 2:
        assert [set(cores) for cores in got] == core_shares(2)
        assert got[0] and got[1] and not set(got[0]) & set(got[1]) and set(got[0]) | set(got[1]) <= set(usable)
    else:
        assert got == [usable, usable]
    many = len(usable) + 1  # more ranks than cores: no pinning, every rank on every core
    assert core_shares(many) is None
