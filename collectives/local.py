"""A communicator for a group of one rank: every collective is a copy, nothing travels."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from moeport.collectives.base import Communicator, CompletedHandle, ReduceOp


class LocalCommunicator(Communicator):
    """The group of this process alone: used for one-process models and size-1 groups."""

    def __init__(self, global_rank: int = 0) -> None:
        super().__init__(0, 1, [global_rank])

    @property
    def library(self) -> str:
        return "local"

    def _done(self, result: Any, async_op: bool) -> Any:
        return CompletedHandle(result) if async_op else result

    def new_group(self, ranks: Sequence[int]) -> Communicator | None:
        return self if list(ranks) == [0] else None

    def all_reduce(self, tensor: torch.Tensor, op: ReduceOp = ReduceOp.SUM, async_op: bool = False) -> Any:
        return self._done(tensor, async_op)

    def all_gather(self, tensor: torch.Tensor, output: torch.Tensor | None = None, async_op: bool = False) -> Any:
        out = self._gather_output(tensor, output)
        out.copy_(tensor)
        return self._done(out, async_op)

    def reduce_scatter(self, tensor, output=None, op=ReduceOp.SUM, async_op=False) -> Any:
        out = self._scatter_output(tensor, output)
        out.copy_(tensor)
        return self._done(out, async_op)

    def all_to_all(self, tensor, output=None, input_splits=None, output_splits=None, async_op=False) -> Any:
        out = self._a2a_output(tensor, output, output_splits)
        out.copy_(tensor)
        return self._done(out, async_op)

    def broadcast(self, tensor: torch.Tensor, src: int = 0, async_op: bool = False) -> Any:
        return self._done(tensor, async_op)

    def barrier(self, async_op: bool = False) -> Any:
        return self._done(None, async_op)

    def send(self, tensor: torch.Tensor, dst: int, async_op: bool = False) -> Any:
        raise ValueError("a group of one rank has no peer to send to")

    def recv(self, tensor: torch.Tensor, src: int, async_op: bool = False) -> Any:
        raise ValueError("a group of one rank has no peer to receive from")
