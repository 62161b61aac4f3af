"""One report per job when torchrun or mpiexec started the ranks: rank 0 gathers every rank's result and prints."""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys

import pytest
from test_launchers import mpi_env, mpiexec_command

pytestmark = pytest.mark.timeout(180)

RUN = ("run", "--json", "--iterations", "2", "--batch", "1", "--prompt-length", "8")


def torchrun_cli(tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """`torchrun --nproc-per-node 2 -m moeport ARGS`; returns the process and each rank's stdout, in rank order."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI", "MOEPORT_"))}
    logs = tmp_path / "torchrun-logs"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "--redirects", "1", "--log-dir", str(logs), "-m", "moeport", *args],
        capture_output=True, text=True, timeout=150, env=env,
    )
    outputs = []
    for rank in range(2):
        found = glob.glob(str(logs / "*" / "attempt_0" / str(rank) / "stdout.log"))
        assert len(found) == 1, (rank, found, result.stderr[-3000:])
        with open(found[0]) as f:
            outputs.append(f.read())
    return result, outputs


def mpiexec_cli(*args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """`mpiexec -n 2 python -m moeport ARGS`; returns the process and each rank's stdout, in rank order."""
    result = subprocess.run(
        [*mpiexec_command(2), "--tag-output", sys.executable, "-m", "moeport", *args],
        capture_output=True, text=True, timeout=150, env=mpi_env(),
    )
    outputs = ["", ""]
    for line in result.stdout.splitlines():
        tagged = re.match(r"\[\d+,(\d+)\]<stdout>:\s?(.*)$", line)
        assert tagged, line
        outputs[int(tagged.group(1))] += tagged.group(2) + "\n"
    return result, outputs


def assert_one_run_report(rank0: str, rank1: str) -> None:
    """Rank 0 printed the job's report (both ranks' expert load, ranks_reporting 2); rank 1 printed nothing."""
    lines = rank0.strip().splitlines()
    assert sum(line.startswith("moeport run: 2 ranks") for line in lines) == 1, rank0
    for rank in range(2):
        assert sum(line.startswith(f"  rank {rank}: zero-expert share") for line in lines) == 1, rank0
    totals = json.loads(lines[-1])
    assert totals["ranks_reporting"] == 2 and totals["world_size"] == 2 and totals["tokens_per_s"] > 0
    assert rank1 == "", rank1


def test_torchrun_run_prints_one_report_of_every_rank(tmp_path):
    result, (rank0, rank1) = torchrun_cli(tmp_path, *RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_one_run_report(rank0, rank1)


def test_torchrun_conformance_prints_one_matrix_and_writes_one_json(tmp_path):
    out = tmp_path / "conformance.json"
    result, (rank0, rank1) = torchrun_cli(tmp_path, "conformance", "--json", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert rank0.count("conformance: profile") == 1 and rank0.count("\noperation ") == 1, rank0
    assert rank0.count(f"wrote {out}") == 1 and "conformance: passed" in rank0
    assert rank1 == "", rank1
    report = json.loads(out.read_text())
    assert report["ranks_reporting"] == 2 and report["world_size"] == 2 and report["passed"]


@pytest.mark.parametrize("profile", ["cpu-gloo", "cpu-mpi"])
def test_mpiexec_run_prints_one_report_of_every_rank(profile):
    pytest.importorskip("mpi4py", reason="the mpi extra is not installed")
    result, (rank0, rank1) = mpiexec_cli(*RUN, "--profile", profile)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_one_run_report(rank0, rank1)


def test_torchrun_generate_prints_once(tmp_path, checkpoint, tokens):
    result, (rank0, rank1) = torchrun_cli(tmp_path, "generate", "--checkpoint", checkpoint, "--tokens", tokens,
                                          "--max-new-tokens", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = rank0.strip().splitlines()
    assert len(rows) == 3 and all(len(row.split()) == 13 for row in rows), rank0
    assert rank1 == "", rank1
