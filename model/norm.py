"""RMSNorm as LongCat-Flash uses it: normalise in float32, scale in the input dtype."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square normalisation with a learned per-channel weight."""

    def __init__(self, size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (casts only where needed: even a cast to the same dtype costs a call, and this runs often while decoding)
        h = x if x.dtype == torch.float32 else x.to(torch.float32)
        inverse_rms = torch.linalg.vecdot(h, h).unsqueeze(-1).div_(h.shape[-1]).add_(self.eps).rsqrt_()  # 1 / rms
        normed = h * inverse_rms
        if normed.dtype != x.dtype:
            normed = normed.to(x.dtype)
        if torch.is_grad_enabled() or self.weight.dtype != normed.dtype:
            return self.weight * normed
        return normed.mul_(self.weight)  # the same product without a new tensor
