"""Any device type torch drives, through `torch.accelerator` and the device module.

Covers xpu, npu, mps, hpu, mtia, privateuseone and whatever a vendor's torch
extension registers, with no vendor import: the device module comes from
`torch.get_device_module(device_type)`. It also runs with device type "cpu",
which is how this code path is tested on machines without an accelerator.

A vendor plugin for a device torch already drives is a subclass that sets
`name`, `device_type` and `default_collectives` and nothing else.
"""

from __future__ import annotations

import types
from typing import Any

import torch

from moeport.backends.base import Backend, Capabilities
from moeport.base.dtypes import DEVICE_DTYPES

# Where each device family reads its list of visible devices (data, not branches).
VISIBLE_DEVICES_ENV = {
    "cuda": "CUDA_VISIBLE_DEVICES",
    "xpu": "ZE_AFFINITY_MASK",
    "npu": "ASCEND_RT_VISIBLE_DEVICES",
    "hpu": "HABANA_VISIBLE_MODULES",
    "mlu": "MLU_VISIBLE_DEVICES",
    "musa": "MUSA_VISIBLE_DEVICES",
}


def accelerator_type() -> str | None:
    """The device type of torch's current accelerator, or None when there is none."""
    acc = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
    return None if acc is None else acc.type


def default_collectives_for(device_type: str) -> str | None:
    """torch.distributed's default backend name for a device type, if it knows one."""
    import torch.distributed as dist

    return dist.Backend.default_device_backend_map.get(device_type)


class GenericBackend(Backend):
    """A device reached only through torch's device-generic APIs.

    `device_type` and `collectives` given to the constructor (from the profile)
    override the class attributes; with neither, the device is torch's current
    accelerator and the collective library is torch's default for it.
    """

    name = "generic"
    device_type = ""
    default_collectives = ""

    def __init__(self, device_type: str | None = None, collectives: str | None = None) -> None:
        super().__init__()
        resolved = device_type or type(self).device_type or accelerator_type() or ""
        self.device_type = resolved
        self.default_collectives = (
            collectives
            or type(self).default_collectives
            or (default_collectives_for(resolved) if resolved else None)
            or "gloo"
        )
        self.visible_devices_env = VISIBLE_DEVICES_ENV.get(resolved)

    # -- identity -----------------------------------------------------------
    def _module(self) -> types.ModuleType:
        return torch.get_device_module(self.device_type)

    def _is_current_accelerator(self) -> bool:
        return accelerator_type() == self.device_type

    def unavailable_reason(self) -> str | None:
        if not self.device_type:
            return "no accelerator: torch.accelerator.current_accelerator() is None and the profile names no device_type"
        try:
            module = self._module()
        except (RuntimeError, AttributeError, ValueError):
            return (
                f"no '{self.device_type}' device: torch has no device module for it "
                "(is the vendor's torch extension installed?)"
            )
        is_available = getattr(module, "is_available", None)
        if is_available is not None and not is_available():
            return f"no '{self.device_type}' device: torch.{self.device_type}.is_available() is False"
        return None

    def device_count(self) -> int:
        if self._is_current_accelerator():
            return torch.accelerator.device_count()
        count = getattr(self._module(), "device_count", None)
        return int(count()) if count is not None else 1

    def set_device(self, local_rank: int) -> torch.device:
        device = super().set_device(local_rank)
        if device.index is not None and self._is_current_accelerator():
            torch.accelerator.set_device_index(device.index)
        elif device.index is not None and hasattr(self._module(), "set_device"):
            self._module().set_device(device.index)
        return device

    def device(self, local_rank: int | None = None) -> torch.device:
        if self.device_type == "cpu":
            return torch.device("cpu")
        return super().device(local_rank)

    # -- execution ----------------------------------------------------------
    def synchronize(self) -> None:
        if self._is_current_accelerator():
            torch.accelerator.synchronize()
        elif hasattr(self._module(), "synchronize"):
            self._module().synchronize()

    def current_stream(self) -> Any:
        if self._is_current_accelerator():
            return torch.accelerator.current_stream()
        return self._module().current_stream()

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)
        seed_all = getattr(self._module(), "manual_seed_all", None)
        if seed_all is not None:
            seed_all(seed)

    # -- memory -------------------------------------------------------------
    def _memory_call(self, accelerator_fn: str, module_fn: str) -> Any:
        if self._is_current_accelerator():
            return getattr(torch.accelerator, accelerator_fn)(self.device())
        fn = getattr(self._module(), module_fn, None)
        return None if fn is None else fn(self.device())

    def memory_allocated(self) -> int | None:
        return self._memory_call("memory_allocated", "memory_allocated")

    def max_memory_allocated(self) -> int | None:
        return self._memory_call("max_memory_allocated", "max_memory_allocated")

    def reset_peak_memory(self) -> None:
        self._memory_call("reset_peak_memory_stats", "reset_peak_memory_stats")

    def memory_info(self) -> tuple[int, int] | None:
        info = self._memory_call("get_memory_info", "mem_get_info")
        return None if info is None else (int(info[0]), int(info[1]))

    # -- capabilities -------------------------------------------------------
    def _probe_capabilities(self) -> Capabilities:
        device = self.device()
        dtypes = []
        for name in DEVICE_DTYPES:
            dtype = getattr(torch, name, None)
            try:
                torch.zeros(2, dtype=dtype, device=device).to(torch.float32)
            except (RuntimeError, TypeError):
                continue
            dtypes.append(name)
        try:
            start = torch.Event(device=device, enable_timing=True)
            start.record()
            timing = True
        except RuntimeError:
            timing = False
        module = self._module()
        return Capabilities(
            dtypes=tuple(dtypes),
            streams=self.device_type != "cpu",
            timing_events=timing,
            graph_capture=hasattr(module, "graph") or hasattr(module, "CUDAGraph"),
            async_collectives=True,
            uneven_all_to_all=True,
            memory_stats=self.memory_allocated() is not None,
            memory_info=self.memory_info() is not None,
        )
