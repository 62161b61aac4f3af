"""The CPU backend: always available; collectives over gloo by default."""

from __future__ import annotations

import os

import torch

from moeport.backends.base import Backend, Capabilities
from moeport.base.dtypes import MODEL_DTYPES
from moeport.kernels import HOST_CPU


def _proc_status_kib(field: str) -> int | None:
    """A `VmRSS`-style field of /proc/self/status in KiB, or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class CPUBackend(Backend):
    """Plain CPU ranks: one in-order stream, host-clock timing, process memory figures, and the
    experts' kernels moeport ships for the CPU (a fused expert layer, MKL's grouped matmul).

    Memory figures are the process's resident set (what the OS charges to the
    rank), since the CPU allocator keeps no statistics of its own.
    """

    name = "cpu"
    device_type = "cpu"
    default_collectives = "gloo"
    expert_kernels = HOST_CPU

    def unavailable_reason(self) -> str | None:
        return None

    def device(self, local_rank: int | None = None) -> torch.device:
        return torch.device("cpu")

    def memory_allocated(self) -> int | None:
        kib = _proc_status_kib("VmRSS")
        return None if kib is None else kib * 1024

    def max_memory_allocated(self) -> int | None:
        kib = _proc_status_kib("VmHWM")
        return None if kib is None else kib * 1024

    def reset_peak_memory(self) -> None:
        # Writing 5 to clear_refs resets the kernel's peak-RSS mark (VmHWM).
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass

    def memory_info(self) -> tuple[int, int] | None:
        try:
            pages = os.sysconf("SC_PHYS_PAGES")
            free = os.sysconf("SC_AVPHYS_PAGES")
            size = os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
        return free * size, pages * size

    def _probe_capabilities(self) -> Capabilities:
        return Capabilities(
            dtypes=tuple(MODEL_DTYPES),
            streams=False,
            timing_events=False,
            graph_capture=False,
            async_collectives=True,
            uneven_all_to_all=True,
            memory_stats=_proc_status_kib("VmRSS") is not None,
            memory_info=self.memory_info() is not None,
        )
