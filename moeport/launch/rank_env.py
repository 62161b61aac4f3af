"""Who this process is in the job: its rank, the world size and the launcher that started it.

`detect_rank_env()` reads the variables a launcher sets (moeport's own `spawn`,
torchrun, mpiexec); `threads_per_rank()` splits this machine's cores between
the ranks that share it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping

#: Set to "1" in the environment of the ranks that `spawn` starts.
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


def core_shares(ranks_on_machine: int) -> list[set[int]] | None:
    """Each rank's own cores, in rank order: the usable cores split into equal, consecutive shares; None where
    there are fewer cores than ranks (or the platform cannot pin), and the ranks share them all.

    A rank whose threads (compute, and its collective library's) keep to its own cores is not held
    up when another rank's threads wake on the core it computes on.
    """
    try:
        usable = sorted(os.sched_getaffinity(0))
    except AttributeError:
        return None
    per = len(usable) // max(1, ranks_on_machine)
    if per < 1:
        return None
    return [set(usable[rank * per:(rank + 1) * per]) for rank in range(ranks_on_machine)]


def threads_per_rank(ranks_on_machine: int) -> int:
    """torch threads for each of `ranks_on_machine` ranks so that together they do not oversubscribe the cores."""
    return max(1, usable_cores() // max(1, ranks_on_machine))
