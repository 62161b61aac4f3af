"""A rank started by `spawn_mpiexec`: `python -m moeport.launch JOB_FILE` runs the job in JOB_FILE.

The job runs through the imported module `moeport.launch.mpiexec`, not through
this `__main__`, so the job sees the same module as everything else (the
`_loading_job` guard is set on the module object that `spawn_mpiexec` reads).
"""

import sys

from moeport.launch.mpiexec import _mpiexec_rank_main

if __name__ == "__main__":
    _mpiexec_rank_main(sys.argv[1])
