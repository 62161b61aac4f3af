"""Each kind of expert kernel checked on a small problem against the definition (see moeport.kernels)."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F


def verify(kind: str, kernel: Callable[..., Any], device: torch.device, dtype: torch.dtype) -> None:
    """Run `kernel` of `kind` on a small problem against the definition: AssertionError if it answers
    wrong, NotImplementedError if it does not take `dtype`, and whatever else the kernel raises."""
    with torch.no_grad():
        _CHECKS[kind](kernel, device, dtype)


def _check_grouped_matmul(kernel, device, dtype) -> None:
    """Small integers: every summation order gives the exact answer, so nothing less is accepted."""
    gen = torch.Generator().manual_seed(0)
    sizes = [3, 0, 6, 1]  # an empty group in the middle
    a = torch.randint(-3, 4, (sum(sizes), 16), generator=gen).to(device=device, dtype=dtype)
    b = torch.randint(-3, 4, (len(sizes), 16, 8), generator=gen).to(device=device, dtype=dtype)
    want = torch.cat([rows @ b[g] for g, rows in enumerate(a.split(sizes))])
    got = kernel(a, b, sizes, torch.full_like(want, float("nan")))
    if got.shape != want.shape or not torch.equal(got, want):
        raise AssertionError("grouped_matmul answered wrong on a small problem")


def _check_fused_experts(kernel, device, dtype) -> None:
    """Random values, a slot for no local expert among them; within float32 rounding of the slot-by-slot sum."""
    gen = torch.Generator().manual_seed(0)
    rows, k, count, hidden, inter = 7, 3, 4, 16, 8
    x = torch.randn(rows, hidden, generator=gen).to(device=device, dtype=dtype)
    ids = torch.randint(-1, count, (rows, k), generator=gen).to(device)  # -1: a slot for no expert here
    weights = torch.rand(rows, k, generator=gen).to(device)
    gate_up = (torch.randn(count, hidden, 2 * inter, generator=gen) * 0.3).to(device=device, dtype=dtype)
    down = (torch.randn(count, inter, hidden, generator=gen) * 0.3).to(device=device, dtype=dtype)
    want = torch.zeros_like(x)
    for row, slot in (ids >= 0).nonzero().tolist():
        gate, up = (x[row] @ gate_up[ids[row, slot]]).chunk(2)
        want[row] += (F.silu(gate) * up * weights[row, slot].to(dtype)) @ down[ids[row, slot]]
    results = torch.empty(rows * k, hidden, device=device, dtype=dtype)
    got = kernel(x, ids, weights, gate_up, down, results, torch.full_like(x, float("nan")))
    if got.shape != want.shape or not torch.allclose(got.double(), want.double(), rtol=1e-4, atol=1e-5):
        raise AssertionError("fused_experts answered wrong on a small problem")


_CHECKS = {"grouped_matmul": _check_grouped_matmul, "fused_experts": _check_fused_experts}
