"""Communicator over any torch.distributed ProcessGroup backend.

Works with every backend name torch knows (gloo, nccl, xccl, ucc, mpi) and any a
vendor registers with `torch.distributed.Backend.register_backend` (hccl, ...).
Uses the current API names of the installed torch (`all_gather_single`,
`reduce_scatter_single` since 2.13) and the older names before that.
"""

from __future__ import annotations

import datetime
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

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
    text = str(exc).lower()
    return "timed out" in text or "timeout" in text


class TorchWorkHandle(Handle):
    """A torch.distributed Work in flight; `finish` runs on the result once it is complete."""

    def __init__(self, work: Any, result: Any, finish: Callable[[Any], Any] | None = None, op: str = "") -> None:
        self._work = work
        self._result = result
        self._finish = finish
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
            if self._finish is not None:
                self._result = self._finish(self._result)
            self._done = True
        return self._result

    def is_completed(self) -> bool:
        return self._done or self._work.is_completed()


class TorchDistCommunicator(Communicator):
    """A torch.distributed process group as a Communicator.

    The world communicator is built after `init_process_group`; subgroups come
    from `new_group`.
    """

    def __init__(self, group: Any = None, timeout_s: float = 60.0) -> None:
        group = group if group is not None else dist.group.WORLD
        ranks = dist.get_process_group_ranks(group)
        super().__init__(dist.get_rank(group), dist.get_world_size(group), ranks)
        self.group = group
        self.timeout_s = timeout_s
        self._backend_name = str(dist.get_backend(group))

    @property
    def library(self) -> str:
        return self._backend_name

    def _run(self, op: str, work: Any, result: Any, async_op: bool, finish: Callable[[Any], Any] | None = None) -> Any:
        handle = TorchWorkHandle(work, result, finish, op)
        return handle if async_op else handle.wait()

    def new_group(self, ranks: Sequence[int]) -> Communicator | None:
        members = [self.global_ranks[r] for r in ranks]
        group = dist.new_group(
            members, timeout=datetime.timedelta(seconds=self.timeout_s), use_local_synchronization=True
        ) if self.rank in ranks else None
        if group is None:
            return None
        return TorchDistCommunicator(group, self.timeout_s)

    def all_reduce(self, tensor: torch.Tensor, op: ReduceOp = ReduceOp.SUM, async_op: bool = False) -> Any:
        work = dist.all_reduce(tensor, op=_TORCH_OPS[op], group=self.group, async_op=True)
        return self._run("all_reduce", work, tensor, async_op)

    def all_gather(self, tensor: torch.Tensor, output: torch.Tensor | None = None, async_op: bool = False) -> Any:
        out = self._gather_output(tensor, output)
        work = _all_gather_single(out, tensor.contiguous(), group=self.group, async_op=True)
        return self._run("all_gather", work, out, async_op)

    def reduce_scatter(self, tensor, output=None, op=ReduceOp.SUM, async_op=False) -> Any:
        out = self._scatter_output(tensor, output)
        work = _reduce_scatter_single(out, tensor.contiguous(), op=_TORCH_OPS[op], group=self.group, async_op=True)
        return self._run("reduce_scatter", work, out, async_op)

    def all_to_all(self, tensor, output=None, input_splits=None, output_splits=None, async_op=False) -> Any:
        out = self._a2a_output(tensor, output, output_splits)
        work = dist.all_to_all_single(
            out,
            tensor.contiguous(),
            output_split_sizes=list(output_splits) if output_splits is not None else None,
            input_split_sizes=list(input_splits) if input_splits is not None else None,
            group=self.group,
            async_op=True,
        )
        return self._run("all_to_all", work, out, async_op)

    def broadcast(self, tensor: torch.Tensor, src: int = 0, async_op: bool = False) -> Any:
        work = dist.broadcast(tensor, src=self.global_ranks[src], group=self.group, async_op=True)
        return self._run("broadcast", work, tensor, async_op)

    def barrier(self, async_op: bool = False) -> Any:
        work = dist.barrier(group=self.group, async_op=True)
        return self._run("barrier", work, None, async_op)

    def send(self, tensor: torch.Tensor, dst: int, async_op: bool = False) -> Any:
        work = dist.isend(tensor.contiguous(), dst=self.global_ranks[dst], group=self.group)
        return self._run("send", work, None, async_op)

    def recv(self, tensor: torch.Tensor, src: int, async_op: bool = False) -> Any:
        work = dist.irecv(tensor, src=self.global_ranks[src], group=self.group)
        return self._run("recv", work, tensor, async_op)

    def close(self) -> None:
        if self.group is dist.group.WORLD and dist.is_initialized():
            dist.destroy_process_group()
