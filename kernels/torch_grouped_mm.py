"""torch's own grouped matmul (`torch.nn.functional.grouped_mm`), where the device and dtype have one that is right."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from moeport.kernels.checks import verify

_WORKS: dict[tuple[str, torch.dtype], bool] = {}


def works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `F.grouped_mm` (no autograd) runs and is right for this device type and dtype; probed
    once on a small problem, as a device's grouped_matmul kernel is, since the kernels torch has
    differ by device."""
    key = (device.type, dtype)
    if key not in _WORKS:
        _WORKS[key] = _probe(device, dtype)
    return _WORKS[key]


def _probe(device: torch.device, dtype: torch.dtype) -> bool:
    grouped = getattr(F, "grouped_mm", None)
    if grouped is None:
        return False

    def by_sizes(a, b, sizes, out):  # F.grouped_mm, called as a device's grouped matmul is
        ends = torch.tensor(list(itertools.accumulate(sizes)), dtype=torch.int32, device=a.device)
        return out.copy_(grouped(a, b, offs=ends))

    try:
        verify("grouped_matmul", by_sizes, device, dtype)
    except (AssertionError, RuntimeError, NotImplementedError, TypeError, ValueError):
        return False
    return True
