"""The collective interface: one Communicator per process group.

Every operation takes `async_op`. Synchronous calls return their result;
asynchronous ones return a Handle whose `wait()` returns the same result, so a
schedule can issue an operation, compute, and collect the result later.
Results are written into a caller-given `output` tensor when one is passed
(buffers can be reused across calls), else into a new tensor.

A communicator owns every thread its operations need (a library's own progress
thread, the worker that runs an all_to_all whose counts travel first) and ends
them in `close()`; no thread belongs to the module.
"""

from __future__ import annotations

import abc
import concurrent.futures
import enum
import logging
from typing import Any, Callable, Iterable, Sequence

import torch

log = logging.getLogger("moeport.collectives")


class ReduceOp(enum.Enum):
    """Reductions every Communicator supports."""

    SUM = "sum"
    AVG = "avg"
    MAX = "max"
    MIN = "min"


class Handle(abc.ABC):
    """An operation in flight.

    `backward` is, for a differentiable exchange, its gradients' exchange (a BackwardExchange of
    collectives/differentiable.py, which tells when it ran); None otherwise.
    """

    backward: Any = None

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


class MappedHandle(Handle):
    """A Handle whose result is `finish(inner result)`, computed once when first waited for."""

    def __init__(self, inner: Handle, finish: Callable[[Any], Any]) -> None:
        self._inner = inner
        self._finish: Callable[[Any], Any] | None = finish
        self._result: Any = None
        self.backward = inner.backward

    def wait(self, timeout: float | None = None) -> Any:
        result = self._inner.wait(timeout)
        if self._finish is not None:
            self._result = self._finish(result)
            self._finish = None
        return self._result

    def is_completed(self) -> bool:
        return self._inner.is_completed()


class FutureHandle(Handle):
    """A Handle for work running on another thread (a concurrent.futures.Future)."""

    def __init__(self, future: concurrent.futures.Future, op: str) -> None:
        self._future = future
        self._op = op

    def wait(self, timeout: float | None = None) -> Any:
        # wait first, then take the result: a TimeoutError the work itself raised (a collective inside it
        # that timed out) passes through as it is; only this wait's own deadline is reported here
        done, _ = concurrent.futures.wait([self._future], timeout)
        if not done:
            raise TimeoutError(f"{self._op} did not complete within {timeout:g} s")
        return self._future.result()

    def is_completed(self) -> bool:
        return self._future.done()


#: Operations a library may lack, with the fallback that then serves them.
FALLBACKS: dict[str, str] = {
    "uneven_all_to_all": "padded equal splits: all_reduce(max) of the largest split, an equal all_to_all, then unpadding",
    "reduce_scatter": "all_reduce of a copy, then this rank's slice",
    "avg": "all_reduce(sum), then division by the group size",
    "async": "the synchronous call; the returned handle is already complete",
}


