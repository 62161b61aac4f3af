"""The SwiGLU FFN experts one rank holds: their weights, their definition, and how a call runs.

For rows x [N, H] with k slots each (local expert ids [N, k], -1 for a slot that is not
for an expert of this rank, and weights [N, k]), the experts' output for row n is

    sum over the slots s of n with a local id e >= 0 of  weights[n, s] * down_e(silu(gate_e(x[n])) * up_e(x[n]))

with the weights laid out as moeport.kernels describes (gate_up [E, H, 2I], down [E, I, H]).
With autograd, a call computes exactly that (`swiglu_experts`). Without it, the fastest
way that can run does: the device's fused kernel, else its grouped matmul, else torch's
operators in the way the cost model picks (expert_executors.py, expert_costs.py).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from moeport.kernels import torch_grouped_mm
from moeport.model.config import LongcatConfig
from moeport.model.context import ExpertKernels
from moeport.model.expert_costs import ExpertCosts
from moeport.model.expert_executors import run_batched, run_beyond_capacity, run_fused, run_ragged, sort_slots
from moeport.model.workspace import Workspace


def swiglu_experts(x: torch.Tensor, local_ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                   down: torch.Tensor) -> torch.Tensor:
    """The experts' output by their definition, one matmul pair per expert that has slots;
    differentiable in x, weights, gate_up and down."""
    count, k = gate_up.shape[0], local_ids.shape[1]
    experts, slots = torch.sort(local_ids.reshape(-1).remainder(count + 1), stable=True)
    sizes = torch.bincount(experts, minlength=count + 1).tolist()
    slot_weights = weights.reshape(-1)[slots].to(x.dtype)
    # one view per expert, taken once: backward then adds into one stacked gradient, not a full-size zero
    # tensor per expert as indexing gate_up[expert] would
    gate_ups, downs = gate_up.unbind(0), down.unbind(0)
    rows_of, outputs = [], []
    for expert, slot, weight in zip(range(count), slots.split(sizes), slot_weights.split(sizes)):
        if slot.numel():
            rows = slot // k
            gate, up = (x[rows] @ gate_ups[expert]).chunk(2, dim=-1)
            outputs.append((F.silu(gate) * up * weight[:, None]) @ downs[expert])
            rows_of.append(rows)
    # zeros that still hang from x and weights (empty sums, exactly 0): with no slot here, backward must still
    # reach what the dispatch delivered, so that its collective runs on this rank as on every other
    out = torch.zeros_like(x) + (x[:0].sum() + weights[:0].sum().to(x.dtype))
    if outputs:  # one sum into the rows, in expert order as before
        out = out.index_add(0, torch.cat(rows_of), torch.cat(outputs))
    return out


class ExpertFFNs(nn.Module):
    """The SwiGLU FFN experts one rank holds, as stacked weights laid out for `x @ w`.

    gate_up [E, H, 2I] (gate columns first, then up) and down [E, I, H], for the model's
    experts `global_ids` (the checkpoint's per-expert [I, H] / [H, I] matrices, transposed
    once at load time). `kernels` (set by the model from its context) are the device's
    own; `costs` steer the choice among torch's operators; `workspace` holds the
    temporaries of calls without autograd (the model shares one between its layers).
    """

    def __init__(self, config: LongcatConfig, global_ids: range) -> None:
        super().__init__()
        self.global_ids = global_ids
        self.count = len(global_ids)
        i, h = config.expert_ffn_hidden_size, config.hidden_size
        self.gate_up = nn.Parameter(torch.empty(self.count, h, 2 * i))
        self.down = nn.Parameter(torch.empty(self.count, i, h))
        self.kernels: ExpertKernels | None = None
        self.costs = ExpertCosts()
        self.workspace = Workspace()
        self._weight_views: tuple | None = None  # see _per_expert_weights

    def forward(self, x: torch.Tensor, local_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """For each row of x [N, H]: the sum over its valid slots (local id >= 0) of weight * expert(row)."""
        if torch.is_grad_enabled():
            return swiglu_experts(x, local_ids, weights, self.gate_up, self.down)
        gate_up, down = self.gate_up.detach(), self.down.detach()
        fused = self.device_kernel("fused_experts", x)
        if fused is not None:
            return run_fused(fused, x, local_ids, weights, gate_up, down, self.workspace)
        out = torch.zeros_like(x)
        slots = sort_slots(local_ids, weights, self.count, x.dtype)
        if slots is None:
            return out
        grouped = self.device_kernel("grouped_matmul", x)
        if grouped is not None:
            run_ragged(grouped, x, out, slots, gate_up, down, self.workspace)
            return out
        capacity, grouped_beyond = self.plan([size for size in slots.sizes if size])
        if capacity:
            run_batched(x, out, slots, capacity, gate_up, down, self.workspace)
        if capacity < max(slots.sizes):
            run_beyond_capacity(x, out, slots, capacity, grouped_beyond, gate_up, down, self._per_expert_weights(),
                                self.workspace)
        return out

    def plan(self, sizes: list[int]) -> tuple[int, bool]:
        """For the slot counts of the experts that have slots: the capacity to run batched (0: none), and
        whether the slots beyond it run as one grouped matmul (else a matmul pair per expert)."""
        threads, grouped_here = torch.get_num_threads(), self._grouped_mm_here()
        capacity = self.costs.capacity(sizes, self.count, threads, grouped_here)
        beyond = capacity < max(sizes, default=0)
        return capacity, beyond and grouped_here and self.costs.grouped_beyond(sizes, capacity, self.count, threads)

    def device_kernel(self, kind: str, x: torch.Tensor) -> Callable[..., Any] | None:
        """The device's kernel of `kind` (see moeport.kernels) for these weights and rows x, where one can
        run now: not under autograd, tracing or compilation, and rows of the weights' dtype."""
        if (self.kernels is None or torch.is_grad_enabled() or torch.jit.is_tracing() or torch.compiler.is_compiling()
                or x.dtype != self.gate_up.dtype):
            return None
        return self.kernels.kernel(kind, self.gate_up.device, self.gate_up.dtype)

    def _grouped_mm_here(self) -> bool:
        """Whether torch's grouped matmul runs, and is right, for these weights' device and dtype."""
        return torch_grouped_mm.works(self.gate_up.device, self.gate_up.dtype)

    def _per_expert_weights(self) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """Each expert's gate_up and down matrices, as views without autograd. Kept from call to call
        while the weights stay where they are (taking them out one by one costs a call each time)."""
        key = (self.gate_up.data_ptr(), self.down.data_ptr(), torch.is_inference_mode_enabled())
        if self._weight_views is None or self._weight_views[0] != key:
            self._weight_views = (key, self.gate_up.detach().unbind(0), self.down.detach().unbind(0))
        return self._weight_views[1], self._weight_views[2]
