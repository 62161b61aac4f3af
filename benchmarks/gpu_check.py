"""Check the cuda-nccl profile on a machine with an NVIDIA GPU, one line per check.

    python benchmarks/gpu_check.py

Runs at world size 1: the CUDA backend's streams, timing events and memory
statistics, an NCCL all_reduce through the Runtime, and the generic backend
driving the same GPU through torch.accelerator. Exits 1 if any check fails, 2
with one line where there is no CUDA device. Not part of CI, which has no GPU.
"""

from __future__ import annotations

import sys
import traceback

import torch

from moeport.backends.generic import GenericBackend
from moeport.backends.registry import select
from moeport.profile import load_profile
from moeport.runtime import Runtime

CHECKS = []


def check(fn):
    CHECKS.append(fn)
    return fn


@check
def backend_identity():
    backend = select("cuda").backend
    device = backend.set_device(0)
    return f"{backend.name} on {device} ({torch.cuda.get_device_name(device)}), {backend.device_count()} visible, collectives {backend.collectives_label}"


@check
def streams_overlap_and_order():
    backend = select("cuda").backend
    side = backend.new_stream()
    a = torch.randn(2048, 2048, device=backend.device())
    backend.current_stream().synchronize()
    with backend.stream(side):
        b = a @ a
    done = backend.new_event()
    done.record(side)
    done.wait(backend.current_stream())
    c = b.sum()
    backend.synchronize()
    assert torch.allclose(c, (a @ a).sum(), rtol=1e-3)
    return "side stream result visible after event wait"


@check
def timing_events():
    backend = select("cuda").backend
    start, end = backend.new_event(timing=True), backend.new_event(timing=True)
    x = torch.randn(4096, 4096, device=backend.device())
    start.record()
    for _ in range(10):
        x = x @ x.T / 4096
    end.record()
    end.synchronize()
    ms = start.elapsed_time(end)
    assert ms > 0
    return f"10 matmuls 4096^2: {ms:.3f} ms"


@check
def memory_stats():
    backend = select("cuda").backend
    backend.reset_peak_memory()
    before = backend.memory_allocated()
    block = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device=backend.device())
    peak = backend.max_memory_allocated()
    free, total = backend.memory_info()
    assert peak >= before + block.numel()
    return f"allocated +{(peak - before) >> 20} MiB peak, {free >> 30}/{total >> 30} GiB free/total"


@check
def nccl_all_reduce():
    with Runtime.start(load_profile("cuda-nccl", world_size=1)) as rt:
        t = torch.arange(8.0, device=rt.device)
        rt.comm.all_reduce(t)
        handle = rt.comm.all_reduce(t, async_op=True)
        handle.wait()
        assert t.device.type == "cuda" and t.tolist() == list(map(float, range(8)))
        return f"{rt.comm.library} all_reduce sync + async on {rt.device}"


@check
def generic_backend_on_cuda():
    backend = GenericBackend(device_type="cuda")
    assert backend.unavailable_reason() is None, backend.unavailable_reason()
    backend.set_device(0)
    caps = backend.capabilities
    start, end = backend.new_event(timing=True), backend.new_event(timing=True)
    start.record()
    torch.randn(1024, 1024, device=backend.device()).sum()
    end.record()
    backend.synchronize()
    return f"generic/cuda: timing events {caps.timing_events}, streams {caps.streams}, dtypes {','.join(caps.dtypes)}, {start.elapsed_time(end):.3f} ms"


def main() -> int:
    from moeport.backends.cuda import CUDABackend

    absent = CUDABackend().unavailable_reason()
    if absent is not None:  # nothing to check here: one line, as for any wrong input
        print(f"gpu_check: error: {absent}", file=sys.stderr)
        return 2
    failed = 0
    for fn in CHECKS:
        try:
            print(f"ok    {fn.__name__}: {fn()}", flush=True)
        except Exception as exc:  # report every check, then fail
            failed += 1
            print(f"FAIL  {fn.__name__}: {type(exc).__name__}: {exc}", flush=True)
            traceback.print_exc(limit=2, file=sys.stderr)
    print(f"{len(CHECKS) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
