"""The LongCat-Flash MoE: router, zero-computation experts and the FFN experts a rank holds.

Router: an fp32 linear `classifier` over the N FFN + Z zero experts, softmax over all of
them; the top-k is chosen on score + `e_score_correction_bias` (the bias only steers the
choice); the weights are the chosen softmax scores times `routed_scaling_factor`.

Zero-computation experts return their input: their share of the output, input times the
summed weights of the zero slots, is computed where the token lives and never travels.
Only FFN-expert slots go to the experts (through an expert exchange: local when the
expert-parallel group has one rank, dispatch/combine over it otherwise).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from moeport.collectives.base import CompletedHandle, Handle
from moeport.model.config import LongcatConfig


@dataclasses.dataclass
class Routing:
    """The router's choice for T tokens: expert ids and weights [T, k]."""

    ids: torch.Tensor  # int64; ids >= n_routed_experts are zero experts
    weights: torch.Tensor  # float32, already times routed_scaling_factor


class Router(nn.Module):
    """Top-k softmax router with a selection-only correction bias."""

    def __init__(self, config: LongcatConfig) -> None:
        super().__init__()
        self.top_k = config.moe_topk
        self.scale = config.routed_scaling_factor
        self.classifier = nn.Linear(config.hidden_size, config.num_experts_total, bias=False, dtype=torch.float32)
        self.register_buffer("e_score_correction_bias", torch.zeros(config.num_experts_total, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> Routing:
        """Route x [T, hidden]."""
        scores = F.linear(x.to(torch.float32), self.classifier.weight.to(torch.float32)).softmax(dim=-1)
        with torch.no_grad():
            ids = torch.topk(scores + self.e_score_correction_bias, self.top_k, dim=-1, sorted=False).indices
        return Routing(ids, scores.gather(1, ids) * self.scale)


def zero_expert_output(x: torch.Tensor, routing: Routing, n_routed_experts: int) -> torch.Tensor:
    """What the zero (identity) experts add for each token: x times the summed weights of its zero slots."""
    zero_weight = torch.where(routing.ids >= n_routed_experts, routing.weights, 0.0).sum(-1, keepdim=True)
    return (x * zero_weight).to(x.dtype)


def ffn_slots(routing: Routing, n_routed_experts: int, first: int = 0, count: int | None = None) -> torch.Tensor:
    """Local expert ids [T, k] of the slots routed to experts first..first+count-1; -1 elsewhere."""
    count = n_routed_experts if count is None else count
    local = routing.ids - first
    return torch.where((local >= 0) & (local < count) & (routing.ids < n_routed_experts), local, -1)


class ExpertFFNs(nn.Module):
    """The SwiGLU FFN experts one rank holds, as stacked weights laid out for `x @ w`.

    gate_up [E, H, 2I] (gate columns first, then up) and down [E, I, H], for the
    experts `first` .. `first + E - 1` of the model (the checkpoint's per-expert
    [I, H] / [H, I] matrices, transposed once at load time).
    """

    #: When the slots per local expert average at least this many, and padding every
    #: expert to the busiest adds at most PADDING_LIMIT of the work, two batched matmuls
    #: over all experts beat a matmul per expert.
    BATCHED_FROM_SLOTS_PER_EXPERT = 16
    PADDING_LIMIT = 0.5

    def __init__(self, config: LongcatConfig, first: int, count: int) -> None:
        super().__init__()
        self.first, self.count = first, count
        i, h = config.expert_ffn_hidden_size, config.hidden_size
        self.gate_up = nn.Parameter(torch.empty(count, h, 2 * i))
        self.down = nn.Parameter(torch.empty(count, i, h))

    def forward(self, x: torch.Tensor, local_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """For each row of x [N, H]: sum over its valid slots (local id >= 0) of weight * expert(row).

        Slots are sorted by expert once, with one host synchronisation per call (the
        per-expert counts) and none per expert. Many slots run as two batched
        matmuls over all experts (rows padded to the busiest expert); few slots as
        one matmul per expert that has any.
        """
        n, k = local_ids.shape
        out = torch.zeros_like(x)
        flat = local_ids.reshape(-1)
        slots = (flat >= 0).nonzero().squeeze(1)
        if slots.numel() == 0:
            return out
        experts = flat[slots]
        order = torch.argsort(experts, stable=True)
        slots, experts = slots[order], experts[order]
        rows = slots // k
        counts = torch.bincount(experts, minlength=self.count)
        sizes = counts.tolist()
        total = len(experts)
        padded_total = max(sizes) * self.count
        if total >= self.BATCHED_FROM_SLOTS_PER_EXPERT * self.count and padded_total <= (1 + self.PADDING_LIMIT) * total:
            results = self._batched(x[rows], experts, counts, max(sizes))
        else:
            results = self._per_expert(x[rows], sizes)
        weighted = (results * weights.reshape(-1)[slots].unsqueeze(1)).to(x.dtype)
        return out.index_add_(0, rows, weighted)

    def _per_expert(self, gathered: torch.Tensor, counts: list[int]) -> torch.Tensor:
        results = torch.empty_like(gathered)
        start = 0
        for expert, size in enumerate(counts):
            if size:
                segment = gathered[start:start + size]
                gate, up = (segment @ self.gate_up[expert]).chunk(2, dim=-1)
                results[start:start + size] = (F.silu(gate) * up) @ self.down[expert]
                start += size
        return results

    def _batched(self, gathered: torch.Tensor, experts: torch.Tensor, counts: torch.Tensor, capacity: int) -> torch.Tensor:
        starts = torch.cumsum(counts, 0) - counts
        padded_row = experts * capacity + torch.arange(experts.numel(), device=experts.device) - starts[experts]
        hidden = gathered.shape[1]
        padded = gathered.new_zeros(self.count * capacity, hidden).index_copy_(0, padded_row, gathered)
        gate, up = torch.bmm(padded.view(self.count, capacity, hidden), self.gate_up).chunk(2, dim=-1)
        outputs = torch.bmm(F.silu(gate) * up, self.down)
        return outputs.view(self.count * capacity, hidden).index_select(0, padded_row)


class LocalExchange:
    """The expert exchange when this rank holds every FFN expert: nothing travels."""

    def __init__(self, n_routed_experts: int) -> None:
        self.n_routed_experts = n_routed_experts

    def dispatch(self, tokens: torch.Tensor, routing: Routing) -> Handle:
        """The FFN-expert slots of each token, as (rows, local ids, weights)."""
        return CompletedHandle((tokens, ffn_slots(routing, self.n_routed_experts), routing.weights))

    def compute(self, experts: ExpertFFNs, received: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The weighted expert outputs, one row per received row."""
        return experts(*received)

    def combine(self, expert_out: torch.Tensor) -> Handle:
        """The expert outputs back in token order (already there)."""
        return CompletedHandle(expert_out)
