"""Kernels a device offers the MoE experts beyond torch's own operators, looked up by device type.

Two kinds, each optional:
- "fused_experts": the whole FFN-expert layer in one call,
  `kernel(x [N, H], local_ids [N, k], weights [N, k], gate_up [E, H, 2I], down [E, I, H], results, out)`
  writes into `out` [N, H], for each row, the sum over its slots with a local id >= 0 of
  weight * SwiGLU_expert(row); `results` [N * k, H] is scratch it may use.
- "grouped_matmul": `kernel(a, b, sizes, out)` writes, for each group g, the next `sizes[g]`
  rows of `a` [S, K] times `b[g]` [K, N] into the same rows of `out` [S, N] (empty groups
  allowed): the experts' GEMMs with no padding.

Kernels are named by "package.module:factory" (imported and called when first asked for; the
factory returns the kernel, or None where it cannot run on this machine), so looking one up
never imports what a device does not use. A plugin offers its own with `register`. Every
kernel is checked once per device type and dtype on a small problem against the plain
definition before it is used; one that raises or answers wrong is not used, with a warning.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F

from moeport.base.errors import UserError

KINDS = ("fused_experts", "grouped_matmul")

KERNELS: dict[tuple[str, str], str | Callable[..., Any]] = {
    ("fused_experts", "cpu"): "moeport.backends.cpu_fused_experts:fused_experts",
    ("grouped_matmul", "cpu"): "moeport.backends.mkl_grouped_matmul:grouped_matmul",
}

_CHECKED: dict[tuple[str, str, torch.dtype], Callable[..., Any] | None] = {}


def register(kind: str, device_type: str, kernel: str | Callable[..., Any]) -> None:
    """Offer a kernel of `kind` for `device_type`: the kernel itself, or the "package.module:factory"
    that makes it. It replaces any earlier one and is checked again on first use."""
    if kind not in KINDS:
        raise ValueError(f"unknown kernel kind {kind!r}; expected one of {', '.join(KINDS)}")
    KERNELS[(kind, device_type)] = kernel
    for key in [key for key in _CHECKED if key[:2] == (kind, device_type)]:
        del _CHECKED[key]


def kernel_for(kind: str, device: torch.device, dtype: torch.dtype) -> Callable[..., Any] | None:
    """The checked kernel of `kind` for tensors of this device and dtype, or None where there is none."""
    key = (kind, device.type, dtype)
    if key not in _CHECKED:
        _CHECKED[key] = _checked(kind, device, dtype)
    return _CHECKED[key]


def in_use(device: torch.device, dtype: torch.dtype) -> dict[str, str | None]:
    """For each kind, the name of the kernel the experts use on this device and dtype (None: torch's operators)."""
    return {kind: load(kind, device.type)[0] if kernel_for(kind, device, dtype) is not None else None for kind in KINDS}


def load(kind: str, device_type: str) -> tuple[str, Callable[..., Any] | None]:
    """The name of the kernel of `kind` offered for `device_type` ("" if none) and the kernel itself (None
    where there is none or its factory found nothing to run here), not yet checked. A kernel whose module
    does not import is an error naming it, never a silent fallback."""
    target = KERNELS.get((kind, device_type))
    if target is None:
        return "", None
    if not isinstance(target, str):
        return getattr(target, "__qualname__", repr(target)), target
    module_name, _, attr = target.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"expert kernel {target!r} failed to import: {type(exc).__name__}: {exc}") from exc
    return target, factory()


def verify(kind: str, kernel: Callable[..., Any], device: torch.device, dtype: torch.dtype) -> None:
    """Run `kernel` on a small problem against the plain definition: AssertionError if it answers wrong,
    NotImplementedError if it does not take `dtype`, and whatever else the kernel raises."""
    with torch.no_grad():
        _CHECKS[kind](kernel, device, dtype)


def _checked(kind: str, device: torch.device, dtype: torch.dtype) -> Callable[..., Any] | None:
    name, kernel = load(kind, device.type)
    if kernel is None:
        return None
    try:
        verify(kind, kernel, device, dtype)
    except NotImplementedError:  # not a dtype the kernel takes
        return None
    except (AssertionError, RuntimeError, TypeError, ValueError) as exc:
        warnings.warn(f"the {kind} kernel {name} for {device.type} {dtype} failed its check ({type(exc).__name__}: "
                      f"{exc}); not used", stacklevel=3)
        return None
    return kernel


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
