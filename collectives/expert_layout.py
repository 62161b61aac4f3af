"""Which rank owns which FFN expert, and where the rows of one dispatch go.

The FFN experts are split evenly, in contiguous blocks, over the ranks of the
expert-parallel group: with N experts and E ranks, rank r owns experts
r*N/E .. (r+1)*N/E - 1. `ExpertLayout` is the one place that says so; the model,
its checkpoints and the dispatcher all ask it. Expert ids >= N are zero-computation
experts: no rank owns them, so their slots never leave the rank that routed them.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class ExpertLayout:
    """Which rank of the expert-parallel group owns which FFN expert (contiguous, equal blocks)."""

    n_routed_experts: int
    ep_size: int

    def __post_init__(self) -> None:
        if self.ep_size < 1 or self.n_routed_experts < 1 or self.n_routed_experts % self.ep_size:
            raise ValueError(
                f"n_routed_experts ({self.n_routed_experts}) must be a positive multiple of the "
                f"expert-parallel group size ({self.ep_size})"
            )

    @property
    def experts_per_rank(self) -> int:
        """FFN experts each rank owns."""
        return self.n_routed_experts // self.ep_size

    def local_experts(self, rank: int) -> range:
        """The global ids of the FFN experts `rank` owns."""
        return range(rank * self.experts_per_rank, (rank + 1) * self.experts_per_rank)

    def owner_of(self, expert: int) -> int:
        """The rank owning FFN expert `expert`."""
        if not 0 <= expert < self.n_routed_experts:
            raise ValueError(f"{expert} is not an FFN expert id (0 .. {self.n_routed_experts - 1})")
        return expert // self.experts_per_rank

    def owner(self, expert_ids: torch.Tensor) -> torch.Tensor:
        """The rank owning each id; `ep_size` for ids that are not FFN experts (zero experts, negative ids)."""
        ffn = (expert_ids >= 0) & (expert_ids < self.n_routed_experts)
        return torch.where(ffn, expert_ids.div(self.experts_per_rank, rounding_mode="floor"), self.ep_size)


@dataclasses.dataclass
class DispatchRoute:
    """Where the rows of one dispatch go, worked out locally from the top-k ids.

    One row per distinct (token, destination rank), ordered by destination rank,
    then by token. `local_ids` / `weights` are [rows, k]: the slot's expert id on
    the destination rank and its weight, or -1 and 0 where the slot is not for
    that rank (another rank's expert, or a zero expert).
    """

    token_index: torch.Tensor
    send_splits: list[int]
    local_ids: torch.Tensor
    weights: torch.Tensor
    num_tokens: int
    ffn_slots: int


def route(layout: ExpertLayout, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> DispatchRoute:
    """The DispatchRoute of a dispatch: local work only, no communication (one host sync for the split sizes)."""
    ids = topk_ids.long()
    tokens = ids.shape[0]
    owner = layout.owner(ids)
    hit = torch.zeros((tokens, layout.ep_size + 1), dtype=torch.bool, device=ids.device)
    hit.scatter_(1, owner, True)
    hit = hit[:, : layout.ep_size]
    dest, token_index = hit.t().nonzero(as_tuple=True)
    counts = hit.sum(dim=0)
    mine = owner[token_index] == dest[:, None]
    local_ids = torch.where(mine, ids[token_index] - dest[:, None] * layout.experts_per_rank, -1)
    weights = topk_weights[token_index].masked_fill(~mine, 0)
    ffn_slots = int((owner < layout.ep_size).sum())
    return DispatchRoute(token_index, counts.tolist(), local_ids, weights, tokens, ffn_slots)