def equal_splits(total: int, parts: int) -> list[int]:
    """Equal splits of `total` rows over `parts` ranks; ValueError if they cannot be equal."""
    if total % parts:
        raise ValueError(f"{total} rows cannot be split equally over {parts} ranks; pass split sizes")
    return [total // parts] * parts


class Communicator(abc.ABC):
    """Collective operations among the ranks of one group.

    `rank` and `world_size` are within the group; `global_ranks` lists the
    members' ranks in the world group, in group-rank order. Implementations
    provide the `_op` primitives (each returns a Handle); the public methods here
    add output allocation, argument checks, the declared fallbacks and the
    sync/async choice, so every implementation behaves the same.
    """

    #: Operations (keys of FALLBACKS) this library lacks natively.
    lacks: frozenset[str] = frozenset()

    def __init__(
        self, rank: int, world_size: int, global_ranks: Sequence[int], timeout_s: float = 60.0,
        force_fallbacks: Iterable[str] = (),
    ) -> None:
        unknown = set(force_fallbacks) - set(FALLBACKS)
        if unknown:
            raise ValueError(f"unknown fallbacks {sorted(unknown)}; known: {sorted(FALLBACKS)}")
        self.rank = rank
        self.world_size = world_size
        self.global_ranks = list(global_ranks)
        self.timeout_s = timeout_s
        self.forced_fallbacks = frozenset(force_fallbacks)
        self.fallbacks = frozenset(self.lacks) | self.forced_fallbacks
        self._logged_fallbacks: set[str] = set()
        self._worker: concurrent.futures.ThreadPoolExecutor | None = None

    # -- what an implementation provides -------------------------------------
    @property
    @abc.abstractmethod
    def library(self) -> str:
        """The collective library's name as users know it (gloo, nccl, mpi, ...)."""

    @abc.abstractmethod
    def new_group(self, ranks: Sequence[int]) -> "Communicator | None":
        """A communicator over `ranks` (ranks of this group); every member of this group must call it.

        Returns None on ranks that are not members. The new group keeps this one's forced fallbacks.
        """

    @abc.abstractmethod
    def _all_reduce(self, tensor: torch.Tensor, op: ReduceOp) -> Handle: ...

    @abc.abstractmethod
    def _all_gather(self, tensor: torch.Tensor, output: torch.Tensor) -> Handle: ...

    @abc.abstractmethod
    def _reduce_scatter(self, tensor: torch.Tensor, output: torch.Tensor, op: ReduceOp) -> Handle: ...

    @abc.abstractmethod
    def _all_to_all(
        self, tensor: torch.Tensor, output: torch.Tensor, input_splits: list[int], output_splits: list[int]
    ) -> Handle: ...

    @abc.abstractmethod
    def _broadcast(self, tensor: torch.Tensor, src: int) -> Handle: ...

    @abc.abstractmethod
    def _barrier(self) -> Handle: ...

    @abc.abstractmethod
    def _send(self, tensor: torch.Tensor, dst: int) -> Handle: ...

    @abc.abstractmethod
    def _recv(self, tensor: torch.Tensor, src: int) -> Handle: ...

    def close(self) -> None:
        """Release what the communicator holds (ending its threads); the world communicator also ends the library.

        Implementations that hold more call this too.
        """
        worker, self._worker = self._worker, None
        if worker is not None:  # a job still inside a collective ends with that collective's timeout
            worker.shutdown(wait=False, cancel_futures=True)

    # -- the operations -------------------------------------------------------
    def all_reduce(self, tensor: torch.Tensor, op: ReduceOp = ReduceOp.SUM, async_op: bool = False) -> Any:
        """Reduce `tensor` across ranks, in place; returns the tensor."""
        return self._complete(self._all_reduce_handle(tensor, op), async_op)

    def all_gather(self, tensor: torch.Tensor, output: torch.Tensor | None = None, async_op: bool = False) -> Any:
        """Concatenate every rank's `tensor` along dim 0 (rank order); returns [world * n, ...]."""
        tensor = tensor.contiguous()
        out = output if output is not None else tensor.new_empty((self.world_size * tensor.shape[0], *tensor.shape[1:]))
        self._check_rows("all_gather output", out, self.world_size * tensor.shape[0])
        return self._complete(self._all_gather(tensor, out), async_op)

    def reduce_scatter(
        self, tensor: torch.Tensor, output: torch.Tensor | None = None, op: ReduceOp = ReduceOp.SUM, async_op: bool = False
    ) -> Any:
        """Reduce [world * n, ...] across ranks and give each rank its n rows (rank order)."""
        tensor = tensor.contiguous()
        rows = equal_splits(tensor.shape[0], self.world_size)[0]
        out = output if output is not None else tensor.new_empty((rows, *tensor.shape[1:]))
        self._check_rows("reduce_scatter output", out, rows)
        if "reduce_scatter" in self.fallbacks or (op is ReduceOp.AVG and "avg" in self.fallbacks):
            self._note_fallback("reduce_scatter")
            reduced = tensor.clone()
            start = self.rank * rows
            handle: Handle = MappedHandle(
                self._all_reduce_handle(reduced, op), lambda full: out.copy_(full[start:start + rows])
            )
        else:
            handle = self._reduce_scatter(tensor, out, op)
        return self._complete(handle, async_op)

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
        tensor = tensor.contiguous()
        ins = list(input_splits) if input_splits is not None else equal_splits(tensor.shape[0], self.world_size)
        if output_splits is not None:
            outs = list(output_splits)
        elif output is not None:
            outs = equal_splits(output.shape[0], self.world_size)
        else:
            outs = list(ins) if input_splits is None else None  # type: ignore[assignment]
            if outs is None:
                raise ValueError("all_to_all with input_splits needs output_splits (or an output tensor of equal splits)")
        for name, splits in (("input_splits", ins), ("output_splits", outs)):
            if len(splits) != self.world_size or any(s < 0 for s in splits):
                raise ValueError(f"all_to_all {name} must be {self.world_size} non-negative sizes, got {splits}")
        self._check_rows("all_to_all input", tensor, sum(ins))
        out = output if output is not None else tensor.new_empty((sum(outs), *tensor.shape[1:]))
        self._check_rows("all_to_all output", out, sum(outs))
        # Every rank must take the same path: with the fallback active, any call given split
        # sizes is padded, even on a rank whose own splits happen to be equal.
        if "uneven_all_to_all" in self.fallbacks and (input_splits is not None or output_splits is not None):
            handle = self._padded_all_to_all(tensor, out, ins, outs)
        else:
            handle = self._all_to_all(tensor, out, ins, outs)
        return self._complete(handle, async_op)

    def all_to_all_with_counts(
        self,
        tensor: torch.Tensor,
        input_splits: Sequence[int],
        output: torch.Tensor | Callable[[int], torch.Tensor] | None = None,
        async_op: bool = False,
    ) -> Any:
        """all_to_all for senders that alone know the split sizes: each rank's row counts travel
        first (a small int64 all_to_all), then the rows (`input_splits[i]` to rank i).

        `output` is a tensor with the rows that will arrive, or a function that takes the
        number of rows arriving and returns one (a view of a kept buffer, say); None
        allocates. Returns (rows received in rank order, output_splits). With
        `async_op=True` a Handle of the same: both exchanges run, in issue order, on this
        communicator's own worker thread, so neither holds up the caller; issue no other
        collective on this communicator until it has been waited for.
        """
        tensor = tensor.contiguous()
        ins = list(input_splits)
        if len(ins) != self.world_size or any(s < 0 for s in ins):
            raise ValueError(f"all_to_all input_splits must be {self.world_size} non-negative sizes, got {ins}")
        self._check_rows("all_to_all input", tensor, sum(ins))
        if not async_op:
            return self._with_counts(tensor, ins, output)
        if self.world_size == 1 or "async" in self.fallbacks:
            if self.world_size > 1:
                self._note_fallback("async")
            return CompletedHandle(self._with_counts(tensor, ins, output))
        if self._worker is None:
            self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"moeport-{self.library}")
        return FutureHandle(self._worker.submit(self._with_counts, tensor, ins, output), "all_to_all_with_counts")

    def _with_counts(self, tensor: torch.Tensor, ins: list[int], output: Any) -> tuple[torch.Tensor, list[int]]:
        counts = torch.tensor(ins, dtype=torch.int64, device=tensor.device)
        outs = self.all_to_all(counts).tolist()
        rows = sum(outs)
        if callable(output):
            output = output(rows)
        elif output is None:
            output = tensor.new_empty((rows, *tensor.shape[1:]))
        return self.all_to_all(tensor, output, ins, outs), outs

    def broadcast(self, tensor: torch.Tensor, src: int = 0, async_op: bool = False) -> Any:
        """Copy `tensor` from group rank `src` to every rank, in place; returns the tensor."""
        return self._complete(self._broadcast(tensor, src), async_op)

    def barrier(self, async_op: bool = False) -> Any:
        """Wait until every rank of the group has reached this point."""
        return self._complete(self._barrier(), async_op)

    def send(self, tensor: torch.Tensor, dst: int, async_op: bool = False) -> Any:
        """Send `tensor` to group rank `dst`."""
        return self._complete(self._send(tensor.contiguous(), dst), async_op)

    def recv(self, tensor: torch.Tensor, src: int, async_op: bool = False) -> Any:
        """Receive into `tensor` from group rank `src`; returns the tensor."""
        return self._complete(self._recv(tensor, src), async_op)

    # -- shared machinery ---------------------------------------------------
    def _complete(self, handle: Handle, async_op: bool) -> Any:
        if not async_op:
            return handle.wait(self.timeout_s)
        if "async" in self.fallbacks:
            self._note_fallback("async")
            return CompletedHandle(handle.wait(self.timeout_s))
        return handle

    def _all_reduce_handle(self, tensor: torch.Tensor, op: ReduceOp) -> Handle:
        if op is ReduceOp.AVG and "avg" in self.fallbacks:
            self._note_fallback("avg")
            size = self.world_size
            return MappedHandle(
                self._all_reduce(tensor, ReduceOp.SUM),
                lambda t: t.div_(size) if t.is_floating_point() else t.floor_divide_(size),
            )
        return self._all_reduce(tensor, op)

    def _padded_all_to_all(self, tensor: torch.Tensor, out: torch.Tensor, ins: list[int], outs: list[int]) -> Handle:
        self._note_fallback("uneven_all_to_all")
        largest = torch.tensor([max(ins + outs)], dtype=torch.int64, device=tensor.device)
        self._all_reduce(largest, ReduceOp.MAX).wait(self.timeout_s)
        pad = int(largest.item())
        row_shape = tuple(tensor.shape[1:])
        send = tensor.new_zeros((self.world_size * pad, *row_shape))
        offset = 0
        for peer, rows in enumerate(ins):
            send[peer * pad: peer * pad + rows] = tensor[offset: offset + rows]
            offset += rows
        recv = tensor.new_empty((self.world_size * pad, *row_shape))
        pads = [pad] * self.world_size

        def unpad(received: torch.Tensor) -> torch.Tensor:
            start = 0
            for peer, rows in enumerate(outs):
                out[start: start + rows] = received[peer * pad: peer * pad + rows]
                start += rows
            return out

        return MappedHandle(self._all_to_all(send, recv, pads, pads), unpad)

    @staticmethod
    def _check_rows(what: str, tensor: torch.Tensor, rows: int) -> None:
        if tensor.shape[0] != rows:
            raise ValueError(f"{what} has {tensor.shape[0]} rows, expected {rows}")

    def _note_fallback(self, op: str) -> None:
        """Log, once per operation and communicator, that a fallback serves it."""
        if op not in self._logged_fallbacks:
            self._logged_fallbacks.add(op)
            log.info("%s (%s): no native %s; using %s", type(self).__name__, self.library, op, FALLBACKS[op])
