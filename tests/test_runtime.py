"""The Runtime on real spawned ranks over gloo: bootstrap, groups, collectives, launch detection."""

from __future__ import annotations

import os

import pytest
import torch

from moeport.base.errors import UserError
from moeport.launch import RankEnv, detect_rank_env
from moeport.profile import load_profile
from moeport.runtime import Runtime, parallel_layout
from moeport.testing import RankError, run_ranks

pytestmark = pytest.mark.timeout(180)


def ranks_and_sums(rt):
    t = torch.tensor([float(rt.rank + 1)])
    rt.comm.all_reduce(t)
    gathered = rt.comm.all_gather(torch.tensor([rt.rank]))
    ep_sum = torch.tensor([float(rt.rank)])
    rt.groups.ep.all_reduce(ep_sum)
    dp_sum = torch.tensor([float(rt.rank)])
    rt.groups.dp.all_reduce(dp_sum)
    return {
        "rank": rt.rank,
        "world": rt.world_size,
        "backend": rt.backend.name,
        "device": str(rt.device),
        "sum": t.item(),
        "gathered": gathered.tolist(),
        "ep": rt.groups.ep.global_ranks,
        "dp": rt.groups.dp.global_ranks,
        "ep_sum": ep_sum.item(),
        "dp_sum": dp_sum.item(),
        "threads": torch.get_num_threads(),
        "library": rt.comm.library,
    }


@pytest.mark.parametrize("profile", ["cpu-gloo", "generic-cpu"])
@pytest.mark.parametrize("world_size", [2, 4])
def test_runtime_on_spawned_ranks(profile, world_size):
    results = run_ranks(ranks_and_sums, world_size, profile, timeout_s=120)
    expected_sum = world_size * (world_size + 1) / 2
    for rank, r in enumerate(results):
        assert r["rank"] == rank and r["world"] == world_size
        assert r["backend"] == ("cpu" if profile == "cpu-gloo" else "generic")
        assert r["device"] == "cpu" and r["library"] == "gloo"
        assert r["sum"] == expected_sum
        assert r["gathered"] == list(range(world_size))
        assert r["ep"] == list(range(world_size)) and r["dp"] == [rank]
        assert r["threads"] >= 1


def test_ep_and_dp_groups_at_world_4():
    profile = load_profile("cpu-gloo").replace(**{"parallel.ep": 2}).with_world_size(4)
    results = run_ranks(ranks_and_sums, 4, profile, timeout_s=120)
    assert [r["ep"] for r in results] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r["dp"] for r in results] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [r["ep_sum"] for r in results] == [1, 1, 5, 5]
    assert [r["dp_sum"] for r in results] == [2, 4, 2, 4]


def test_parallel_layout():
    assert parallel_layout(6, 3) == ([[0, 1, 2], [3, 4, 5]], [[0, 3], [1, 4], [2, 5]])


def test_single_process_runtime():
    with Runtime.start(load_profile("cpu-gloo", world_size=1)) as rt:
        t = torch.tensor([2.0])
        rt.comm.all_reduce(t)
        assert (rt.rank, rt.world_size, t.item()) == (0, 1, 2.0)


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
def test_close_stops_the_library_threads():
    # A process group kept alive past destroy_process_group leaves gloo threads running into
    # interpreter exit, where they can abort the process after the job succeeded.
    before = os_threads()
    rt = Runtime.start(load_profile("cpu-gloo", world_size=1))
    assert os_threads() > before
    rt.close()
    assert os_threads() == before


def failing(rt):
    if rt.rank == 1:
        raise ValueError("rank one is unhappy")
    rt.comm.barrier()


def test_failing_rank_is_named():
    with pytest.raises(RankError, match=r"rank 1 failed: ValueError: rank one is unhappy"):
        run_ranks(failing, 2, "cpu-gloo", timeout_s=60)


def test_detect_launchers():
    assert detect_rank_env({}) == RankEnv()
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "29500",
                "TORCHELASTIC_RUN_ID": "x"}
    assert detect_rank_env(torchrun) == RankEnv(3, 4, 1, "torchrun", "h", 29500)
    ompi = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
    assert detect_rank_env(ompi) == RankEnv(1, 2, 1, "mpiexec", None, None)
    pmi = {"PMI_RANK": "0", "PMI_SIZE": "2"}
    assert detect_rank_env(pmi).launcher == "mpiexec"


def test_world_size_flag_disagreeing_with_launcher():
    env = RankEnv(0, 4, 0, "torchrun", "127.0.0.1", 1)
    with pytest.raises(UserError, match="--world-size 2 disagrees with torchrun, which started 4 ranks"):
        Runtime.start(load_profile("cpu-gloo"), requested_world_size=2, rank_env=env)


def threads_end_with_their_communicator(rt):
    """A communicator's threads live while it does and end with its close(): the worker of an async
    all_to_all_with_counts on a new group, and (MPI) the communication thread of a new world communicator."""
    import threading
    import time

    def moeport_threads():
        return sorted(t.name for t in threading.enumerate() if t.name.startswith("moeport-"))

    def settled(expected):
        deadline = time.monotonic() + 10
        while moeport_threads() != expected and time.monotonic() < deadline:
            time.sleep(0.01)
        return moeport_threads()

    before = moeport_threads()
    group = rt.comm.new_group(list(range(rt.world_size)))
    rows = torch.arange(rt.world_size * 2.0).reshape(-1, 1)
    got, splits = group.all_to_all_with_counts(rows, [2] * rt.world_size, async_op=True).wait(30)
    seen = {"before": before, "during": moeport_threads()}
    group.close()
    seen["after"] = settled(before)
    if rt.profile.collectives.library == "mpi":
        from moeport.collectives.mpi import MPICommunicator

        extra = MPICommunicator.world(timeout_s=30)
        extra.barrier()
        seen["second world"] = moeport_threads()
        extra.close()
        seen["after closing it"] = settled(before)
    return seen, splits


@pytest.mark.parametrize("profile", ["cpu-gloo", "cpu-mpi"])
def test_communicators_own_their_threads(profile):
    if profile == "cpu-mpi":
        pytest.importorskip("mpi4py", reason="the mpi extra is not installed")
    for seen, splits in run_ranks(threads_end_with_their_communicator, 2, profile, timeout_s=90):
        assert splits == [2, 2]
        library = "mpi" if profile == "cpu-mpi" else "gloo"
        assert [name for name in seen["during"] if name not in seen["before"]] == [f"moeport-{library}_0"], seen
        assert seen["after"] == seen["before"], seen
        if profile == "cpu-mpi":
            assert seen["second world"].count("moeport-mpi") == seen["before"].count("moeport-mpi") + 1, seen
            assert seen["after closing it"] == seen["before"], seen
