"""A vendor's collective library is judged by what it does: its gaps are declared by its Backend or
recognised from the process group under its name (tests/plugin_testccl registers gloo as `testccl`);
conformance fails fast and says which declaration would turn a FAIL into a fallback."""

from __future__ import annotations

import json
import os
import time

import pytest

from conftest import assert_user_error, run_cli
from moeport.collectives import library_gaps
from moeport.profile import load_profile
from moeport.testing import run_ranks

pytestmark = pytest.mark.timeout(300)
TESTS = os.path.dirname(os.path.abspath(__file__))


def _conformance(tmp_path, backend: str):
    """`moeport conformance` on 2 ranks of the plugin `backend`: (exit code, JSON report or None, stderr, seconds)."""
    profile = tmp_path / "chip.yaml"
    profile.write_text(f"backend: 'plugin_testccl:{backend}'\nparallel: {{world_size: 2}}\n")
    report = tmp_path / "report.json"
    started = time.monotonic()
    result = run_cli("conformance", "--profile", str(profile), "--json", str(report),
                     env={"PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")])}, timeout=240)
    took = time.monotonic() - started
    document = json.loads(report.read_text()) if report.exists() else None
    return result, document, took


def test_a_library_under_its_own_name_is_recognised_by_its_process_group(tmp_path):
    result, document, took = _conformance(tmp_path, "TestCCLBackend")
    assert result.returncode == 0, result.stdout + result.stderr
    cells = document["results"]
    assert document["collectives"]["backend"] is None and "testccl" in result.stdout + json.dumps(document)
    assert cells["reduce_scatter"]["float32"]["status"] == "fallback"  # gloo's gap, under another name
    assert cells["async"]["float32"]["status"] == "pass"  # the fallback serves the async reduce_scatter
    assert cells["all_to_all.uneven"]["float32"]["status"] == "pass"
    assert took < 90, took


def test_a_declared_gap_wins(tmp_path):
    result, document, _ = _conformance(tmp_path, "DeclaredGapsBackend")
    assert result.returncode == 0, result.stdout + result.stderr
    for op in ("reduce_scatter", "all_to_all.uneven", "all_to_all.with_counts", "dispatch_combine"):
        assert document["results"][op]["float32"]["status"] == "fallback", op


def test_a_gap_left_undeclared_fails_fast_and_says_what_to_declare(tmp_path):
    """The original report: a gloo-like library declared to lack nothing took about four minutes to FAIL."""
    result, document, took = _conformance(tmp_path, "NoGapsBackend")
    assert result.returncode == 1
    cell = document["results"]["async"]["float32"]
    assert cell["status"] == "FAIL" and "async reduce_scatter never reported completion" in cell["detail"]
    assert "collective_gaps = frozenset({'reduce_scatter'})" in cell["detail"]
    assert document["results"]["all_reduce.sum"]["float32"]["status"] == "pass"  # the ranks stayed in step
    assert document["results"]["barrier"]["-"]["status"] == "pass"
    assert took < 60, took


def test_an_unknown_declared_gap_is_the_plugins_mistake(tmp_path):
    profile = tmp_path / "chip.yaml"
    profile.write_text("backend: 'plugin_testccl:WrongGapBackend'\nparallel: {world_size: 1}\n")
    result = run_cli("run", "--profile", str(profile), "--iterations", "1",
                     env={"PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")])})
    assert_user_error(result, "plugin_testccl:WrongGapBackend", "collective_gaps", "'all_to_all_v'", "reduce_scatter")


def gaps_by_probe(rt):
    """The gaps of a new group when moeport does not know its process group's class: found by the probe."""
    library_gaps.KNOWN_GAPS.clear()  # this rank's process only
    started = time.monotonic()
    group = rt.comm.new_group(list(range(rt.world_size)))
    probed = library_gaps.recognise(group.group, group.timeout_s)
    return sorted(probed), time.monotonic() - started, sorted(library_gaps.backend_classes(group.group))


def test_an_unknown_process_group_is_judged_by_a_probe():
    for gaps, took, classes in run_ranks(gaps_by_probe, 2, load_profile("cpu-gloo"), timeout_s=120):
        assert classes == ["ProcessGroupGloo"] and gaps == ["reduce_scatter"]
        assert took < 10
