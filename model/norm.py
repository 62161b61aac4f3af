"""RMSNorm as LongCat-Flash uses it: normalise in float32, scale in the input dtype."""

from __future__ import annotations

import torch
from torch import nn

from moeport.base.dtypes import in_dtype


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
        self._shifts: dict[torch.device, torch.Tensor] = {}  # see _shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = in_dtype(x, torch.float32)
        # scale / sqrt(mean(h^2) + eps) = 1 / sqrt(|h|^2 / (n scale^2) + eps / scale^2): three kernels
        norm = torch.linalg.vector_norm(h, dim=-1, keepdim=True)
        inverse_rms = torch.addcmul(self._shift(h.device), norm, norm, value=1.0 / (h.shape[-1] * self.scale**2)).rsqrt_()
        normed = in_dtype(h * inverse_rms, x.dtype)
        if torch.is_grad_enabled() or self.weight.dtype != normed.dtype:
            return self.weight * normed
        return normed.mul_(self.weight)  # the same product without a new tensor

    def _shift(self, device: torch.device) -> torch.Tensor:
        """eps / scale^2 as a float32 scalar tensor on `device` (made once per device, outside inference
        mode so that autograd may use it too)."""
        shift = self._shifts.get(device)
        if shift is None:
            with torch.inference_mode(False):
                shift = self._shifts[device] = torch.tensor(self.eps / self.scale**2, dtype=torch.float32, device=device)
        return shift
