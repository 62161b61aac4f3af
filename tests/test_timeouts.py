"""A rank that stops answering ends the job as a clear timeout; the spawned launcher's own deadline holds.

Each case names the operation that timed out and after how long, in moeport's words, and
leaves no process behind (the stopped rank included).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import process_alive
from moeport.launch import RankFailure, spawn

pytestmark = pytest.mark.timeout(240)

TIMEOUT_S = 8.0


def _spawned_ranks(parent: int) -> list[int]:
    """The pids of the ranks `parent` spawned (multiprocessing's spawned children), in start order."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{name}/cmdline", "rb") as f:
                command = f.read()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and b"spawn_main" in command:
            found.append(int(name))
    return sorted(found)


def test_a_rank_stopped_mid_run_is_named_with_the_operation_that_timed_out(tmp_path):
    """`moeport run`, rank 1 stopped with SIGSTOP while decoding: exit 1 within the collective timeout plus a
    margin, one line naming rank 1 and the timed-out operation, and no rank left, the stopped one included."""
    profile = tmp_path / "p.yaml"
    profile.write_text(f"backend: cpu\ncollectives: {{timeout_s: {TIMEOUT_S}}}\nparallel: {{world_size: 2}}\n"
                       "model: {preset: tiny}\n")
    run = subprocess.Popen([sys.executable, "-m", "moeport", "run", "--profile", str(profile), "--iterations", "50000"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while len(ranks := _spawned_ranks(run.pid)) < 2 and time.monotonic() < deadline and run.poll() is None:
            time.sleep(0.1)
        assert len(ranks) == 2, "the ranks did not start"
        time.sleep(3)  # the model is built and decoding
        os.kill(ranks[1], signal.SIGSTOP)
        stopped = time.monotonic()
        _, err = run.communicate(timeout=TIMEOUT_S + 60)
        took = time.monotonic() - stopped
    finally:
        if run.poll() is None:
            run.kill()
    lines = err.strip().splitlines()
    assert run.returncode == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("moeport: error: rank 1 failed: stopped answering (stopped by a signal"), lines[0]
    assert f" did not complete within {TIMEOUT_S:g} s" in lines[0], lines[0]  # the operation (which one depends on when the rank stopped), in moeport's words
    assert took < TIMEOUT_S + 30, took
    assert not [pid for pid in ranks if process_alive(pid)]


def _all_reduce_beside_a_silent_peer(timeout_s: float) -> None:
    """Rank 0 all_reduces; rank 1 is alive (its heartbeat beats) but never joins, until it is stopped.
    The ranks join with the profile's 60 s (a loaded machine may take a while to start them); then the
    collectives give up after `timeout_s`."""
    from moeport.profile import load_profile
    from moeport.runtime import Runtime

    with Runtime.start(load_profile("cpu-gloo")) as rt:
        rt.comm.barrier()
        rt.comm.timeout_s = timeout_s
        if rt.rank == 1:
            time.sleep(600)
        rt.comm.all_reduce(torch.ones(4))


def test_a_live_but_silent_peer_makes_the_collective_time_out_in_moeports_words():
    started = time.monotonic()
    with pytest.raises(RankFailure) as failure:
        spawn(_all_reduce_beside_a_silent_peer, (TIMEOUT_S,), 2, timeout_s=120)
    assert str(failure.value) == f"rank 0 failed: TimeoutError: all_reduce did not complete within {TIMEOUT_S:g} s"
    assert time.monotonic() - started < TIMEOUT_S + 30


def _sleep_forever() -> None:
    time.sleep(600)


def test_the_spawned_launchers_own_deadline_stops_every_rank():
    parent = os.getpid()
    started = time.monotonic()
    with pytest.raises(RankFailure, match=r"^job failed: ranks 0, 1 did not finish within 3 s$"):
        spawn(_sleep_forever, (), 2, timeout_s=3)
    assert time.monotonic() - started < 3 + 15
    assert _spawned_ranks(parent) == []
