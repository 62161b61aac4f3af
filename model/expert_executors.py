"""The ways to run the FFN experts without autograd, fastest first where each can run.

Every executor computes the experts' definition (model/experts.py) for rows x [N, H]
with k slots each, in the weight layout moeport.kernels describes, writing its
temporaries into the experts' Workspace:

- `run_fused`: the device's fused kernel for the whole layer, in one call;
- `run_ragged`: the device's grouped matmul, every slot sorted by expert, one GEMM per
  expert of exactly its slots;
- `run_batched`: the first `capacity` slots of every expert, each expert padded to
  `capacity` rows, as two batched matmuls over all experts;
- `run_beyond_capacity`: each expert's slots after its first `capacity`, as one grouped
  matmul of torch's (`F.grouped_mm`) or as a matmul pair per expert that has them.

The last two run torch's operators on any device; ExpertCosts (expert_costs.py) picks
the capacity and the way beyond it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
import torch.nn.functional as F

from moeport.base.dtypes import in_dtype
from moeport.model.workspace import Workspace


@dataclasses.dataclass
class SortedSlots:
    """The slots of one call that are for a local expert, sorted by expert (stable: slot order within one).

    rows [S]: the row of x each slot reads; weights [S]: its weight, in x's dtype; experts [S]:
    its local expert; counts [E]: slots per expert, on the device; sizes: the same on the host.
    """

    rows: torch.Tensor
    weights: torch.Tensor
    experts: torch.Tensor
    counts: torch.Tensor
    sizes: list[int]


def sort_slots(local_ids: torch.Tensor, weights: torch.Tensor, count: int, dtype: torch.dtype) -> SortedSlots | None:
    """The valid slots of local_ids [N, k] (ids in 0 .. count - 1) sorted by expert, with one host
    synchronisation (the per-expert counts); None when no slot is for a local expert."""
    k = local_ids.shape[1]
    # one stable sort by expert, with the slots for no expert of this rank (-1, which the
    # remainder makes `count`) placed last
    experts, slots = torch.sort(local_ids.reshape(-1).remainder(count + 1), stable=True)
    counts = torch.bincount(experts, minlength=count + 1)[:count]
    sizes = counts.tolist()
    total = sum(sizes)
    if total == 0:
        return None
    slots, experts = slots[:total], experts[:total]
    return SortedSlots(slots // k, in_dtype(torch.take(weights, slots), dtype), experts, counts, sizes)


def weighted_activation_(gate_up_out: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up * weight, in place in the gate half of a gate/up matmul output."""
    gate, up = gate_up_out.chunk(2, dim=-1)
    return F.silu(gate, inplace=True).mul_(up).mul_(weight)


def gather(x: torch.Tensor, index: torch.Tensor, workspace: Workspace) -> torch.Tensor:
    """The rows `index` of x, into the workspace."""
    return torch.index_select(x, 0, index, out=workspace.take("expert_in", (index.numel(), x.shape[1]), x))


def run_fused(kernel: Callable[..., Any], x: torch.Tensor, local_ids: torch.Tensor, weights: torch.Tensor,
              gate_up: torch.Tensor, down: torch.Tensor, workspace: Workspace) -> torch.Tensor:
    """The device's fused kernel: the whole layer in one call; returns a new [N, H]."""
    n, k = local_ids.shape
    return kernel(x.contiguous(), local_ids.contiguous(), weights.to(torch.float32).contiguous(), gate_up, down,
                  workspace.take("expert_out", (n * k, x.shape[1]), x), torch.empty_like(x))


def run_ragged(kernel: Callable[..., Any], x: torch.Tensor, out: torch.Tensor, slots: SortedSlots,
               gate_up: torch.Tensor, down: torch.Tensor, workspace: Workspace) -> None:
    """Every slot through the device's grouped matmul, added into `out`: no padding, no loop."""
    gathered = gather(x, slots.rows, workspace)
    hidden = kernel(gathered, gate_up, slots.sizes, workspace.take("expert_gate_up", (gathered.shape[0], gate_up.shape[-1]), x))
    activated = weighted_activation_(hidden, slots.weights[:, None])
    results = kernel(activated, down, slots.sizes, workspace.take("expert_out", tuple(gathered.shape), x))
    out.index_add_(0, slots.rows, results)


