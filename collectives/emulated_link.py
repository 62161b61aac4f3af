"""An emulated interconnect: any Communicator, with each operation held back to a modelled link time.

An operation issued at time t completes no sooner than
t + latency + bytes / bandwidth, where bytes is what this rank puts on (or takes
off) its link for that operation. The wait is a deadline slept out, not a busy
loop, so the CPU stays free for the compute the schedule overlaps with it. This
lets overlap be studied, and tested, on a machine whose real transport (shared
memory, loopback) is far faster than the interconnects LongCat is served on.

Only the caller waits out a modelled time, at its Handle: an all_to_all whose row
counts travel first runs both exchanges at the inner library's pace, and is modelled
as the counts, then the rows, added once to the operation as a whole; no thread sits
out the counts' delay beside the compute.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Sequence

import torch

from moeport.collectives.base import Communicator, CompletedHandle, Handle, ReduceOp


class DeadlineHandle(Handle):
    """An operation that is complete once the inner one is and its modelled link time has passed.

    `deadline` is a time (time.perf_counter()), or a function of the inner operation's result
    giving it, for an operation whose bytes are known only once it has run (an all_to_all whose
    counts travel first).
    """

    def __init__(self, inner: Handle, deadline: float | Callable[[Any], float], op: str) -> None:
        self._inner = inner
        self._deadline_of = deadline if callable(deadline) else None
        self.deadline = None if callable(deadline) else deadline
        self._op = op

    def _deadline(self, result: Any) -> float:
        if self.deadline is None:
            self.deadline = self._deadline_of(result)
        return self.deadline

    def wait(self, timeout: float | None = None) -> Any:
        started = time.perf_counter()
        result = self._inner.wait(timeout)
        remaining = self._deadline(result) - time.perf_counter()
        if remaining > 0:
            if timeout is not None and (time.perf_counter() - started) + remaining > timeout:
                raise TimeoutError(f"{self._op} did not complete within {timeout:g} s on the emulated link")
            time.sleep(remaining)
        return result

    def is_completed(self) -> bool:
        if not self._inner.is_completed():
            return False
        return time.perf_counter() >= (self.deadline if self.deadline is not None else self._deadline(self._inner.wait()))


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class EmulatedLink(Communicator):
    """Wraps `inner` so that every operation takes at least `latency_us + bytes / bandwidth`.

    `bandwidth_gbps` is in gigabytes per second (1e9 bytes/s) per rank and
    direction. Bytes per operation follow the usual algorithms: ring all_reduce
    2(w-1)/w of the tensor, all_gather (w-1) inputs, reduce_scatter (w-1)/w of the
    input, all_to_all the larger of the rows sent to and received from other
    ranks, broadcast / send / recv the tensor, barrier nothing (latency only).
    A group of one rank has no link: its operations are not delayed.
    """

    def __init__(self, inner: Communicator, latency_us: float, bandwidth_gbps: float) -> None:
        super().__init__(inner.rank, inner.world_size, inner.global_ranks, inner.timeout_s)
        self.inner = inner
        self.latency_s = latency_us * 1e-6
        self.bytes_per_s = bandwidth_gbps * 1e9
        self.modelled_seconds = 0.0  # link time of every operation issued so far

    @property
    def library(self) -> str:
        return f"{self.inner.library}+emulated-link"

    def link_seconds(self, nbytes: float) -> float:
        """Modelled time on the link for an operation moving `nbytes` through this rank."""
        return self.latency_s + nbytes / self.bytes_per_s

    def _delayed(self, op: str, handle: Handle, nbytes: float, issued: float) -> Handle:
        if self.world_size == 1:
            return handle
        seconds = self.link_seconds(nbytes)
        self.modelled_seconds += seconds
        return DeadlineHandle(handle, issued + seconds, op)

    def new_group(self, ranks: Sequence[int]) -> Communicator | None:
        group = self.inner.new_group(ranks)
        return None if group is None else EmulatedLink(group, self.latency_s * 1e6, self.bytes_per_s / 1e9)

    def _all_reduce(self, tensor: torch.Tensor, op: ReduceOp) -> Handle:
        t, w = time.perf_counter(), self.world_size
        handle = self.inner.all_reduce(tensor, op, async_op=True)
        return self._delayed("all_reduce", handle, 2 * (w - 1) / w * _nbytes(tensor), t)

    def _all_gather(self, tensor: torch.Tensor, output: torch.Tensor) -> Handle:
        t = time.perf_counter()
        handle = self.inner.all_gather(tensor, output, async_op=True)
        return self._delayed("all_gather", handle, (self.world_size - 1) * _nbytes(tensor), t)

    def _reduce_scatter(self, tensor: torch.Tensor, output: torch.Tensor, op: ReduceOp) -> Handle:
        t, w = time.perf_counter(), self.world_size
        handle = self.inner.reduce_scatter(tensor, output, op, async_op=True)
        return self._delayed("reduce_scatter", handle, (w - 1) / w * _nbytes(tensor), t)

    def _all_to_all(self, tensor, output, input_splits, output_splits) -> Handle:
        t = time.perf_counter()
        handle = self.inner.all_to_all(tensor, output, input_splits, output_splits, async_op=True)
        row = _nbytes(tensor[:1]) if tensor.shape[0] else _nbytes(output[:1])
        sent = sum(rows for peer, rows in enumerate(input_splits) if peer != self.rank)
        received = sum(rows for peer, rows in enumerate(output_splits) if peer != self.rank)
        return self._delayed("all_to_all", handle, max(sent, received) * row, t)

    def all_to_all_with_counts(self, tensor: torch.Tensor, input_splits: Sequence[int],
                               output: torch.Tensor | Callable[[int], torch.Tensor] | None = None,
                               async_op: bool = False) -> Any:
        """The inner communicator's all_to_all_with_counts, complete no sooner than the counts' link time and
        then the rows' (`counts_then_rows_seconds`).

        Both exchanges run at the inner library's own pace: no thread sits out the counts' modelled
        time before the rows are issued, so nothing waits beside the caller's compute; the modelled
        time is added once, to the operation as a whole.
        """
        issued = time.perf_counter()
        ins = list(input_splits)
        inner = self.inner.all_to_all_with_counts(tensor, ins, output, async_op=async_op)
        if self.world_size == 1:
            return inner
        row_bytes = tensor.element_size() * math.prod(tensor.shape[1:])

        def deadline(result: tuple[torch.Tensor, list[int]]) -> float:
            seconds = self.counts_then_rows_seconds(ins, result[1], row_bytes)
            self.modelled_seconds += seconds
            return issued + seconds

        if async_op:
            return DeadlineHandle(inner, deadline, "all_to_all_with_counts")
        return DeadlineHandle(CompletedHandle(inner), deadline, "all_to_all_with_counts").wait(self.timeout_s)

    def counts_then_rows_seconds(self, input_splits: Sequence[int], output_splits: Sequence[int],
                                 row_bytes: int) -> float:
        """Modelled time of an all_to_all whose row counts travel first: one int64 per peer, then the rows
        (the larger of those sent to and received from other ranks), one after the other on the link."""
        others = [peer for peer in range(self.world_size) if peer != self.rank]
        rows = max(sum(input_splits[p] for p in others), sum(output_splits[p] for p in others))
        return self.link_seconds(8 * len(others)) + self.link_seconds(rows * row_bytes)

    def _broadcast(self, tensor: torch.Tensor, src: int) -> Handle:
        t = time.perf_counter()
        return self._delayed("broadcast", self.inner.broadcast(tensor, src, async_op=True), _nbytes(tensor), t)

    def _barrier(self) -> Handle:
        t = time.perf_counter()
        return self._delayed("barrier", self.inner.barrier(async_op=True), 0, t)

    def _send(self, tensor: torch.Tensor, dst: int) -> Handle:
        t = time.perf_counter()
        return self._delayed("send", self.inner.send(tensor, dst, async_op=True), _nbytes(tensor), t)

    def _recv(self, tensor: torch.Tensor, src: int) -> Handle:
        t = time.perf_counter()
        return self._delayed("recv", self.inner.recv(tensor, src, async_op=True), _nbytes(tensor), t)

    def close(self) -> None:
        super().close()
        self.inner.close()
