"""The collective interface: one Communicator per process group.

Every operation takes `async_op`. Synchronous calls return their result;
asynchronous ones return a Handle whose `wait()` returns the same result, so a
schedule can issue an operation, compute, and collect the result later.
Results are written into a caller-given `output` tensor when one is passed
(buffers can be reused across calls), else into a new tensor.
"""

from __future__ import annotations

import abc
import enum
import logging
from typing import Any, Sequence

import torch

log = logging.getLogger("moeport.collectives")


class ReduceOp(enum.Enum):
    """Reductions every Communicator supports."""

    SUM = "sum"
    AVG = "avg"
    MAX = "max"
    MIN = "min"


class Handle(abc.ABC):
    """An operation in flight."""

    @abc.abstractmethod
    def wait(self, timeout: float | None = None) -> Any:
        """Block until the operation is done (or `timeout` seconds pass: TimeoutError); return its result."""

    @abc.abstractmethod
    def is_completed(self) -> bool:
        """Whether the operation has finished, without blocking."""


class CompletedHandle(Handle):
    """A Handle for an operation that already finished (synchronous work behind an async call)."""

    def __init__(self, result: Any = None) -> None:
        self._result = result

    def wait(self, timeout: float | None = None) -> Any:
        return self._result

    def is_completed(self) -> bool:
        return True


def split_sizes(total: int, parts: int) -> list[int]:
    """Equal splits of `total` rows over `parts` ranks; a UserError-free ValueError if uneven."""
    if total % parts:
        raise ValueError(f"{total} rows cannot be split equally over {parts} ranks; pass split sizes")
    return [total // parts] * parts


class Communicator(abc.ABC):
    """Collective operations among the ranks of one group.

    `rank` and `world_size` are within the group; `global_ranks` lists the
    members' ranks in the world group, in group-rank order.
    """

    #: Operations this library lacks natively, each served by a documented fallback.
    fallbacks: frozenset[str] = frozenset()
    timeout_s: float = 60.0

    def __init__(self, rank: int, world_size: int, global_ranks: Sequence[int]) -> None:
        self.rank = rank
        self.world_size = world_size
        self.global_ranks = list(global_ranks)
        self._logged_fallbacks: set[str] = set()

    def _note_fallback(self, op: str, how: str) -> None:
        """Log, once per operation, that a fallback serves it."""
        if op not in self._logged_fallbacks:
            self._logged_fallbacks.add(op)
            log.info("%s: %s lacks a native %s; using %s", type(self).__name__, self.library, op, how)

    @property
    @abc.abstractmethod
    def library(self) -> str:
        """The collective library's name as users know it (gloo, nccl, mpi, ...)."""

    @abc.abstractmethod
    def new_group(self, ranks: Sequence[int]) -> "Communicator | None":
        """A communicator over `ranks` (ranks of this group); every member of this group must call it.

        Returns None on ranks that are not members.
        """

    @abc.abstractmethod
    def all_reduce(self, tensor: torch.Tensor, op: ReduceOp = ReduceOp.SUM, async_op: bool = False) -> Any:
        """Reduce `tensor` across ranks, in place; returns the tensor."""

    @abc.abstractmethod
    def all_gather(self, tensor: torch.Tensor, output: torch.Tensor | None = None, async_op: bool = False) -> Any:
        """Concatenate every rank's `tensor` along dim 0 (rank order); returns [world * n, ...]."""

    @abc.abstractmethod
    def reduce_scatter(
        self, tensor: torch.Tensor, output: torch.Tensor | None = None, op: ReduceOp = ReduceOp.SUM, async_op: bool = False
    ) -> Any:
        """Reduce [world * n, ...] across ranks and give each rank its n rows."""

    @abc.abstractmethod
    def all_to_all(
        self,
        tensor: torch.Tensor,
        output: torch.Tensor | None = None,
        input_splits: Sequence[int] | None = None,
        output_splits: Sequence[int] | None = None,
        async_op: bool = False,
    ) -> Any:
        """Send rows of `tensor` (dim 0, `input_splits[i]` to rank i) and receive `output_splits[i]` from rank i.

        Without split sizes the rows are split equally. Zero-size splits and empty tensors are allowed.
        """

    @abc.abstractmethod
    def broadcast(self, tensor: torch.Tensor, src: int = 0, async_op: bool = False) -> Any:
        """Copy `tensor` from group rank `src` to every rank, in place."""

    @abc.abstractmethod
    def barrier(self, async_op: bool = False) -> Any:
        """Wait until every rank of the group has reached this point."""

    @abc.abstractmethod
    def send(self, tensor: torch.Tensor, dst: int, async_op: bool = False) -> Any:
        """Send `tensor` to group rank `dst`."""

    @abc.abstractmethod
    def recv(self, tensor: torch.Tensor, src: int, async_op: bool = False) -> Any:
        """Receive into `tensor` from group rank `src`; returns the tensor."""

    def close(self) -> None:
        """Release what the communicator holds; the world communicator also ends the library."""

    # -- helpers for implementations ----------------------------------------
    def _gather_output(self, tensor: torch.Tensor, output: torch.Tensor | None) -> torch.Tensor:
        if output is None:
            return tensor.new_empty((self.world_size * tensor.shape[0], *tensor.shape[1:]))
        return output

    def _scatter_output(self, tensor: torch.Tensor, output: torch.Tensor | None) -> torch.Tensor:
        if output is None:
            rows = split_sizes(tensor.shape[0], self.world_size)[0]
            return tensor.new_empty((rows, *tensor.shape[1:]))
        return output

    def _a2a_output(
        self, tensor: torch.Tensor, output: torch.Tensor | None, output_splits: Sequence[int] | None
    ) -> torch.Tensor:
        if output is not None:
            return output
        rows = sum(output_splits) if output_splits is not None else tensor.shape[0]
        return tensor.new_empty((rows, *tensor.shape[1:]))
