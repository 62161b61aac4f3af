"""The dense SwiGLU feed-forward block (gate, up, down)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeport.model.fused import fused_linear_weight, save_as_parts


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): the dense FFN of each sublayer."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        # gate_proj and up_proj as one weight: one matmul for both (checkpoint names kept)
        self.gate_up_proj = fused_linear_weight(hidden_size, [intermediate_size, intermediate_size])
        save_as_parts(self, "gate_up_proj", [("gate_proj.weight", intermediate_size), ("up_proj.weight", intermediate_size)])
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.gate_up_proj).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)
