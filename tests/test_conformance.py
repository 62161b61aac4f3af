"""The conformance suite passes on the CPU profiles, shows fallbacks, and catches a wrong answer."""

from __future__ import annotations

import pytest

from moeport.collectives.base import Handle
from moeport.conformance import failed, format_matrix, merge, run_suite
from moeport.kernels import cpu_fused_experts
from moeport.profile import load_profile
from moeport.testing import run_ranks

pytestmark = pytest.mark.timeout(300)


def _suite(profile, world_size):
    return merge(run_ranks(run_suite, world_size, profile, timeout_s=240))


@pytest.mark.parametrize("profile", ["cpu-gloo", "generic-cpu"])
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_suite_passes(profile, world_size):
    matrix = _suite(profile, world_size)
    assert not failed(matrix), format_matrix(matrix)
    assert matrix["all_to_all.uneven"]["bfloat16"]["status"] == "pass"
    assert matrix["all_reduce.avg"]["int64"]["status"] == "unsupported"
    # gloo's reduce_scatter cannot complete asynchronously: a declared fallback serves it
    assert matrix["reduce_scatter"]["float32"]["status"] == "fallback"
    # the CPU backend offers the experts its own kernels, where this machine builds them; optional, so never a
    # FAIL; the generic backend, as a vendor's plugin that declares none, offers none
    fused = profile == "cpu-gloo" and cpu_fused_experts.fused_experts() is not None
    assert matrix["experts.fused_experts"]["float32"]["status"] == ("pass" if fused else "unsupported")
    assert matrix["experts.grouped_matmul"]["bfloat16"]["status"] == "unsupported"


def test_forced_fallbacks_give_identical_results():
    profile = load_profile("cpu-gloo").replace(
        **{"collectives.fallbacks": ["uneven_all_to_all", "reduce_scatter", "avg", "async"]}
    )
    matrix = _suite(profile, 3)
    assert not failed(matrix), format_matrix(matrix)
    for op in ("all_to_all.uneven", "reduce_scatter", "all_reduce.avg", "async"):
        assert matrix[op]["float32"]["status"] == "fallback", op


class _CorruptGather(Handle):
    def __init__(self, inner):
        self.inner = inner

    def wait(self, timeout=None):
        out = self.inner.wait(timeout)
        if out.numel():
            out.view(-1)[-1] += 1  # one wrong value
        return out

    def is_completed(self):
        return self.inner.is_completed()


def suite_with_broken_all_gather(rt):
    original = rt.comm._all_gather
    rt.comm._all_gather = lambda tensor, output: _CorruptGather(original(tensor, output))
    return run_suite(rt)


def test_wrong_answer_is_a_fail_naming_the_op():
    matrix = merge(run_ranks(suite_with_broken_all_gather, 2, "cpu-gloo", timeout_s=240))
    assert failed(matrix)
    cell = matrix["all_gather"]["float32"]
    assert cell["status"] == "FAIL" and "wrong values" in cell["detail"] and cell["detail"].startswith("rank ")
    assert "FAIL all_gather [float32]" in format_matrix(matrix)
    assert matrix["all_reduce.sum"]["float32"]["status"] == "pass"



