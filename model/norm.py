"""RMSNorm as LongCat-Flash uses it: normalise in float32, scale in the input dtype."""

from __future__ import annotations

import torch
from torch import nn

from moeport.model.dtypes import in_dtype


class RMSNorm(nn.Module):
    """Root-mean-square normalisation with a learned per-channel weight."""

    def __init__(self, size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = in_dtype(x, torch.float32)
        inverse_rms = torch.linalg.vecdot(h, h).unsqueeze(-1).div_(h.shape[-1]).add_(self.eps).rsqrt_()  # 1 / rms
        normed = in_dtype(h * inverse_rms, x.dtype)
        if torch.is_grad_enabled() or self.weight.dtype != normed.dtype:
            return self.weight * normed
        return normed.mul_(self.weight)  # the same product without a new tensor
