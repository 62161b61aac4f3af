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
    """The SwiGLU FFN experts one rank holds, as stacked weights.

    gate_up [E, 2I, H] (gate rows first, then up) and down [E, H, I], for the
    experts `first` .. `first + E - 1` of the model.
    """

    def __init__(self, config: LongcatConfig, first: int, count: int) -> None:
        super().__init__()
        self.first, self.count = first, count
        i, h = config.expert_ffn_hidden_size, config.hidden_size
        self.gate_up = nn.Parameter(torch.empty(count, 2 * i, h))
        self.down = nn.Parameter(torch.empty(count, h, i))

    def forward(self, x: torch.Tensor, local_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """For each row of x [N, H]: sum over its valid slots (local id >= 0) of weight * expert(row).

        Slots are sorted by expert once; each expert then runs one matmul over its
        contiguous rows. One host synchronisation per call (the per-expert counts), none per expert.
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
        counts = torch.bincount(experts, minlength=self.count).tolist()
        gathered = x[rows]
        results = torch.empty_like(gathered)
        start = 0
        for expert, size in enumerate(counts):
            if size:
                segment = gathered[start:start + size]
                gate, up = F.linear(segment, self.gate_up[expert]).chunk(2, dim=-1)
                results[start:start + size] = F.linear(F.silu(gate) * up, self.down[expert])
                start += size
        weighted = (results * weights.reshape(-1)[slots].unsqueeze(1)).to(x.dtype)
        return out.index_add_(0, rows, weighted)


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
