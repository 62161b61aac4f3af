"""Collectives that autograd can differentiate through, for training.

Each function runs one Communicator collective forward and its transpose
backward:

    all_to_all      backward: all_to_all of the gradient with the splits swapped
    all_gather      backward: reduce_scatter (sum) of the gradient
    reduce_scatter  backward: all_gather of the gradient

The loss is taken to be the sum of every rank's loss, as in data- and
expert-parallel training. Backward runs a collective, so every rank of the
group must run backward through the same differentiable collectives in the same
order (a rank whose output does not reach its loss still has to call backward,
e.g. on `(output * 0).sum()`), or the group waits until its timeout.

`all_to_all` also moves several tensors with the same rows in one exchange,
packed side by side into byte rows (`RowFormat`, `pack_rows`, `unpack_rows`,
which the expert-parallel dispatcher uses for its payload too): one collective
each way, the bits arriving exactly as sent, whatever the dtypes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch

from moeport.collectives.base import (
    Communicator,
    Handle,
    MappedHandle,
    ReduceOp,
    equal_splits,
)


@dataclasses.dataclass(frozen=True)
class RowFormat:
    """The byte layout of a row made of several tensors' rows side by side.

    `fields[i]` is (dtype, width, byte offset) of tensor i; fields are laid out by
    decreasing element size, so each typed view is aligned, and the row is padded
    to a multiple of the largest element size (at least 4 bytes).
    """

    fields: tuple[tuple[torch.dtype, int, int], ...]
    row_bytes: int

    @classmethod
    def of(cls, fields: Sequence[tuple[torch.dtype, int]]) -> "RowFormat":
        """The layout of fields given as (dtype, width) each."""
        offsets = [0] * len(fields)
        offset = 0
        for i in sorted(range(len(fields)), key=lambda i: -fields[i][0].itemsize):
            offsets[i] = offset
            offset += fields[i][0].itemsize * fields[i][1]
        align = max([4] + [dtype.itemsize for dtype, _ in fields])
        placed = tuple((dtype, width, offsets[i]) for i, (dtype, width) in enumerate(fields))
        return cls(placed, -(-offset // align) * align)

    @classmethod
    def for_tensors(cls, tensors: Sequence[torch.Tensor]) -> "RowFormat":
        """The layout of the rows of `tensors` (each [rows, ...], trailing dims flattened)."""
        return cls.of([(t.dtype, _width(t)) for t in tensors])

    def view(self, rows: torch.Tensor, i: int) -> torch.Tensor:
        """Field i of byte rows [R, row_bytes] as a typed [R, width] view (strided, not a copy)."""
        dtype, width, offset = self.fields[i]
        return rows[:, offset: offset + dtype.itemsize * width].view(dtype)


def pack_rows(tensors: Sequence[torch.Tensor], out: torch.Tensor | None = None) -> tuple[torch.Tensor, RowFormat]:
    """The rows of `tensors` (same number of rows) side by side as bytes [rows, row_bytes], and their format.

    Writes into `out` ([rows, row_bytes] uint8) when given.
    """
    rows = tensors[0].shape[0]
    if any(t.shape[0] != rows for t in tensors):
        raise ValueError(f"packing rows needs equal row counts, got {[t.shape[0] for t in tensors]}")
    fmt = RowFormat.for_tensors(tensors)
    packed = out if out is not None else torch.empty((rows, fmt.row_bytes), dtype=torch.uint8, device=tensors[0].device)
    for i, t in enumerate(tensors):
        fmt.view(packed, i).copy_(t.reshape(rows, _width(t)))
    return packed, fmt


def unpack_rows(packed: torch.Tensor, fmt: RowFormat) -> list[torch.Tensor]:
    """Typed [rows, width] views of each field of byte rows made by `pack_rows`."""
    return [fmt.view(packed, i) for i in range(len(fmt.fields))]


class _AllToAll(torch.autograd.Function):
    """all_to_all forward; the same exchange with input and output splits swapped backward."""

    @staticmethod
    def forward(ctx, comm, input_splits, output_splits, pending, x):  # type: ignore[override]
        ctx.comm, ctx.input_splits, ctx.output_splits = comm, input_splits, output_splits
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        handle = comm.all_to_all(x, out, input_splits, output_splits, async_op=pending is not None)
        if pending is not None:
            pending.append(handle)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        grad_in = ctx.comm.all_to_all(grad.contiguous(), input_splits=ctx.output_splits, output_splits=ctx.input_splits)
        return None, None, None, None, grad_in


class _PackedAllToAll(torch.autograd.Function):
    """all_to_all of several tensors' rows packed into byte rows: one exchange forward, one backward.

    Gradients travel for every floating-point tensor (zeros where a gradient is
    absent), so the backward exchange has the same shape on every rank.
    """

    @staticmethod
    def forward(ctx, comm, input_splits, output_splits, pending, *tensors):  # type: ignore[override]
        ctx.comm, ctx.input_splits, ctx.output_splits = comm, input_splits, output_splits
        ctx.in_shapes = [t.shape for t in tensors]
        ctx.float_fields = [i for i, t in enumerate(tensors) if t.is_floating_point()]
        packed, fmt = pack_rows(tensors)
        recv = packed.new_empty((sum(output_splits), fmt.row_bytes))
        handle = comm.all_to_all(packed, recv, input_splits, output_splits, async_op=pending is not None)
        if pending is not None:
            pending.append(handle)
        rows = recv.shape[0]
        outs = [v.view(rows, *t.shape[1:]) for v, t in zip(unpack_rows(recv, fmt), tensors)]
        ctx.mark_non_differentiable(*[o for o in outs if not o.is_floating_point()])
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        rows_out = sum(ctx.output_splits)
        parts = [grads[i].reshape(rows_out, _width(grads[i])) for i in ctx.float_fields]  # materialised: never None
        back = all_to_all(ctx.comm, parts, ctx.output_splits, ctx.input_splits) if parts else []
        grad_in: list[torch.Tensor | None] = [None] * len(ctx.in_shapes)
        for g, i in zip(back, ctx.float_fields):
            grad_in[i] = g.reshape(ctx.in_shapes[i])
        return (None, None, None, None, *grad_in)


def _width(t: torch.Tensor) -> int:
    width = 1
    for size in t.shape[1:]:
        width *= size
    return width


class _AllGather(torch.autograd.Function):
    """all_gather forward; reduce_scatter (sum) of the gradient backward."""

    @staticmethod
    def forward(ctx, x, comm):  # type: ignore[override]
        ctx.comm = comm
        return comm.all_gather(x)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return ctx.comm.reduce_scatter(grad.contiguous(), op=ReduceOp.SUM), None


class _ReduceScatter(torch.autograd.Function):
    """reduce_scatter (sum) forward; all_gather of the gradient backward."""

    @staticmethod
    def forward(ctx, x, comm):  # type: ignore[override]
        ctx.comm = comm
        return comm.reduce_scatter(x, op=ReduceOp.SUM)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return ctx.comm.all_gather(grad.contiguous()), None


def all_to_all(
    comm: Communicator,
    x: torch.Tensor | Sequence[torch.Tensor],
    input_splits: Sequence[int] | None = None,
    output_splits: Sequence[int] | None = None,
    async_op: bool = False,
) -> Any:
    """Differentiable `comm.all_to_all` of the rows of `x` (dim 0); gradients travel back the same way.

    `x` is a tensor, or a list of tensors with the same number of rows that
    travel together in ONE exchange (packed into byte rows; returned as a list
    of strided views, integer ones not differentiable). Splits as in
    `Communicator.all_to_all` (equal splits when both are None). With
    `async_op=True` the exchange is issued and a Handle returned whose `wait()`
    gives the output, already connected to the autograd graph; use it only
    after waiting. Backward is synchronous.
    """
    several = not isinstance(x, torch.Tensor)
    tensors = list(x) if several else [x]
    if not tensors:
        raise ValueError("all_to_all needs at least one tensor")
    rows = tensors[0].shape[0]
    ins = list(input_splits) if input_splits is not None else equal_splits(rows, comm.world_size)
    outs = list(output_splits) if output_splits is not None else (list(ins) if input_splits is None else None)
    if outs is None:
        raise ValueError("differentiable all_to_all with input_splits needs output_splits")
    pending: list[Handle] | None = [] if async_op else None
    if several:
        out: Any = list(_PackedAllToAll.apply(comm, ins, outs, pending, *tensors))
    else:
        out = _AllToAll.apply(comm, ins, outs, pending, tensors[0])
    if pending is None:
        return out
    return MappedHandle(pending[0], lambda _: out)


def all_gather(comm: Communicator, x: torch.Tensor) -> torch.Tensor:
    """Differentiable `comm.all_gather`: every rank's `x` concatenated along dim 0, in rank order.

    Backward sums the gradient over ranks and gives each rank its own block.
    """
    return _AllGather.apply(x.contiguous(), comm)


def reduce_scatter(comm: Communicator, x: torch.Tensor) -> torch.Tensor:
    """Differentiable `comm.reduce_scatter` (sum): rank r gets block r of the sum of every rank's `x`.

    `x` has world_size equal blocks along dim 0. Backward all_gathers the gradient.
    """
    return _ReduceScatter.apply(x.contiguous(), comm)
