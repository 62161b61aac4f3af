"""The Backend surface on this machine: cpu, generic over cpu, and cuda reporting absent cleanly."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from moeport.backends.base import Capabilities, HostEvent
from moeport.backends.cpu import CPUBackend
from moeport.backends.cuda import CUDABackend, ROCmBackend
from moeport.backends.generic import GenericBackend


@pytest.fixture(params=["cpu", "generic-cpu"])
def backend(request):
    return CPUBackend() if request.param == "cpu" else GenericBackend(device_type="cpu")


def test_identity(backend):
    assert backend.is_available()
    assert backend.device_type == "cpu"
    assert backend.device(0) == torch.device("cpu")
    assert backend.set_device(0) == torch.device("cpu")
    assert backend.device_count() >= 1
    assert backend.default_collectives == "gloo"


def test_capabilities_are_frozen_data(backend):
    caps = backend.capabilities
    assert isinstance(caps, Capabilities)
    assert {"float32", "bfloat16", "float16"} <= set(caps.dtypes)
    assert caps.timing_events is False and caps.streams is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        caps.streams = True  # type: ignore[misc]
    names = [name for name, _ in caps.rows()]
    assert names[:3] == ["dtypes", "streams", "timing_events"]


def test_streams_run_work_in_order(backend):
    stream = backend.new_stream()
    with backend.stream(stream):
        x = torch.ones(4) * 2
    backend.synchronize()
    assert x.sum().item() == 8
    assert backend.current_stream() is not None


def test_timing_events_fall_back_to_host_clock(backend):
    start, end = backend.new_event(timing=True), backend.new_event(timing=True)
    assert isinstance(start, HostEvent)
    start.record()
    time.sleep(0.02)
    end.record()
    end.synchronize()
    assert end.query()
    assert 15 <= start.elapsed_time(end) < 1000


def test_seed_is_reproducible(backend):
    backend.manual_seed(7)
    a = torch.randn(5)
    backend.manual_seed(7)
    assert torch.equal(a, torch.randn(5))


def test_cpu_memory_figures():
    backend = CPUBackend()
    backend.reset_peak_memory()
    before = backend.memory_allocated()
    block = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB, touched
    assert backend.max_memory_allocated() >= before + 32 * 1024 * 1024
    free, total = backend.memory_info()
    assert 0 < free <= total
    del block


def test_generic_memory_on_cpu_is_unknown_not_wrong():
    backend = GenericBackend(device_type="cpu")
    assert backend.memory_allocated() is None
    assert backend.capabilities.memory_stats is False


def test_cuda_reports_absent_cleanly():
    backend = CUDABackend()
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert not backend.is_available()
    assert "CUDA" in backend.unavailable_reason()
    assert backend.visible_devices_env == "CUDA_VISIBLE_DEVICES"
    assert backend.collectives_label == ("rccl" if torch.version.hip else "nccl")
    assert "ROCm" in ROCmBackend().unavailable_reason()


def test_generic_names_absent_device():
    assert "'xpu'" in GenericBackend(device_type="xpu").unavailable_reason()
    assert "'npu'" in GenericBackend(device_type="npu").unavailable_reason()
    assert GenericBackend(device_type="xpu").default_collectives == "xccl"
    assert GenericBackend(device_type="xpu").visible_devices_env == "ZE_AFFINITY_MASK"
