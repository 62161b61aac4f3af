"""RMSNorm as LongCat-Flash uses it: normalise in float32, scale in the input dtype."""

from __future__ import annotations

import torch
from torch import nn

from moeport.model.dtypes import in_dtype


class RMSNorm(nn.Module):
    """Root-mean-square normalisation with a learned per-channel weight.

    `scale` multiplies the output by a constant (LongCat's variance alignment of the kv
    latent) at no extra cost: it is folded into the normalisation.
    """

    def __init__(self, size: int, eps: float = 1e-6, scale: float = 1.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = in_dtype(x, torch.float32)
        # scale / sqrt(mean(h^2) + eps) = 1 / sqrt(sum(h^2) / (n scale^2) + eps / scale^2)
        square = self.scale * self.scale
        inverse_rms = torch.linalg.vecdot(h, h).unsqueeze(-1).div_(h.shape[-1] * square).add_(self.eps / square).rsqrt_()
        normed = in_dtype(h * inverse_rms, x.dtype)
        if torch.is_grad_enabled() or self.weight.dtype != normed.dtype:
            return self.weight * normed
        return normed.mul_(self.weight)  # the same product without a new tensor
