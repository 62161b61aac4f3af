"""Expert-parallel MoE dispatch and combine over `Communicator.all_to_all`.

Which rank owns which FFN expert is `ExpertLayout`'s to say (expert_layout.py).
Expert ids >= N are zero-computation experts: their slots never leave the rank
(the model applies them where the token lives), and only slots routed to FFN
experts travel.

A token bound for several experts on one rank travels to that rank once, with
the k local expert ids of its slots (-1 where a slot is not for that rank) and
their weights. Each dispatch is one `Communicator.all_to_all_with_counts`: the
per-destination row counts first (a small all_to_all), then the payload in ONE
uneven all_to_all: hidden row, ids and weights packed side by side into one byte
row, so the bits arrive exactly as they were sent whatever the dtypes.

Like Megatron-core's token dispatcher, each direction is three steps, so a
schedule can run other work while the communication is in flight:

    plan = d.dispatch_preprocess(hidden, topk_ids, topk_weights)   # local
    received = d.token_dispatch(plan, async_op=True).wait()        # communication
    inp = d.dispatch_postprocess(plan, received)                   # local
    out_rows = experts(inp)                                        # [R, d]: one row per received row
    back = d.token_combine(inp, out_rows, async_op=True).wait()    # communication
    out = d.combine_postprocess(inp, back)                         # local: [T, d] in token order

The model's expert exchange calls the three steps from its Issue and Wait steps;
`dispatch()` and `combine()` chain them for everyone else. Received rows are views
of buffers the dispatcher keeps and reuses (see `ExpertParallelDispatcher`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch

from moeport.base.buffers import cannot_write_here
from moeport.collectives import differentiable as diff
from moeport.collectives.base import Communicator, MappedHandle
from moeport.collectives.differentiable import RowFormat, unpack_rows
from moeport.collectives.expert_layout import DispatchRoute, ExpertLayout, route

#: dtype of the local expert ids inside a travelling row (ids are small; int64 on either side).
_ID_DTYPE = torch.int32
#: bytes of one expert id and of one int64 row count in a naive dispatch and the counts exchange.
_NAIVE_ID_BYTES = 8


@dataclasses.dataclass(frozen=True)
class DispatchStats:
    """What one dispatch moved, as seen by this rank (bytes of the payload exchange; counts apart).

    rows_sent: one per distinct (token, destination rank), this rank included;
    bytes_sent: their payload bytes; `*_to_peers`: the same without the rows
    that stay on this rank; naive_bytes: a dispatch sending one hidden-state
    copy per top-k slot (zero-expert slots included) plus an int64 id and a
    weight per slot; count_bytes: the counts exchange.
    """

    tokens: int
    ffn_slots: int
    rows_sent: int
    rows_to_peers: int
    rows_received: int
    bytes_sent: int
    bytes_to_peers: int
    naive_bytes: int
    count_bytes: int

    @property
    def saving(self) -> float:
        """naive_bytes / bytes_sent (inf when nothing was sent but a naive dispatch would have)."""
        if self.bytes_sent == 0:
            return float("inf") if self.naive_bytes else 1.0
        return self.naive_bytes / self.bytes_sent


class ReusedBuffer:
    """A flat byte buffer grown to the largest size asked for; hands out views of its start."""

    def __init__(self) -> None:
        self._flat: torch.Tensor | None = None

    def take(self, nbytes: int, device: torch.device) -> torch.Tensor:
        """The first `nbytes` bytes, growing (by at least a quarter) when too small."""
        flat = self._flat
        unusable = flat is None or flat.device != device or cannot_write_here(flat)
        if unusable or flat.numel() < nbytes:
            size = nbytes if unusable else max(nbytes, flat.numel() * 5 // 4)
            flat = self._flat = torch.empty(size, dtype=torch.uint8, device=device)
        return flat[:nbytes]

    def rows(self, count: int, row_bytes: int, device: torch.device) -> torch.Tensor:
        """[count, row_bytes] bytes."""
        return self.take(count * row_bytes, device).view(count, row_bytes)

    def typed(self, count: int, width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """[count, width] of `dtype`."""
        return self.take(count * width * dtype.itemsize, device).view(dtype).view(count, width)

    @property
    def capacity(self) -> int:
        """Bytes held."""
        return 0 if self._flat is None else self._flat.numel()


@dataclasses.dataclass
class DispatchPlan:
    """A dispatch between its steps: where its rows go, the packed payload and, once counted, the receive splits.

    `payload` is [packed byte rows] (a view of the dispatcher's send buffer) or,
    on the differentiable path, the tensors that travel (hidden, weights, int32 ids),
    packed by the differentiable all_to_all in the same `row_format`.
    """

    route: DispatchRoute
    hidden_dtype: torch.dtype
    weights_dtype: torch.dtype
    hidden_size: int
    differentiable: bool
    payload: list[torch.Tensor]
    row_format: RowFormat
    recv_splits: list[int] | None = None
    stats: DispatchStats | None = None


@dataclasses.dataclass
class ExpertInput:
    """What the expert side of a dispatch receives.

    hidden [R, d], local_ids [R, k] (int64: ids among this rank's experts, -1 for
    slots not for this rank) and weights [R, k] (0 where local_ids is -1). Rows
    come grouped by source rank (rank order), each source's rows in its token
    order; `recv_splits[s]` rows came from rank s. The expert side returns one
    row per received row: the sum over its valid slots of weight * expert(row).
    On the packed path hidden and weights are strided views of the dispatcher's
    receive buffer (valid until its next dispatch); local_ids is a new tensor. `plan`
    is the dispatch's own (a DispatchPlan, or a low-latency dispatch's FixedPlan, whose
    rows are fixed blocks per source, padding included).
    """

    hidden: torch.Tensor
    local_ids: torch.Tensor
    weights: torch.Tensor
    recv_splits: list[int]
    plan: Any
    experts_per_rank: int

    @property
    def stats(self) -> DispatchStats | None:
        """The traffic of this dispatch (None for a low-latency one, which does not count it)."""
        return self.plan.stats

    def slots_per_expert(self) -> torch.Tensor:
        """[experts_per_rank] int64: valid slots routed to each local expert (sizes for a grouped GEMM)."""
        valid = self.local_ids[self.local_ids >= 0]
        return torch.bincount(valid, minlength=self.experts_per_rank)


class ExpertParallelDispatcher:
    """Dispatch tokens to the ranks owning their FFN experts and combine the expert outputs back.

    One per expert-parallel group and in-flight exchange (use two for two
    micro-batches in flight at once). The packed path keeps three buffers
    (send, receive, combine-receive), grown to the largest size seen and reused:
    an ExpertInput's hidden and weights are views of the receive buffer, valid
    until the next dispatch on this dispatcher; combine returns a new tensor.
    A dispatch or combine issued with `async_op=True` must be waited for before
    the next one of the same kind. The differentiable path allocates new tensors
    (autograd keeps them for backward) and reuses no buffer.
    """

    def __init__(self, comm: Communicator, n_routed_experts: int) -> None:
        self.comm = comm
        self.layout = ExpertLayout(n_routed_experts, comm.world_size)
        self.last_stats: DispatchStats | None = None
        self._send, self._recv, self._combine_recv = ReusedBuffer(), ReusedBuffer(), ReusedBuffer()
        self._pending: set[str] = set()

    # -- dispatch ---------------------------------------------------------------
    def dispatch(
        self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
        async_op: bool = False, differentiable: bool | None = None,
    ) -> Any:
        """Send each token's hidden state, once per rank owning one of its FFN experts; returns an ExpertInput.

        hidden [T, d]; topk_ids [T, k] (ids >= n_routed_experts are zero experts and
        stay here); topk_weights [T, k]. `differentiable`: True builds the exchange
        from autograd-aware collectives (gradients reach hidden and weights); None
        does so when grad is enabled and hidden or weights require grad. With
        `async_op=True` a Handle is returned at once whose wait() gives the
        ExpertInput: the counts exchange and then the payload run on the
        communicator's worker, so neither holds up the caller (the caller issues
        no other collective on this group until it has waited). The
        differentiable path exchanges the counts synchronously and issues only
        the payload async.
        """
        plan = self.dispatch_preprocess(hidden, topk_ids, topk_weights, differentiable)
        received = self.token_dispatch(plan, async_op=async_op)
        if async_op:
            return MappedHandle(received, lambda got: self.dispatch_postprocess(plan, got))
        return self.dispatch_postprocess(plan, received)

    def dispatch_preprocess(
        self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
        differentiable: bool | None = None,
    ) -> DispatchPlan:
        """Local step: route, and gather the travelling rows into send order (packed into the send buffer)."""
        check_inputs(hidden, topk_ids, topk_weights)
        if differentiable is None:
            differentiable = torch.is_grad_enabled() and (hidden.requires_grad or topk_weights.requires_grad)
        if not differentiable:
            self._not_pending("dispatch")
            hidden, topk_weights = hidden.detach(), topk_weights.detach()
        destinations = route(self.layout, topk_ids, topk_weights)
        if differentiable:
            fields = _travelling_fields(hidden, destinations)
            fmt = RowFormat.for_tensors(fields)
        else:
            k = destinations.local_ids.shape[1]
            fmt = RowFormat.of([(hidden.dtype, hidden.shape[1]), (destinations.weights.dtype, k), (_ID_DTYPE, k)])
            fields = [self._pack_send_rows(hidden, destinations, fmt)]
        return DispatchPlan(destinations, hidden.dtype, topk_weights.dtype, hidden.shape[1], differentiable, fields, fmt)

    def _pack_send_rows(self, hidden: torch.Tensor, destinations: DispatchRoute, fmt: RowFormat) -> torch.Tensor:
        """The travelling rows (hidden, weights, int32 local ids) written straight into the send buffer."""
        packed = self._send.rows(len(destinations.token_index), fmt.row_bytes, hidden.device)
        hidden_field = fmt.view(packed, 0)
        gathered = torch.index_select(hidden, 0, destinations.token_index, out=hidden_field)
        if gathered.data_ptr() != hidden_field.data_ptr():  # a kernel that would not write a strided view
            hidden_field.copy_(gathered)
        fmt.view(packed, 1).copy_(destinations.weights)
        fmt.view(packed, 2).copy_(destinations.local_ids)
        return packed

    def token_dispatch(self, plan: DispatchPlan, async_op: bool = False) -> Any:
        """Communication step: the row counts, then the payload (one uneven all_to_all), as one
        `all_to_all_with_counts` into the receive buffer; returns what arrived (a list of tensors), or a
        Handle of it. The differentiable path exchanges the counts synchronously, then the payload."""
        send_splits = plan.route.send_splits
        if plan.differentiable:
            counts = torch.tensor(send_splits, dtype=torch.int64, device=plan.route.token_index.device)
            self._counted(plan, self.comm.all_to_all(counts).tolist())
            return diff.all_to_all(self.comm, plan.payload, send_splits, plan.recv_splits, async_op=async_op)
        row_bytes, device = plan.row_format.row_bytes, plan.payload[0].device

        def receive_buffer(rows: int) -> torch.Tensor:
            return self._recv.rows(rows, row_bytes, device)

        got = self.comm.all_to_all_with_counts(plan.payload[0], send_splits, receive_buffer, async_op=async_op)
        if not async_op:
            return self._arrived(plan, got)
        self._pending.add("dispatch")  # still pending until the caller has waited, however early it arrives
        return MappedHandle(got, lambda received: self._done("dispatch", self._arrived(plan, received)))

    def _arrived(self, plan: DispatchPlan, received: tuple[torch.Tensor, list[int]]) -> list[torch.Tensor]:
        rows, recv_splits = received
        self._counted(plan, recv_splits)
        return [rows]

    def _counted(self, plan: DispatchPlan, recv_splits: list[int]) -> None:
        plan.recv_splits = recv_splits
        plan.stats = self.last_stats = self._stats(plan)

    def dispatch_postprocess(self, plan: DispatchPlan, received: Sequence[torch.Tensor]) -> ExpertInput:
        """Local step: split what arrived into hidden [R, d], local_ids [R, k] and weights [R, k]."""
        assert plan.recv_splits is not None
        fields = list(received) if plan.differentiable else unpack_rows(received[0], plan.row_format)
        hidden, weights, ids = fields
        return ExpertInput(hidden, ids.long(), weights, plan.recv_splits, plan, self.layout.experts_per_rank)

    # -- combine ------------------------------------------------------------------
    def combine(self, dispatched: ExpertInput, expert_output: torch.Tensor, async_op: bool = False) -> Any:
        """Send the expert outputs back and sum them per token: returns [T, d] in the original token order.

        `expert_output` has one row per row of `dispatched`. Rows for a token from
        several ranks are summed (in rank order); tokens with no FFN slot get zeros
        (their zero-expert slots are the caller's to add). Differentiable when the
        dispatch was. With `async_op=True` returns a Handle whose wait() gives the
        result; leave `expert_output` untouched until then.
        """
        back = self.token_combine(dispatched, expert_output, async_op=async_op)
        if async_op:
            return MappedHandle(back, lambda got: self.combine_postprocess(dispatched, got))
        return self.combine_postprocess(dispatched, back)

    def token_combine(self, dispatched: ExpertInput, expert_output: torch.Tensor, async_op: bool = False) -> Any:
        """Communication step: the reverse uneven all_to_all of the expert output rows; returns the rows
        in send order [S, d] (or a Handle of them)."""
        plan = dispatched.plan
        rows = sum(dispatched.recv_splits)
        if expert_output.dim() != 2 or expert_output.shape[0] != rows:
            raise ValueError(
                f"expert_output must be [{rows}, d] (one row per received row), got {list(expert_output.shape)}"
            )
        send_splits = plan.route.send_splits
        if plan.differentiable:
            return diff.all_to_all(self.comm, expert_output, dispatched.recv_splits, send_splits, async_op=async_op)
        self._not_pending("combine")
        expert_output = expert_output.detach()
        out = self._combine_recv.typed(
            sum(send_splits), expert_output.shape[1], expert_output.dtype, expert_output.device
        )
        got = self.comm.all_to_all(expert_output, out, dispatched.recv_splits, send_splits, async_op=async_op)
        if not async_op:
            return got
        self._pending.add("combine")
        return MappedHandle(got, lambda back: self._done("combine", back))

    def combine_postprocess(self, dispatched: ExpertInput, back: torch.Tensor) -> torch.Tensor:
        """Local step: sum the returned rows into a new [T, d] tensor in token order."""
        destinations = dispatched.plan.route
        out = back.new_zeros((destinations.num_tokens, back.shape[1]))
        return out.index_add_(0, destinations.token_index, back)

    # -- helpers ------------------------------------------------------------------
    def _stats(self, plan: DispatchPlan) -> DispatchStats:
        destinations = plan.route
        row_bytes = plan.row_format.row_bytes
        rows, own = destinations.token_index.shape[0], destinations.send_splits[self.comm.rank]
        k = destinations.local_ids.shape[1]
        hidden_bytes = plan.hidden_size * plan.hidden_dtype.itemsize
        naive = destinations.num_tokens * k * (hidden_bytes + _NAIVE_ID_BYTES + plan.weights_dtype.itemsize)
        return DispatchStats(
            tokens=destinations.num_tokens, ffn_slots=destinations.ffn_slots, rows_sent=rows, rows_to_peers=rows - own,
            rows_received=sum(plan.recv_splits or []), bytes_sent=rows * row_bytes,
            bytes_to_peers=(rows - own) * row_bytes, naive_bytes=naive,
            count_bytes=self.comm.world_size * _NAIVE_ID_BYTES,
        )

    def _not_pending(self, kind: str) -> None:
        if kind in self._pending:
            raise RuntimeError(f"wait for the previous async {kind} on this dispatcher before starting another")

    def _done(self, kind: str, result: Any) -> Any:
        self._pending.discard(kind)
        return result


def check_inputs(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> None:
    """ValueError unless hidden is [T, d], topk_ids [T, k] integers and topk_weights [T, k] floats."""
    if hidden.dim() != 2 or topk_ids.dim() != 2 or topk_weights.shape != topk_ids.shape:
        raise ValueError(
            f"expected hidden [T, d], topk_ids [T, k] and topk_weights [T, k]; got {list(hidden.shape)}, "
            f"{list(topk_ids.shape)} and {list(topk_weights.shape)}"
        )
    if hidden.shape[0] != topk_ids.shape[0]:
        raise ValueError(f"hidden has {hidden.shape[0]} tokens but topk_ids has {topk_ids.shape[0]}")
    if topk_ids.is_floating_point() or topk_ids.is_complex() or not topk_weights.is_floating_point():
        raise ValueError(
            f"topk_ids must be integers and topk_weights floats; got {topk_ids.dtype}, {topk_weights.dtype}"
        )


def _travelling_fields(hidden: torch.Tensor, destinations: DispatchRoute) -> list[torch.Tensor]:
    """The rows that travel, in send order: hidden [S, d], weights [S, k], local ids [S, k] (as int32)."""
    return [hidden.index_select(0, destinations.token_index), destinations.weights,
            destinations.local_ids.to(_ID_DTYPE)]
