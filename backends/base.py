"""The device interface: one Backend per process, chosen by the profile.

A Backend says which device a rank computes on and how to drive it (streams,
events, memory figures, seeding). What a device can do is data, in a frozen
`Capabilities`, never an `if device == ...` branch in the model.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import time
from typing import Any, ClassVar, Mapping

import torch

from moeport.base.dtypes import MODEL_DTYPES
from moeport.kernels.offered import OfferedKernels


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a backend's device (with its default collective library) can do.

    Filled by each backend when it is created; printed by `moeport info` and
    read by the runtime and the schedule instead of device-name checks.
    """

    dtypes: tuple[str, ...] = tuple(MODEL_DTYPES)
    streams: bool = False  # separate streams that run concurrently
    timing_events: bool = False  # device-side timing events (else host clocks)
    graph_capture: bool = False
    async_collectives: bool = True
    uneven_all_to_all: bool = True
    memory_stats: bool = False  # allocator statistics (allocated, peak)
    memory_info: bool = False  # free / total memory of the device

    def rows(self) -> list[tuple[str, str]]:
        """The capability table as (name, value) text pairs, in field order."""
        out = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, tuple):
                text = ", ".join(value)
            else:
                text = "yes" if value else "no"
            out.append((field.name, text))
        return out

    def as_dict(self) -> dict[str, Any]:
        """The capabilities as plain JSON-ready values."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


class HostEvent:
    """A timing event read from the host clock, for devices without timing events.

    Recording first waits for the device, so the time stamps what was queued
    before it; on a device that runs in order (the CPU) that wait is free.
    """

    def __init__(self, backend: "Backend") -> None:
        self._backend = backend
        self._t: float | None = None

    def record(self, stream: Any = None) -> None:
        """Stamp the current time once the device has done the work queued so far."""
        self._backend.synchronize()
        self._t = time.perf_counter()

    def wait(self, stream: Any = None) -> None:
        """Make later work wait for this event: already true on an in-order device."""

    def synchronize(self) -> None:
        """Block until the event has happened: it has once it is recorded."""

    def query(self) -> bool:
        """Whether the event has happened."""
        return self._t is not None

    def elapsed_time(self, end: "HostEvent") -> float:
        """Milliseconds from this event to `end`."""
        if self._t is None or end._t is None:
            raise RuntimeError("both events must be recorded before elapsed_time")
        return (end._t - self._t) * 1e3


class Backend(abc.ABC):
    """One kind of device, as a rank sees it.

    Subclasses set the identity class attributes and implement availability;
    the base class gives working defaults for everything else, built on torch's
    device-generic `torch.Stream` / `torch.Event`, so a backend overrides only
    what its device does differently.
    """

    name: ClassVar[str] = ""
    device_type: ClassVar[str] = ""
    default_collectives: ClassVar[str] = "gloo"
    visible_devices_env: ClassVar[str | None] = None
    #: Kernels the device offers the MoE experts beyond torch's operators: {kind:
    #: "package.module:factory"}, kinds and calling conventions as moeport.kernels describes.
    expert_kernels: ClassVar[Mapping[str, str]] = {}
    #: What the device's collective library lacks natively, by the names of moeport's fallbacks
    #: ("uneven_all_to_all", "reduce_scatter", "avg", "async"), each then served by its fallback.
    #: None: recognised from the process group the library gives (its class, else a probe).
    collective_gaps: ClassVar[frozenset[str] | None] = None

    def __init__(self) -> None:
        self._local_rank = 0
        self._capabilities: Capabilities | None = None
        self._offered_kernels: OfferedKernels | None = None

    # -- identity -----------------------------------------------------------
    def is_available(self) -> bool:
        """Whether this process can use the backend's device."""
        return self.unavailable_reason() is None

    @abc.abstractmethod
    def unavailable_reason(self) -> str | None:
        """None when usable, else one line saying which device is missing and why."""

    def device_count(self) -> int:
        """How many devices of this type the process sees."""
        return 1

    def device(self, local_rank: int | None = None) -> torch.device:
        """The torch.device a rank with this local rank computes on."""
        index = self._local_rank if local_rank is None else local_rank
        count = self.device_count()
        return torch.device(self.device_type, index % count if count else 0)

    def set_device(self, local_rank: int) -> torch.device:
        """Bind this process to the device for `local_rank` and return it."""
        self._local_rank = local_rank
        return self.device(local_rank)

    @property
    def collectives_label(self) -> str:
        """The collective library as users know it (e.g. rccl on ROCm)."""
        return self.default_collectives

    # -- execution ----------------------------------------------------------
    def synchronize(self) -> None:
        """Wait until all queued work on the device has finished."""

    def new_stream(self) -> Any:
        """A new stream on this rank's device."""
        return torch.Stream(device=self.device())

    def current_stream(self) -> Any:
        """The stream work is queued on now."""
        return torch.get_device_module(self.device_type).current_stream()

    def stream(self, stream: Any) -> contextlib.AbstractContextManager:
        """Context in which work is queued on `stream`."""
        return stream if stream is not None else contextlib.nullcontext()

    def new_event(self, timing: bool = False) -> Any:
        """An event to record on a stream; with `timing`, one that can measure time.

        Devices without timing events get a host-clock event with the same methods.
        """
        if timing and not self.capabilities.timing_events:
            return HostEvent(self)
        return torch.Event(device=self.device(), enable_timing=timing)

    def manual_seed(self, seed: int) -> None:
        """Seed every random generator that work on this device uses."""
        torch.manual_seed(seed)

    # -- memory -------------------------------------------------------------
    def memory_allocated(self) -> int | None:
        """Bytes currently allocated on the device, or None if the device cannot tell."""
        return None

    def max_memory_allocated(self) -> int | None:
        """Peak bytes allocated since the last reset, or None if the device cannot tell."""
        return None

    def reset_peak_memory(self) -> None:
        """Start a new peak-memory window."""

    def memory_info(self) -> tuple[int, int] | None:
        """(free, total) bytes of the device, or None if the device cannot tell."""
        return None

    # -- the experts' kernels ------------------------------------------------
    @property
    def offered_expert_kernels(self) -> OfferedKernels:
        """The kernels of `expert_kernels`, for this backend's device type: each imported when the
        model first asks for it and checked once per dtype before it is used."""
        if self._offered_kernels is None:
            owner = f"{type(self).__module__}:{type(self).__qualname__}"
            self._offered_kernels = OfferedKernels(self.expert_kernels, self.device_type, owner)
        return self._offered_kernels

    # -- capabilities -------------------------------------------------------
    @property
    def capabilities(self) -> Capabilities:
        """What this device can do; computed once."""
        if self._capabilities is None:
            self._capabilities = self._probe_capabilities()
        return self._capabilities

    @abc.abstractmethod
    def _probe_capabilities(self) -> Capabilities:
        """Fill the capability record for this device."""

    def describe(self) -> dict[str, Any]:
        """Identity and capabilities as JSON-ready values, for `moeport info`."""
        return {
            "backend": self.name,
            "class": f"{type(self).__module__}:{type(self).__qualname__}",
            "device_type": self.device_type,
            "device": str(self.device()),
            "device_count": self.device_count(),
            "visible_devices_env": self.visible_devices_env,
            "default_collectives": self.default_collectives,
            "collectives_label": self.collectives_label,
            "capabilities": self.capabilities.as_dict(),
        }

