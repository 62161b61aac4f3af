"""Low-latency expert-parallel dispatch and combine: fixed room per rank, no counts, no host synchronisation.

The normal dispatch (expert_parallel.py) sends exactly the rows each rank needs, so the
receivers must learn the row counts first: a small all_to_all, a host synchronisation,
then the payload. For a decoding step, whose few tokens make the counts exchange cost
about as much as the payload, this mode (after DeepEP's low-latency kernels, which
LongCat-Flash is served with) gives every rank a fixed block of `max_rows` rows for
every destination, `max_rows` being the most tokens a rank may route in one step: a
token travels to a rank at most once, so no block can overflow. Each direction is then
ONE all_to_all of equal splits, issued from the compute thread as the collective
library's own asynchronous work, with nothing to learn first; the receiver tells a
travelling row from padding by its slots (a padding row has no slot for the rank: all
its local ids are -1, its weights 0, its hidden state zeros), and the experts give it a
zero row. The bytes sent are those of the full blocks: the mode trades bandwidth for
latency, and suits steps whose tokens are near `max_rows`.

Results are bit-identical to the normal mode: each rank's experts see the same rows in
the same order (padding rows aside), and each token sums its rows in rank order.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from moeport.collectives.base import Communicator, MappedHandle
from moeport.collectives.differentiable import RowFormat, unpack_rows
from moeport.collectives.expert_layout import ExpertLayout
from moeport.collectives.expert_parallel import ExpertInput, ReusedBuffer, check_inputs

#: dtype of the local expert ids inside a travelling row, as in the normal dispatch.
_ID_DTYPE = torch.int32


@dataclasses.dataclass
class FixedPlan:
    """A low-latency dispatch between its steps.

    `pair_token` [T * E] is the token of each (token, destination) pair, token-major, and
    `pair_row` [T * E] that pair's row in the send blocks (destination * max_rows +
    position), or E * max_rows for a pair that does not travel (the token has no slot on
    that rank). `payload` is the packed send blocks [E * max_rows, row_bytes].
    """

    pair_token: torch.Tensor
    pair_row: torch.Tensor
    num_tokens: int
    max_rows: int
    row_format: RowFormat
    payload: torch.Tensor
    stats: None = None  # what a dispatch moved is not counted here: that would cost the host synchronisation


class LowLatencyDispatcher:
    """Dispatch tokens to the ranks owning their FFN experts, and combine back, in blocks of `max_rows` rows.

    The same steps as ExpertParallelDispatcher (preprocess, communicate, postprocess, each
    way) and the same ExpertInput for the experts, whose rows are the blocks of every source
    rank in rank order, padding included. One per expert-parallel group and exchange in
    flight; buffers are kept and reused as the normal dispatcher's are. No autograd.
    """

    def __init__(self, comm: Communicator, layout: ExpertLayout, max_rows: int) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be positive, got {max_rows}")
        self.comm = comm
        self.layout = layout
        self.max_rows = max_rows
        self._send, self._recv, self._combine_recv = ReusedBuffer(), ReusedBuffer(), ReusedBuffer()

    # -- dispatch ---------------------------------------------------------------
    def dispatch(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                 async_op: bool = False) -> Any:
        """The three dispatch steps chained: an ExpertInput, or a Handle of it."""
        plan = self.dispatch_preprocess(hidden, topk_ids, topk_weights)
        received = self.token_dispatch(plan, async_op=async_op)
        if async_op:
            return MappedHandle(received, lambda got: self.dispatch_postprocess(plan, got))
        return self.dispatch_postprocess(plan, received)

    def dispatch_preprocess(self, hidden: torch.Tensor, topk_ids: torch.Tensor,
                            topk_weights: torch.Tensor) -> FixedPlan:
        """Local step: each token's rows written into its destinations' blocks, padding cleared."""
        check_inputs(hidden, topk_ids, topk_weights)
        tokens, k = topk_ids.shape
        if tokens > self.max_rows:
            raise ValueError(f"{tokens} tokens on this rank exceed the low-latency dispatch's room of "
                             f"{self.max_rows} per rank (moe.max_tokens_per_rank)")
        hidden, topk_weights = hidden.detach(), topk_weights.detach()
        ranks, per_rank = self.layout.ep_size, self.layout.experts_per_rank
        ids = topk_ids.long()
        owner = self.layout.owner(ids)  # [T, k]; ep_size for zero experts
        destinations = torch.arange(ranks, device=ids.device)
        mine = owner[:, None, :] == destinations[None, :, None]  # [T, E, k]: the slot is for that rank
        sends = mine.any(-1)  # [T, E]
        position = sends.to(torch.int64).cumsum(0) - 1  # the token's place in each destination's block
        pair_row = torch.where(sends, destinations * self.max_rows + position, ranks * self.max_rows).reshape(-1)
        pair_token = torch.arange(tokens, device=ids.device).repeat_interleave(ranks)
        local_ids = torch.where(mine, ids[:, None, :] - (destinations * per_rank)[None, :, None], -1)
        weights = torch.where(mine, topk_weights[:, None, :], torch.zeros((), dtype=topk_weights.dtype,
                                                                         device=ids.device))
        fmt = RowFormat.of([(hidden.dtype, hidden.shape[1]), (topk_weights.dtype, k), (_ID_DTYPE, k)])
        blocks = self._send.rows(ranks * self.max_rows + 1, fmt.row_bytes, hidden.device)  # + a row for pairs that stay
        blocks.zero_()
        fmt.view(blocks, 2).fill_(-1)
        fmt.view(blocks, 0).index_copy_(0, pair_row, hidden.index_select(0, pair_token))
        fmt.view(blocks, 1).index_copy_(0, pair_row, weights.reshape(-1, k))
        fmt.view(blocks, 2).index_copy_(0, pair_row, local_ids.reshape(-1, k).to(_ID_DTYPE))
        return FixedPlan(pair_token, pair_row, tokens, self.max_rows, fmt, blocks[: ranks * self.max_rows])

    def token_dispatch(self, plan: FixedPlan, async_op: bool = False) -> Any:
        """Communication step: one all_to_all of equal blocks; what arrived, or a Handle of it."""
        recv = self._recv.rows(plan.payload.shape[0], plan.row_format.row_bytes, plan.payload.device)
        return self.comm.all_to_all(plan.payload, recv, async_op=async_op)

    def dispatch_postprocess(self, plan: FixedPlan, received: torch.Tensor) -> ExpertInput:
        """Local step: hidden, local_ids and weights of every received row, padding included."""
        hidden, weights, ids = unpack_rows(received, plan.row_format)
        splits = [plan.max_rows] * self.layout.ep_size
        return ExpertInput(hidden, ids.long(), weights, splits, plan, self.layout.experts_per_rank)

    # -- combine ------------------------------------------------------------------
    def combine(self, dispatched: ExpertInput, expert_output: torch.Tensor, async_op: bool = False) -> Any:
        """The combine steps chained: [T, d] in token order, or a Handle of it."""
        back = self.token_combine(dispatched, expert_output, async_op=async_op)
        if async_op:
            return MappedHandle(back, lambda got: self.combine_postprocess(dispatched, got))
        return self.combine_postprocess(dispatched, back)

    def token_combine(self, dispatched: ExpertInput, expert_output: torch.Tensor, async_op: bool = False) -> Any:
        """Communication step: the expert output rows back, one all_to_all of equal blocks; the rows in
        send-block order, or a Handle of them."""
        rows = dispatched.plan.payload.shape[0]
        if expert_output.dim() != 2 or expert_output.shape[0] != rows:
            raise ValueError(f"expert_output must be [{rows}, d] (one row per received row), got "
                             f"{list(expert_output.shape)}")
        expert_output = expert_output.detach()
        back = self._combine_recv.typed(rows + 1, expert_output.shape[1], expert_output.dtype, expert_output.device)
        back[rows].zero_()  # the row that pairs which did not travel read: they add nothing
        return self.comm.all_to_all(expert_output, back[:rows], async_op=async_op)

    def combine_postprocess(self, dispatched: ExpertInput, back: torch.Tensor) -> torch.Tensor:
        """Local step: each token's rows summed in rank order into a new [T, d]."""
        plan = dispatched.plan
        with_zero_row = self._combine_recv.typed(back.shape[0] + 1, back.shape[1], back.dtype, back.device)
        out = back.new_zeros((plan.num_tokens, back.shape[1]))
        return out.index_add_(0, plan.pair_token, with_zero_row.index_select(0, plan.pair_row))
