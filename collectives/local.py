"""A communicator for a group of one rank: every collective is a copy, nothing travels."""

from __future__ import annotations

from typing import Sequence

import torch

from moeport.collectives.base import Communicator, CompletedHandle, Handle, ReduceOp


class LocalCommunicator(Communicator):
    """The group of this process alone: used for one-process models and size-1 groups."""

    def __init__(self, global_rank: int = 0) -> None:
        super().__init__(0, 1, [global_rank])

    @property
    def library(self) -> str:
        return "local"

    def new_group(self, ranks: Sequence[int]) -> Communicator | None:
        return self if list(ranks) == [0] else None

    def _all_reduce(self, tensor: torch.Tensor, op: ReduceOp) -> Handle:
        return CompletedHandle(tensor)

    def _all_gather(self, tensor: torch.Tensor, output: torch.Tensor) -> Handle:
        return CompletedHandle(output.copy_(tensor))

    def _reduce_scatter(self, tensor: torch.Tensor, output: torch.Tensor, op: ReduceOp) -> Handle:
        return CompletedHandle(output.copy_(tensor))

    def _all_to_all(self, tensor, output, input_splits, output_splits) -> Handle:
        return CompletedHandle(output.copy_(tensor))

    def _broadcast(self, tensor: torch.Tensor, src: int) -> Handle:
        return CompletedHandle(tensor)

    def _barrier(self) -> Handle:
        return CompletedHandle(None)

    def _send(self, tensor: torch.Tensor, dst: int) -> Handle:
        raise ValueError("a group of one rank has no peer to send to")

    def _recv(self, tensor: torch.Tensor, src: int) -> Handle:
        raise ValueError("a group of one rank has no peer to receive from")
