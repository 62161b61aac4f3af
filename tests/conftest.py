"""Shared helpers for the tests: running the CLI as a user would."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

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


@pytest.fixture
def cli():
    """The run_cli helper as a fixture."""
    return run_cli