def run_batched(x: torch.Tensor, out: torch.Tensor, slots: SortedSlots, capacity: int, gate_up: torch.Tensor,
                down: torch.Tensor, workspace: Workspace) -> None:
    """The first `capacity` slots of every expert, padded to `capacity` rows each, in two bmm, added into `out`."""
    count = gate_up.shape[0]
    position = torch.arange(slots.experts.numel(), device=x.device) - (torch.cumsum(slots.counts, 0) - slots.counts)[slots.experts]
    kept = position < capacity
    padded_slot = (slots.experts * capacity + position)[kept]
    # Padding rows read row 0 with weight 0: they add exactly nothing.
    source = torch.zeros(count * capacity, dtype=slots.rows.dtype, device=x.device).index_copy_(0, padded_slot, slots.rows[kept])
    weight = x.new_zeros(count * capacity).index_copy_(0, padded_slot, slots.weights[kept]).view(count, capacity, 1)
    hidden = x.shape[1]
    padded = gather(x, source, workspace).view(count, capacity, hidden)
    gate_up_out = torch.matmul(padded, gate_up, out=workspace.take("expert_gate_up", (count, capacity, gate_up.shape[-1]), x))
    result = workspace.take("expert_out", (count, capacity, hidden), x)
    torch.matmul(weighted_activation_(gate_up_out, weight), down, out=result)
    out.index_add_(0, source, result.view(-1, hidden))


def run_beyond_capacity(x: torch.Tensor, out: torch.Tensor, slots: SortedSlots, capacity: int, grouped: bool,
                        gate_up: torch.Tensor, down: torch.Tensor, per_expert: tuple[tuple[torch.Tensor, ...], ...],
                        workspace: Workspace) -> None:
    """Each expert's slots after its first `capacity` (every slot when `capacity` is 0), added into `out`:
    one grouped matmul over all experts (`grouped`), or a matmul pair per expert that has them
    (`per_expert`: each expert's gate_up and down matrices, as kept views)."""
    segments, start = [], 0  # (expert, first slot beyond the capacity, slots beyond it)
    for expert, size in enumerate(slots.sizes):
        if size > capacity:
            segments.append((expert, start + capacity, size - capacity))
        start += size
    rows, weights = slots.rows, slots.weights
    if capacity:
        index = torch.cat([torch.arange(first, first + size, device=x.device) for _, first, size in segments])
        rows, weights = rows[index], weights[index]
    gathered = gather(x, rows, workspace)
    if grouped:
        beyond = slots.counts if capacity == 0 else (slots.counts - capacity).clamp_(min=0)
        ends = torch.cumsum(beyond, 0, dtype=torch.int32)  # on the device: no copy from the host
        activated = weighted_activation_(F.grouped_mm(gathered, gate_up, offs=ends), weights[:, None])
        out.index_add_(0, rows, F.grouped_mm(activated, down, offs=ends))
        return
    experts = [expert for expert, _, _ in segments]
    part_sizes = [size for _, _, size in segments]
    # each expert's matmuls write their rows of one buffer; the activation runs once over all of them
    gate_ups, downs = per_expert
    hidden = workspace.take("expert_gate_up", (gathered.shape[0], gate_up.shape[-1]), x)
    for expert, part, into in zip(experts, gathered.split(part_sizes), hidden.split(part_sizes)):
        torch.mm(part, gate_ups[expert], out=into)
    activated = weighted_activation_(hidden, weights[:, None])
    results = workspace.take("expert_out", tuple(gathered.shape), x)
    for expert, part, into in zip(experts, activated.split(part_sizes), results.split(part_sizes)):
        torch.mm(part, downs[expert], out=into)
    out.index_add_(0, rows, results)
