"""Shared helpers for the tests: running the CLI as a user would."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from reference import save_reference_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120, cwd: str | None = None):
    """Run `python -m moeport ARGS` in a fresh process; returns the CompletedProcess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "moeport", *args],
        capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd,
    )


def assert_user_error(result, *needles: str) -> str:
    """Exit code 2, exactly one line on stderr, no traceback, each needle in it; returns the line."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def process_alive(pid: int) -> bool:
    """Whether `pid` is a live process (not gone, not a zombie), read from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def cli():
    """The run_cli helper as a fixture."""
    return run_cli


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A tiny random LongCat-Flash checkpoint written by transformers' save_pretrained."""
    pytest.importorskip("transformers")
    return save_reference_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "tiny"), seed=4)


@pytest.fixture(scope="session")
def tokens(tmp_path_factory):
    """A .npy file of int64 token ids [3, 11] for the tiny checkpoint."""
    path = tmp_path_factory.mktemp("tokens") / "in.npy"
    np.save(path, np.random.default_rng(5).integers(0, 256, size=(3, 11), dtype=np.int64))
    return str(path)
