"""The LongCat-Flash router and its zero-computation experts.

Router: an fp32 linear `classifier` over the N FFN + Z zero experts, softmax over all of
them; the top-k is chosen on score + `e_score_correction_bias` (the bias only steers the
choice); the weights are the chosen softmax scores times `routed_scaling_factor`.

Zero-computation experts return their input: their share of the output, input times the
summed weights of the zero slots, is computed where the token lives and never travels.
Only FFN-expert slots go to the experts.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from moeport.base.dtypes import in_dtype
from moeport.model.config import LongcatConfig


@dataclasses.dataclass
class Routing:
    """The router's choice for T tokens: expert ids and weights [T, k]."""

    ids: torch.Tensor  # int64; ids >= n_routed_experts are zero experts
    weights: torch.Tensor  # float32, already times routed_scaling_factor
    scores: torch.Tensor | None = None  # float32 [T, N + Z]: the softmax over every expert (training's balance loss)


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
        scores = F.linear(in_dtype(x, torch.float32), in_dtype(self.classifier.weight, torch.float32)).softmax(dim=-1)
        with torch.no_grad():
            ids = torch.topk(scores + self.e_score_correction_bias, self.top_k, dim=-1, sorted=False).indices
        return Routing(ids, scores.gather(1, ids) * self.scale, scores)


def zero_expert_output(x: torch.Tensor, routing: Routing, n_routed_experts: int) -> torch.Tensor:
    """What the zero (identity) experts add for each token: x times the summed weights of its zero slots."""
    zero_weight = torch.where(routing.ids >= n_routed_experts, routing.weights, 0.0).sum(-1, keepdim=True)
    return in_dtype(x * zero_weight, x.dtype)


def ffn_slots(routing: Routing, n_routed_experts: int) -> torch.Tensor:
    """The FFN-expert ids [T, k] of the routed slots, -1 for zero-expert slots: the local ids of a rank
    that holds every FFN expert."""
    return torch.where(routing.ids < n_routed_experts, routing.ids, -1)
