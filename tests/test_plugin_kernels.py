"""A plugin offers the experts its device's own kernel on its Backend class alone (tests/plugin_testchip).

The model uses a kernel that answers right; one that answers wrong is refused with a
warning, the model runs on without it, and conformance shows it as a FAIL.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from moeport.conformance import failed, format_matrix, merge, run_suite
from moeport.profile import load_profile
from moeport.testing import run_ranks

pytestmark = pytest.mark.timeout(300)


def forward_on_plugin(rt):
    """A forward pass of the profile's model on this rank, with the plugin's kernel calls and the warnings."""
    from plugin_testchip import kernels

    from moeport.jobs import build_model

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = build_model(rt)
        ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(rt.rank))
        kernels.reset()
        with torch.no_grad():
            logits = model(ids)
    return {"backend": rt.backend.name, "calls": kernels.calls(), "logits": logits,
            "warnings": [str(w.message) for w in caught], "layers": model.config.num_layers}


def _on(backend: str) -> list[dict]:
    profile = load_profile("cpu-gloo")
    if backend:
        profile = profile.replace(backend=backend)
    return run_ranks(forward_on_plugin, 2, profile, timeout_s=240)


@pytest.fixture(scope="module")
def on_cpu():
    """The same job on the CPU backend, with moeport's own kernels."""
    return _on("")


def test_the_model_runs_its_experts_on_the_kernel_a_plugin_offers(on_cpu):
    for ours, cpu in zip(_on("plugin_testchip:TestChipBackend"), on_cpu):
        assert ours["backend"] == "testchip"
        assert ours["calls"]["fused_experts"] == 1 + ours["layers"]  # checked on first use, then once per layer
        assert not [w for w in ours["warnings"] if "failed its check" in w]
        torch.testing.assert_close(ours["logits"], cpu["logits"], rtol=1e-5, atol=1e-5)


def test_a_plugin_kernel_that_answers_wrong_is_refused_with_a_warning_and_fails_conformance(on_cpu):
    profile = load_profile("cpu-gloo").replace(backend="plugin_testchip:WrongChipBackend")
    for ours, cpu in zip(_on("plugin_testchip:WrongChipBackend"), on_cpu):
        assert ours["calls"]["wrong_fused_experts"] == 1  # checked on first use, never used after
        refusals = [w for w in ours["warnings"] if "failed its check" in w]
        assert len(refusals) == 1 and "plugin_testchip.kernels:wrong_fused_experts" in refusals[0]
        torch.testing.assert_close(ours["logits"], cpu["logits"], rtol=1e-5, atol=1e-5)  # torch's operators instead
    matrix = merge(run_ranks(run_suite, 2, profile, timeout_s=240))
    assert failed(matrix)
    cell = matrix["experts.fused_experts"]["float32"]
    assert cell["status"] == "FAIL" and "answered wrong" in cell["detail"], format_matrix(matrix)
    assert matrix["experts.fused_experts"]["float16"]["status"] == "FAIL"  # a kernel that takes any dtype: each checked
    assert matrix["experts.grouped_matmul"]["float32"]["status"] == "unsupported"  # none offered
