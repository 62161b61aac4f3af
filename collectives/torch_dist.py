"""Communicator over any torch.distributed ProcessGroup backend.

Works with every backend name torch knows (gloo, nccl, xccl, ucc, mpi) and any a
vendor registers with `torch.distributed.Backend.register_backend` (hccl, ...).
Uses the current API names of the installed torch (`all_gather_single`,
`reduce_scatter_single` since 2.13) and the older names before that.
"""

from __future__ import annotations

import datetime
from typing import Any, Iterable, Sequence

import torch
import torch.distributed as dist

from moeport.collectives.base import Communicator, Handle, ReduceOp

_TORCH_OPS = {
    ReduceOp.SUM: dist.ReduceOp.SUM,
    ReduceOp.AVG: dist.ReduceOp.AVG,
    ReduceOp.MAX: dist.ReduceOp.MAX,
    ReduceOp.MIN: dist.ReduceOp.MIN,
}

# Operations a torch.distributed backend lacks, served by the base class's declared fallbacks.
# gloo's reduce_scatter Work never reports completion until waited for (it is a composite
# finished inside wait()), so async use cannot overlap it; all_reduce + slice can.
KNOWN_GAPS: dict[str, frozenset[str]] = {
    "gloo": frozenset({"reduce_scatter"}),
}

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _timed_out(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "timed out" in text or "timeout" in text


class TorchWorkHandle(Handle):
    """A torch.distributed Work in flight, with the tensor it will produce."""

    def __init__(self, work: Any, result: Any, op: str) -> None:
        self._work = work
        self._result = result
        self._op = op
        self._done = False

    def wait(self, timeout: float | None = None) -> Any:
        if not self._done:
            try:
                if timeout is None:
                    self._work.wait()
                else:
                    self._work.wait(timeout=datetime.timedelta(seconds=timeout))
            except RuntimeError as exc:
                if _timed_out(exc):
                    raise TimeoutError(f"{self._op} did not complete in time: {str(exc).splitlines()[0]}") from exc
                raise
            self._done = True
        return self._result

    def is_completed(self) -> bool:
        return self._done or self._work.is_completed()


class TorchDistCommunicator(Communicator):
    """A torch.distributed process group as a Communicator.

    The world communicator is built after `init_process_group`; subgroups come
    from `new_group`. Every primitive is issued asynchronously; the base class
    waits for the synchronous calls.
    """

    def __init__(self, group: Any = None, timeout_s: float = 60.0, force_fallbacks: Iterable[str] = ()) -> None:
        group = group if group is not None else dist.group.WORLD
        self._backend_name = str(dist.get_backend(group))
        self.lacks = KNOWN_GAPS.get(self._backend_name, frozenset())
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
        group = dist.new_group(
            members, timeout=datetime.timedelta(seconds=self.timeout_s), use_local_synchronization=True
        )
        return TorchDistCommunicator(group, self.timeout_s, self.forced_fallbacks)

    def _all_reduce(self, tensor: torch.Tensor, op: ReduceOp) -> Handle:
        work = dist.all_reduce(tensor, op=_TORCH_OPS[op], group=self.group, async_op=True)
        return TorchWorkHandle(work, tensor, "all_reduce")

    def _all_gather(self, tensor: torch.Tensor, output: torch.Tensor) -> Handle:
        work = _all_gather_single(output, tensor, group=self.group, async_op=True)
        return TorchWorkHandle(work, output, "all_gather")

    def _reduce_scatter(self, tensor: torch.Tensor, output: torch.Tensor, op: ReduceOp) -> Handle:
        work = _reduce_scatter_single(output, tensor, op=_TORCH_OPS[op], group=self.group, async_op=True)
        return TorchWorkHandle(work, output, "reduce_scatter")

    def _all_to_all(self, tensor, output, input_splits, output_splits) -> Handle:
        # all_to_all_single: the list form of all_to_all fails on gloo for uneven sizes.
        work = dist.all_to_all_single(
            output, tensor, output_split_sizes=output_splits, input_split_sizes=input_splits,
            group=self.group, async_op=True,
        )
        return TorchWorkHandle(work, output, "all_to_all")

    def _broadcast(self, tensor: torch.Tensor, src: int) -> Handle:
        work = dist.broadcast(tensor, src=self.global_ranks[src], group=self.group, async_op=True)
        return TorchWorkHandle(work, tensor, "broadcast")

    def _barrier(self) -> Handle:
        return TorchWorkHandle(dist.barrier(group=self.group, async_op=True), None, "barrier")

    def _send(self, tensor: torch.Tensor, dst: int) -> Handle:
        return TorchWorkHandle(dist.isend(tensor, dst=self.global_ranks[dst], group=self.group), None, "send")

    def _recv(self, tensor: torch.Tensor, src: int) -> Handle:
        return TorchWorkHandle(dist.irecv(tensor, src=self.global_ranks[src], group=self.group), tensor, "recv")

    def close(self) -> None:
        super().close()
        if self.group is dist.group.WORLD and dist.is_initialized():
            dist.destroy_process_group()
        # A ProcessGroup object still referenced keeps gloo's worker threads alive after the
        # destroy; one still alive when the interpreter exits can abort the process.
        self.group = None
