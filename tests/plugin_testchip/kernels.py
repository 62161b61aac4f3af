"""The test chip's fused-experts kernels, written with torch's operators; each counts its calls."""

from __future__ import annotations

import torch.nn.functional as F

#: calls of each kernel in this process
CALLS = {"fused_experts": 0, "wrong_fused_experts": 0}


def _experts(x, local_ids, weights, gate_up, down, results, out):
    """The experts' definition (moeport.kernels), one slot at a time per expert."""
    out.zero_()
    k = local_ids.shape[1]
    for expert in range(gate_up.shape[0]):
        slots = (local_ids.reshape(-1) == expert).nonzero().flatten()
        if slots.numel():
            rows = slots // k
            gate, up = (x[rows] @ gate_up[expert]).chunk(2, dim=-1)
            weight = weights.reshape(-1)[slots].to(x.dtype)[:, None]
            out.index_add_(0, rows, (F.silu(gate) * up * weight) @ down[expert])
    return out


def _counted(x, local_ids, weights, gate_up, down, results, out):
    CALLS["fused_experts"] += 1
    return _experts(x, local_ids, weights, gate_up, down, results, out)


def _wrong(x, local_ids, weights, gate_up, down, results, out):
    CALLS["wrong_fused_experts"] += 1
    return _experts(x, local_ids, weights, gate_up, down, results, out).mul_(2)


def fused_experts():
    """The factory moeport calls: the kernel, for every dtype torch computes in on the CPU."""
    return _counted


def wrong_fused_experts():
    """The factory of a kernel that gives twice the answer."""
    return _wrong


def calls() -> dict[str, int]:
    """How often each kernel ran in this process."""
    return dict(CALLS)


def reset() -> None:
    """Forget the calls so far."""
    for name in CALLS:
        CALLS[name] = 0

