"""Starting ranks: spawned CPU processes on this machine, or ranks that torchrun / mpiexec started.

`detect_rank_env()` reads how this process was started. `spawn()` starts N local
ranks, watches them, and stops the job cleanly when one fails: it names the
failed rank and its error, terminates the others and leaves no process behind.
`spawn_mpiexec()` does the same for ranks that mpiexec starts (the MPI collectives).

Modules, one job each:

- `rank_env`: who this process is (`RankEnv`, `detect_rank_env` for spawned,
  torchrun and mpiexec ranks) and its share of the cores (`threads_per_rank`);
- `failures`: `RankFailure` and the report format every launcher shares, a
  rank's ("ok", result) or ("error", summary, details, user_error);
- `spawned`: `spawn`, moeport's own launcher over multiprocessing;
- `mpiexec`: `spawn_mpiexec` and `find_mpiexec`, ranks started by mpiexec,
  launcher side and rank side;
- `__main__`: the rank entry `python -m moeport.launch JOB_FILE` that
  `spawn_mpiexec` starts.
"""

from moeport.launch.failures import RankFailure
from moeport.launch.mpiexec import find_mpiexec, spawn_mpiexec
from moeport.launch.rank_env import SPAWNED_ENV, RankEnv, detect_rank_env, threads_per_rank, usable_cores
from moeport.launch.spawned import spawn

__all__ = [
    "SPAWNED_ENV",
    "RankEnv",
    "RankFailure",
    "detect_rank_env",
    "find_mpiexec",
    "spawn",
    "spawn_mpiexec",
    "threads_per_rank",
    "usable_cores",
]
