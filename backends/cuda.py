"""NVIDIA CUDA (and AMD ROCm builds of torch) with NCCL / RCCL collectives."""

from __future__ import annotations

from typing import Any

import torch

from moeport.backends.base import Backend, Capabilities
from moeport.base.dtypes import DEVICE_DTYPES, MODEL_DTYPES


def _is_rocm_build() -> bool:
    return getattr(torch.version, "hip", None) is not None


class CUDABackend(Backend):
    """CUDA devices: real streams, timing events, allocator statistics.

    On a ROCm build of torch the same class drives AMD GPUs; torch.distributed
    still calls the library "nccl" there, and this backend reports it as rccl.
    """

    name = "cuda"
    device_type = "cuda"
    default_collectives = "nccl"
    visible_devices_env = "CUDA_VISIBLE_DEVICES"

    def unavailable_reason(self) -> str | None:
        if not torch.cuda.is_available():
            if torch.version.cuda is None and not _is_rocm_build():
                return f"no CUDA device: this torch ({torch.__version__}) was built without CUDA"
            return "no CUDA device: torch.cuda.is_available() is False"
        return None

    @property
    def collectives_label(self) -> str:
        return "rccl" if _is_rocm_build() else "nccl"

    def device_count(self) -> int:
        return torch.cuda.device_count()

    def set_device(self, local_rank: int) -> torch.device:
        device = super().set_device(local_rank)
        torch.cuda.set_device(device)
        return device

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device())

    def current_stream(self) -> Any:
        return torch.cuda.current_stream(self.device())

    def new_stream(self) -> Any:
        return torch.cuda.Stream(device=self.device())

    def stream(self, stream: Any):
        return torch.cuda.stream(stream)

    def new_event(self, timing: bool = False) -> Any:
        return torch.cuda.Event(enable_timing=timing)

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)
        torch.cuda.manual_seed_all(seed)

    def memory_allocated(self) -> int | None:
        return torch.cuda.memory_allocated(self.device())

    def max_memory_allocated(self) -> int | None:
        return torch.cuda.max_memory_allocated(self.device())

    def reset_peak_memory(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device())

    def memory_info(self) -> tuple[int, int] | None:
        free, total = torch.cuda.mem_get_info(self.device())
        return int(free), int(total)

    def _probe_capabilities(self) -> Capabilities:
        dtypes = list(MODEL_DTYPES)
        major, _ = torch.cuda.get_device_capability(self.device())
        if major >= 9:  # Hopper and later have 8-bit floats
            dtypes += [name for name in DEVICE_DTYPES if name not in MODEL_DTYPES and hasattr(torch, name)]
        return Capabilities(
            dtypes=tuple(dtypes),
            streams=True,
            timing_events=True,
            graph_capture=True,
            async_collectives=True,
            uneven_all_to_all=True,
            memory_stats=True,
            memory_info=True,
        )


class ROCmBackend(CUDABackend):
    """AMD GPUs through a ROCm build of torch; absent on CUDA builds."""

    name = "rocm"
    visible_devices_env = "HIP_VISIBLE_DEVICES"

    def unavailable_reason(self) -> str | None:
        if not _is_rocm_build():
            return f"no ROCm device: this torch ({torch.__version__}) is not a ROCm build"
        return super().unavailable_reason()
