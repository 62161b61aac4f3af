"""An emulated interconnect: any Communicator, with each operation held back to a modelled link time.

An operation issued at time t completes no sooner than
t + latency + bytes / bandwidth, where bytes is what this rank puts on (or takes
off) its link for that operation. The wait is a deadline slept out, not a busy
loop, so the CPU stays free for the compute the schedule overlaps with it. This
lets overlap be studied, and tested, on a machine whose real transport (shared
memory, loopback) is far faster than the interconnects LongCat is served on.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import torch

from moeport.collectives.base import Communicator, Handle, ReduceOp


class DeadlineHandle(Handle):
    """An operation that is complete once the inner one is and its modelled link time has passed."""

    def __init__(self, inner: Handle, deadline: float, op: str) -> None:
        self._inner = inner
        self.deadline = deadline
        self._op = op

    def wait(self, timeout: float | None = None) -> Any:
        started = time.perf_counter()
        result = self._inner.wait(timeout)
        remaining = self.deadline - time.perf_counter()
        if remaining > 0:
            if timeout is not None and (time.perf_counter() - started) + remaining > timeout:
                raise TimeoutError(f"{self._op} did not complete within {timeout:g} s on the emulated link")
            time.sleep(remaining)
        return result

    def is_completed(self) -> bool:
        return time.perf_counter() >= self.deadline and self._inner.is_completed()


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
