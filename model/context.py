"""What the model needs from the machine it runs on: a small typed context.

The model never imports a backend or the front door. A moeport Runtime provides a
`ModelContext` (`runtime.model_context()`), and `LongcatForCausalLM` /
`load_pretrained` take either: a Runtime, a ModelContext, or nothing (one process
on the CPU holding every expert, with the kernels moeport ships for the CPU).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Protocol, runtime_checkable

import torch

from moeport.collectives.base import Communicator
from moeport.collectives.local import LocalCommunicator
from moeport.kernels import HOST_CPU
from moeport.kernels.offered import OfferedKernels


class ExpertKernels(Protocol):
    """The device's own kernels for the experts (see moeport.kernels), as a Backend offers them."""

    def kernel(self, kind: str, device: torch.device, dtype: torch.dtype) -> Callable[..., Any] | None:
        """The checked kernel of `kind` for tensors of this device and dtype, or None where there is none."""


@dataclasses.dataclass(frozen=True)
class ModelContext:
    """The machine as the model sees it.

    ep: the expert-parallel group (the FFN experts are split over its ranks);
    schedule: the driver of each layer's steps ("overlap" or "sequential");
    device, dtype: where and in what the weights live;
    expert_kernels: the device's own kernels for the experts (None: torch's operators only);
    dispatch, max_tokens_per_rank: how the MoE's tokens travel over `ep` (model/exchange.py).
    """

    ep: Communicator
    schedule: str = "overlap"
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    expert_kernels: ExpertKernels | None = None
    dispatch: str = "auto"
    max_tokens_per_rank: int = 128

    @classmethod
    def one_process(cls, dtype: torch.dtype = torch.float32) -> "ModelContext":
        """One process on the host CPU, every expert local, with the kernels moeport ships for the CPU."""
        return cls(LocalCommunicator(), "overlap", torch.device("cpu"), dtype, _host_cpu_kernels())


@runtime_checkable
class ProvidesModelContext(Protocol):
    """Anything that can give the model its context: a moeport Runtime does."""

    def model_context(self) -> ModelContext:
        """The context for a model built on this rank."""


def context_of(source: ModelContext | ProvidesModelContext | None) -> ModelContext:
    """The ModelContext of a Runtime, a ModelContext itself, or one process's when `source` is None."""
    if source is None:
        return ModelContext.one_process()
    if isinstance(source, ModelContext):
        return source
    if isinstance(source, ProvidesModelContext):
        return source.model_context()
    raise TypeError(f"expected a Runtime, a ModelContext or None, got {type(source).__name__}")


@functools.cache
def _host_cpu_kernels() -> OfferedKernels:
    """The CPU's kernels, checked once per process for every model built without a Runtime."""
    return OfferedKernels(HOST_CPU, "cpu", "moeport.kernels:HOST_CPU")
