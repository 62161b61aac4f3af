"""Communicator over any torch.distributed ProcessGroup backend.

Works with every backend name torch knows (gloo, nccl, xccl, ucc, mpi) and any a
vendor registers with `torch.distributed.Backend.register_backend` (hccl, ...); what
a library lacks is declared by the device's Backend or recognised from the group
itself (library_gaps.py). Uses the current API names of the installed torch
(`all_gather_single`, `reduce_scatter_single` since 2.13) and the older names before that.
"""

from __future__ import annotations

import contextlib
import datetime
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist

from moeport.collectives import library_gaps
from moeport.collectives.base import Communicator, Handle, ReduceOp

_TORCH_OPS = {
    ReduceOp.SUM: dist.ReduceOp.SUM,
    ReduceOp.AVG: dist.ReduceOp.AVG,
    ReduceOp.MAX: dist.ReduceOp.MAX,
    ReduceOp.MIN: dist.ReduceOp.MIN,
}

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _timed_out(exc: BaseException) -> bool:
    """Whether a torch.distributed error says the operation timed out (the libraries word it differently)."""
    text = str(exc).lower()
    return "timed out" in text or "timeout" in text


@contextlib.contextmanager
def timeouts_named(op: str, timeout_s: float) -> Iterator[None]:
    """Inside the block, a torch.distributed error saying it timed out becomes a TimeoutError in moeport's
    words, `"{op} did not complete within {timeout_s} s"` (the library's own text stays in the chain)."""
    try:
        yield
    except RuntimeError as exc:
        if _timed_out(exc):
            raise TimeoutError(f"{op} did not complete within {timeout_s:g} s") from exc
        raise


class TorchWorkHandle(Handle):
    """A torch.distributed Work in flight, with the tensor it will produce."""

    def __init__(self, work: Any, result: Any, op: str, group_timeout_s: float) -> None:
        self._work = work
        self._result = result
        self._op = op
        self._group_timeout_s = group_timeout_s
        self._done = False

    def wait(self, timeout: float | None = None) -> Any:
        if not self._done:
            waited = self._group_timeout_s if timeout is None else min(timeout, self._group_timeout_s)
            with timeouts_named(self._op, waited):
                if timeout is None:
                    self._work.wait()
                else:
                    self._work.wait(timeout=datetime.timedelta(seconds=timeout))
            self._done = True
        return self._result

    def is_completed(self) -> bool:
        return self._done or self._work.is_completed()


class TorchDistCommunicator(Communicator):
    """A torch.distributed process group as a Communicator.

    The world communicator is built after `init_process_group`; subgroups come
    from `new_group`. Every primitive is issued asynchronously; the base class
    waits for the synchronous calls. `gaps`: what the library lacks, as its device's
    Backend declares it (keys of FALLBACKS); None recognises them from the group, which
    may run a probe that every member joins. Subgroups keep the world's gaps.
    """

    def __init__(
        self, group: Any = None, timeout_s: float = 60.0, force_fallbacks: Iterable[str] = (),
        gaps: Iterable[str] | None = None,
    ) -> None:
        group = group if group is not None else dist.group.WORLD
        self._backend_name = str(dist.get_backend(group))
        self.lacks = frozenset(gaps) if gaps is not None else library_gaps.recognise(group, timeout_s)
        super().__init__(
            dist.get_rank(group), dist.get_world_size(group), dist.get_process_group_ranks(group),
            timeout_s, force_fallbacks,
        )
        self.group = group

    @property
    def library(self) -> str:
        return self._backend_name

    def new_group(self, ranks: Sequence[int]) -> Communicator | None:
        if self.rank not in ranks:
            return None
        members = [self.global_ranks[r] for r in ranks]
        with timeouts_named("new_group", self.timeout_s):
            group = dist.new_group(
                members, timeout=datetime.timedelta(seconds=self.timeout_s), use_local_synchronization=True
            )
        return TorchDistCommunicator(group, self.timeout_s, self.forced_fallbacks, gaps=self.lacks)

    def _issued(self, op: str, result: Any, issue: Callable[[], Any]) -> Handle:
        """Make a torch.distributed call; a timeout already while issuing it (the first call on a group
        connects to the peers) is a TimeoutError in moeport's words, as one while waiting is."""
        with timeouts_named(op, self.timeout_s):
            work = issue()
        return TorchWorkHandle(work, result, op, self.timeout_s)

    def _all_reduce(self, tensor: torch.Tensor, op: ReduceOp) -> Handle:
        return self._issued("all_reduce", tensor, lambda: dist.all_reduce(
            tensor, op=_TORCH_OPS[op], group=self.group, async_op=True))

    def _all_gather(self, tensor: torch.Tensor, output: torch.Tensor) -> Handle:
        return self._issued("all_gather", output, lambda: _all_gather_single(
            output, tensor, group=self.group, async_op=True))

    def _reduce_scatter(self, tensor: torch.Tensor, output: torch.Tensor, op: ReduceOp) -> Handle:
        return self._issued("reduce_scatter", output, lambda: _reduce_scatter_single(
            output, tensor, op=_TORCH_OPS[op], group=self.group, async_op=True))

    def _all_to_all(self, tensor, output, input_splits, output_splits) -> Handle:
        # all_to_all_single: the list form of all_to_all fails on gloo for uneven sizes.
        return self._issued("all_to_all", output, lambda: dist.all_to_all_single(
            output, tensor, output_split_sizes=output_splits, input_split_sizes=input_splits,
            group=self.group, async_op=True))

    def _broadcast(self, tensor: torch.Tensor, src: int) -> Handle:
        return self._issued("broadcast", tensor, lambda: dist.broadcast(
            tensor, src=self.global_ranks[src], group=self.group, async_op=True))

    def _barrier(self) -> Handle:
        return self._issued("barrier", None, lambda: dist.barrier(group=self.group, async_op=True))

    def _send(self, tensor: torch.Tensor, dst: int) -> Handle:
        return self._issued("send", None, lambda: dist.isend(tensor, dst=self.global_ranks[dst], group=self.group))

    def _recv(self, tensor: torch.Tensor, src: int) -> Handle:
        return self._issued("recv", tensor, lambda: dist.irecv(tensor, src=self.global_ranks[src], group=self.group))

    def close(self) -> None:
        super().close()
        if self.group is dist.group.WORLD and dist.is_initialized():
            dist.destroy_process_group()
        # A ProcessGroup object still referenced keeps gloo's worker threads alive after the
        # destroy; one still alive when the interpreter exits can abort the process.
        self.group = None
