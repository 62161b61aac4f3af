"""Collectives that autograd can differentiate through, for training.

Each function runs one Communicator collective forward and its transpose
backward:

    all_to_all      backward: all_to_all of the gradient with the splits swapped,
                    asynchronous where the forward's was (BackwardExchange)
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
from typing import Any, Callable, Sequence

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


class BackwardExchange:
    """The backward side of one differentiable all_to_all: the gradients' exchange, the forward's transpose.

    The forward is two autograd nodes, one made when the exchange is issued and one when its
    result is taken (waited for). Autograd runs a backward node after every node made later in
    the forward that it depends on, and among nodes ready at once the one made latest first; so
    the gradients' exchange is issued where the taking node's backward runs and waited for where
    the issuing node's backward runs, and the dense backward work the forward ran between the
    two runs in between while the gradients travel. A forward that waits at once (the
    sequential schedule) gets a backward that waits at once.

    Set `mark` (a function that records a timing event and returns it) before the backward to
    have `span()` tell when the backward exchange was issued and waited for.
    """

    def __init__(self, comm: Communicator, input_splits: list[int], output_splits: list[int]) -> None:
        self.comm, self.input_splits, self.output_splits = comm, input_splits, output_splits
        self.mark: Callable[[], Any] | None = None
        self._handle: Handle | None = None
        self._send: torch.Tensor | None = None
        self._events: dict[str, Any] = {}

    def issue(self, grads: Sequence[torch.Tensor], rows_back: int) -> None:
        """Start sending `grads` (one per floating-point field, [rows out, ...]) back the way the rows came."""
        self._events = {"issued": self._mark()}
        send, self._read = _rows_to_send(grads)
        recv = send.new_empty((rows_back, *send.shape[1:]))
        self._handle = self.comm.all_to_all(send, recv, self.output_splits, self.input_splits, async_op=True)
        self._events["issue_returned"] = self._mark()
        self._send = send  # kept until the exchange is waited for

    def wait(self) -> list[torch.Tensor]:
        """The gradients that came back (one per field `issue` sent, [rows in, ...])."""
        handle, self._handle = self._handle, None
        assert handle is not None, "the backward exchange was never issued"
        done_before = handle.is_completed()
        self._events["wait_began"] = self._mark()
        recv = handle.wait(self.comm.timeout_s)
        self._send = None
        self._events["wait_returned"] = self._mark()
        self._events["complete_before_wait"] = done_before
        return self._read(recv)

    def span(self) -> dict[str, Any] | None:
        """The last backward exchange's events (issued, issue_returned, wait_began, wait_returned, as `mark`
        made them) and complete_before_wait; None until one was waited for, or without `mark`."""
        if self.mark is None or "wait_returned" not in self._events:
            return None
        return dict(self._events)

    def _mark(self) -> Any:
        return self.mark() if self.mark is not None else None


class _Exchange:
    """One differentiable all_to_all of the rows of several tensors (one exchange each way)."""

    def __init__(self, comm: Communicator, tensors: Sequence[torch.Tensor], ins: list[int], outs: list[int]) -> None:
        self.backward = BackwardExchange(comm, ins, outs)
        self.shapes = [t.shape for t in tensors]
        self.float_fields = [i for i, t in enumerate(tensors) if t.is_floating_point()]
        send, self.read = _rows_to_send(tensors)
        self.device = send.device
        self.recv: torch.Tensor | None = send.new_empty((sum(outs), *send.shape[1:]))
        self.send: torch.Tensor | None = send  # kept until the result is taken
        self.handle = comm.all_to_all(send, self.recv, ins, outs, async_op=True)


def _rows_to_send(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, Callable[[torch.Tensor], list]]:
    """The rows of `tensors` as one tensor to exchange (the tensor itself when alone, else their rows packed
    into byte rows), and the function that reads received rows of it back into one tensor per field."""
    if len(tensors) == 1:
        return tensors[0].contiguous(), lambda rows: [rows]
    packed, fmt = pack_rows(tensors)
    shapes = [t.shape[1:] for t in tensors]
    return packed, lambda rows: [v.view(rows.shape[0], *s) for v, s in zip(unpack_rows(rows, fmt), shapes)]


class _IssueAllToAll(torch.autograd.Function):
    """The node made when the exchange is issued; backward: wait for the gradients' exchange."""

    @staticmethod
    def forward(ctx, exchange, *tensors):  # type: ignore[override]
        ctx.exchange = exchange
        return tensors[0].new_empty(0, dtype=torch.float32)  # connects the taking node to the inputs

    @staticmethod
    def backward(ctx, _):  # type: ignore[override]
        exchange = ctx.exchange
        grad_in: list[torch.Tensor | None] = [None] * len(exchange.shapes)
        if exchange.float_fields:
            for g, i in zip(exchange.backward.wait(), exchange.float_fields):
                grad_in[i] = g.reshape(exchange.shapes[i])
        return (None, *grad_in)


class _TakeAllToAll(torch.autograd.Function):
    """The node made when the exchange's result is taken; backward: issue the gradients' exchange."""

    @staticmethod
    def forward(ctx, exchange, link):  # type: ignore[override]
        ctx.exchange = exchange
        outs = exchange.read(exchange.recv)
        exchange.recv = exchange.send = None  # the outputs hold the rows while something needs them
        ctx.mark_non_differentiable(*[o for o in outs if not o.is_floating_point()])
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        exchange = ctx.exchange
        if exchange.float_fields:  # materialised: zeros where an output's gradient is absent
            rows_in = exchange.shapes[0][0]
            exchange.backward.issue([grads[i].reshape(grads[i].shape[0], _width(grads[i]))
                                     if len(exchange.float_fields) > 1 else grads[i]
                                     for i in exchange.float_fields], rows_in)
        return None, torch.zeros(0, dtype=torch.float32, device=exchange.device)


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
    after waiting. The backward exchange mirrors the forward's: issued where the
    output was taken, waited for where the exchange was issued (BackwardExchange,
    also the Handle's `backward`), so under an overlap schedule the gradients
    travel while the backward of the work between issue and wait runs.
    """
    several = not isinstance(x, torch.Tensor)
    tensors = list(x) if several else [x]
    if not tensors:
        raise ValueError("all_to_all needs at least one tensor")
    rows = tensors[0].shape[0]
    if any(t.shape[0] != rows for t in tensors):
        raise ValueError(f"all_to_all of several tensors needs equal row counts, got {[t.shape[0] for t in tensors]}")
    ins = list(input_splits) if input_splits is not None else equal_splits(rows, comm.world_size)
    outs = list(output_splits) if output_splits is not None else (list(ins) if input_splits is None else None)
    if outs is None:
        raise ValueError("differentiable all_to_all with input_splits needs output_splits")
    exchange = _Exchange(comm, tensors, ins, outs)
    link = _IssueAllToAll.apply(exchange, *tensors)

    def take(_: Any) -> Any:
        out = _TakeAllToAll.apply(exchange, link)
        return list(out) if several else out[0]

    handle = MappedHandle(exchange.handle, take)
    handle.backward = exchange.backward
    return handle if async_op else handle.wait(comm.timeout_s)


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
