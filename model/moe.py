"""The LongCat-Flash MoE: router, zero-computation experts and the FFN experts a rank holds.

Router: an fp32 linear `classifier` over the N FFN + Z zero experts, softmax over all of
them; the top-k is chosen on score + `e_score_correction_bias` (the bias only steers the
choice); the weights are the chosen softmax scores times `routed_scaling_factor`.

Zero-computation experts return their input: their share of the output, input times the
summed weights of the zero slots, is computed where the token lives and never travels.
Only FFN-expert slots go to the experts (through an expert exchange: local when the
expert-parallel group has one rank, dispatch/combine over it otherwise).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from moeport.backends.expert_kernels import kernel_for, verify
from moeport.base.dtypes import in_dtype
from moeport.collectives.base import CompletedHandle, Handle
from moeport.model.config import LongcatConfig
from moeport.model.workspace import Workspace


@dataclasses.dataclass
class Routing:
    """The router's choice for T tokens: expert ids and weights [T, k]."""

    ids: torch.Tensor  # int64; ids >= n_routed_experts are zero experts
    weights: torch.Tensor  # float32, already times routed_scaling_factor


class Router(nn.Module):
    """Top-k softmax router with a selection-only correction bias."""

    def __init__(self, config: LongcatConfig) -> None:
        super().__init__()
        self.top_k = config.moe_topk
        self.scale = config.routed_scaling_factor
        self.classifier = nn.Linear(config.hidden_size, config.num_experts_total, bias=False, dtype=torch.float32)
        self.register_buffer("e_score_correction_bias", torch.zeros(config.num_experts_total, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> Routing:
        """Route x [T, hidden]."""
        scores = F.linear(in_dtype(x, torch.float32), in_dtype(self.classifier.weight, torch.float32)).softmax(dim=-1)
        with torch.no_grad():
            ids = torch.topk(scores + self.e_score_correction_bias, self.top_k, dim=-1, sorted=False).indices
        return Routing(ids, scores.gather(1, ids) * self.scale)


def zero_expert_output(x: torch.Tensor, routing: Routing, n_routed_experts: int) -> torch.Tensor:
    """What the zero (identity) experts add for each token: x times the summed weights of its zero slots."""
    zero_weight = torch.where(routing.ids >= n_routed_experts, routing.weights, 0.0).sum(-1, keepdim=True)
    return in_dtype(x * zero_weight, x.dtype)


def ffn_slots(routing: Routing, n_routed_experts: int, first: int = 0, count: int | None = None) -> torch.Tensor:
    """Local expert ids [T, k] of the slots routed to experts first..first+count-1; -1 elsewhere."""
    count = n_routed_experts if count is None else count
    if first == 0 and count == n_routed_experts:  # every FFN expert: only the zero experts are masked
        return torch.where(routing.ids < n_routed_experts, routing.ids, -1)
    local = routing.ids - first
    return torch.where((local >= 0) & (local < count) & (routing.ids < n_routed_experts), local, -1)


class ExpertFFNs(nn.Module):
    """The SwiGLU FFN experts one rank holds, as stacked weights laid out for `x @ w`.

    gate_up [E, H, 2I] (gate columns first, then up) and down [E, I, H], for the
    experts `first` .. `first + E - 1` of the model (the checkpoint's per-expert
    [I, H] / [H, I] matrices, transposed once at load time).
    """

    #: Costs that steer the capacity choice, in slot rows of batched arithmetic: reading one
    #: expert's weights in the batched matmuls (which stream every expert's, with slots or
    #: not); reading them for its slots outside the batch; one extra per-expert matmul pair
    #: run from Python; one more group in a grouped matmul; and each group a grouped matmul
    #: visits, empty or not (torch's CPU grouped matmul walks them all). A slot row outside
    #: the batch costs as many batched rows as there are intra-op threads: a batched matmul
    #: spreads its experts over them, a small per-expert one gains little from them. Fitted
    #: to measured times over capacities and both ways of running the slots beyond it, for
    #: routings of 1 to 512 tokens (uniform and skewed, 64 experts, weights not in cache)
    #: on a 2-core CPU: the choice is within 17% of the fastest in each of 20 cases.
    ROWS_PER_BATCHED_WEIGHT_READ = 10
    ROWS_PER_WEIGHT_READ = 10
    ROWS_PER_EXTRA_MATMUL = 8
    ROWS_PER_EXTRA_GROUP = 3
    ROWS_PER_GROUP_VISITED = 4

    def __init__(self, config: LongcatConfig, first: int, count: int) -> None:
        super().__init__()
        self.first, self.count = first, count
        i, h = config.expert_ffn_hidden_size, config.hidden_size
        self.gate_up = nn.Parameter(torch.empty(count, h, 2 * i))
        self.down = nn.Parameter(torch.empty(count, i, h))
        self.workspace = Workspace()  # the model shares one between its layers
        self._weight_views: tuple | None = None  # see _per_expert_weights

    def forward(self, x: torch.Tensor, local_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """For each row of x [N, H]: sum over its valid slots (local id >= 0) of weight * expert(row).

        Without autograd, a device's own kernels run the experts where it offers them
        (backends/expert_kernels.py): a fused kernel for the whole layer, else a
        grouped matmul that runs every slot, sorted by expert, as one GEMM per expert
        of exactly its slots. Otherwise the slots are sorted by expert once, with one
        host synchronisation per call (the per-expert counts) and none per expert; up
        to a capacity of slots per expert run as two batched matmuls over all
        experts; the slots beyond it (and every slot, when slots are few) run as one
        matmul pair per expert that has them. The capacity is chosen from the counts
        to make the padding and the extra matmuls cheapest together.
        """
        n, k = local_ids.shape
        fused = self.device_kernel("fused_experts", x)
        if fused is not None:
            return fused(x.contiguous(), local_ids.contiguous(), weights.to(torch.float32).contiguous(), self.gate_up.detach(),
                         self.down.detach(), self.workspace.take("expert_out", (n * k, x.shape[1]), x), torch.empty_like(x))
        out = torch.zeros_like(x)
        # one stable sort by expert, with the slots for no expert of this rank (-1, which the
        # remainder makes `count`) placed last
        experts, slots = torch.sort(local_ids.reshape(-1).remainder(self.count + 1), stable=True)
        counts = torch.bincount(experts, minlength=self.count + 1)[: self.count]
        sizes = counts.tolist()
        total = sum(sizes)
        if total == 0:
            return out
        slots, experts = slots[:total], experts[:total]
        rows = slots // k
        slot_weights = in_dtype(torch.take(weights, slots), x.dtype)
        kernel = self.device_kernel("grouped_matmul", x)
        if kernel is not None:
            self._ragged(x, out, rows, slot_weights, sizes, kernel)
            return out
        active = [size for size in sizes if size]  # the choices below depend on these alone
        capacity = self.capacity(active)
        if capacity:
            self._batched(x, out, rows, experts, slot_weights, counts, capacity)
        if capacity < max(active):
            self._beyond_capacity(x, out, rows, slot_weights, sizes, counts, capacity, self.grouped_beyond(active, capacity))
        return out

    def capacity(self, sizes: list[int]) -> int:
        """Slots per expert to run batched (0: none): padding every expert to it, plus the slots
        beyond it run per expert, cheapest together."""
        nonzero = sorted(size for size in sizes if size)
        grouped_here = self._grouped_mm_here()
        best, best_cost = 0, self._cost_beyond(nonzero, 0, grouped_here)
        for capacity in sorted(set(nonzero)):
            batched = self.count * (capacity + self.ROWS_PER_BATCHED_WEIGHT_READ)
            if batched >= best_cost:  # the batched part alone grows with the capacity: nothing larger wins
                break
            cost = batched + self._cost_beyond(nonzero, capacity, grouped_here)
            if cost < best_cost:
                best, best_cost = capacity, cost
        return best

    def grouped_beyond(self, sizes: list[int], capacity: int) -> bool:
        """Whether the slots beyond `capacity` run as one grouped matmul (else one matmul pair per expert)."""
        if not self._grouped_mm_here():
            return False
        loop, grouped = self._costs_beyond(sizes, capacity)
        return grouped < loop

    def _cost_beyond(self, sizes: list[int], capacity: int, grouped_here: bool) -> int:
        """Cost of the slots beyond `capacity`: the cheaper way where grouped matmuls can run, else the loop."""
        loop, grouped = self._costs_beyond(sizes, capacity)
        return min(loop, grouped) if grouped_here else loop

    def _costs_beyond(self, sizes: list[int], capacity: int) -> tuple[int, int]:
        """Cost of the slots beyond `capacity` as a loop of per-expert matmuls, and as one grouped matmul."""
        experts = rows = 0
        for size in sizes:
            if size > capacity:
                experts += 1
                rows += size - capacity
        if not experts:
            return 0, 0
        cost = max(1, torch.get_num_threads()) * rows + self.ROWS_PER_WEIGHT_READ * experts
        return (cost + self.ROWS_PER_EXTRA_MATMUL * experts,
                cost + self.ROWS_PER_EXTRA_GROUP * experts + self.ROWS_PER_GROUP_VISITED * self.count)

    def device_kernel(self, kind: str, x: torch.Tensor) -> Callable[..., Any] | None:
        """The device's kernel of `kind` (see backends/expert_kernels.py) for these weights and rows x,
        where one can run now: not under autograd, tracing or compilation."""
        if torch.is_grad_enabled() or torch.jit.is_tracing() or torch.compiler.is_compiling() or x.dtype != self.gate_up.dtype:
            return None
        return kernel_for(kind, self.gate_up.device, self.gate_up.dtype)

    def _grouped_mm_here(self) -> bool:
        """Whether a grouped matmul can run the experts now: not under autograd, and only where it works."""
        return not torch.is_grad_enabled() and grouped_mm_works(self.gate_up.device, self.gate_up.dtype)

    def _swiglu(self, rows: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        gate, up = torch.matmul(rows, gate_up).chunk(2, dim=-1)
        return torch.matmul(F.silu(gate) * up * weight, down)

    @staticmethod
    def _weighted_activation_(gate_up_out: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up * weight, in place in the gate half of a gate/up matmul output (no autograd)."""
        gate, up = gate_up_out.chunk(2, dim=-1)
        return F.silu(gate, inplace=True).mul_(up).mul_(weight)

    def _swiglu_into(self, rows, gate_up, down, weight, result) -> None:
        """`_swiglu` without autograd, writing into `result`; the intermediate lives in the workspace."""
        shape = (*rows.shape[:-1], gate_up.shape[-1])
        hidden = torch.matmul(rows, gate_up, out=self.workspace.take("expert_gate_up", shape, rows))
        torch.matmul(self._weighted_activation_(hidden, weight), down, out=result)

    def _per_expert_weights(self) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """Each expert's gate_up and down matrices, as views without autograd. Kept from call to call
        while the weights stay where they are (taking them out one by one costs a call each time)."""
        key = (self.gate_up.data_ptr(), self.down.data_ptr(), torch.is_inference_mode_enabled())
        if self._weight_views is None or self._weight_views[0] != key:
            self._weight_views = (key, self.gate_up.detach().unbind(0), self.down.detach().unbind(0))
        return self._weight_views[1], self._weight_views[2]

    def _gather(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The rows `index` of x (into the workspace without autograd)."""
        if torch.is_grad_enabled():
            return x.index_select(0, index)
        return torch.index_select(x, 0, index, out=self.workspace.take("expert_in", (index.numel(), x.shape[1]), x))

    def _ragged(self, x, out, rows, slot_weights, sizes: list[int], kernel: Callable[..., Any]) -> None:
        """Every slot, sorted by expert, through the device's grouped matmul: no padding, no loop."""
        gathered = self._gather(x, rows)
        hidden = kernel(gathered, self.gate_up.detach(), sizes,
                        self.workspace.take("expert_gate_up", (gathered.shape[0], self.gate_up.shape[-1]), x))
        activated = self._weighted_activation_(hidden, slot_weights[:, None])
        results = kernel(activated, self.down.detach(), sizes, self.workspace.take("expert_out", tuple(gathered.shape), x))
        out.index_add_(0, rows, results)

    def _batched(self, x, out, rows, experts, slot_weights, counts, capacity) -> None:
        """The first `capacity` slots of every expert, padded to `capacity` rows each, in two bmm."""
        position = torch.arange(experts.numel(), device=x.device) - (torch.cumsum(counts, 0) - counts)[experts]
        kept = position < capacity
        padded_slot = (experts * capacity + position)[kept]
        # Padding rows read row 0 with weight 0: they add exactly nothing.
        source = torch.zeros(self.count * capacity, dtype=rows.dtype, device=x.device).index_copy_(0, padded_slot, rows[kept])
        weight = x.new_zeros(self.count * capacity).index_copy_(0, padded_slot, slot_weights[kept])
        weight = weight.view(self.count, capacity, 1)
        hidden = x.shape[1]
        padded = self._gather(x, source).view(self.count, capacity, hidden)
        if torch.is_grad_enabled():
            result = self._swiglu(padded, self.gate_up, self.down, weight)
        else:
            result = self.workspace.take("expert_out", (self.count, capacity, hidden), x)
            self._swiglu_into(padded, self.gate_up, self.down, weight, result)
        out.index_add_(0, source, result.view(-1, hidden))

    def _beyond_capacity(self, x, out, rows, slot_weights, sizes: list[int], counts: torch.Tensor, capacity: int,
                         grouped: bool) -> None:
        """Each expert's slots after its first `capacity` (every slot when `capacity` is 0): one grouped
        matmul over all experts (`grouped`), or a matmul pair per expert that has them."""
        segments, start = [], 0  # (expert, first slot beyond the capacity, slots beyond it)
        for expert, size in enumerate(sizes):
            if size > capacity:
                segments.append((expert, start + capacity, size - capacity))
            start += size
        if capacity:
            index = torch.cat([torch.arange(start, start + size, device=x.device) for _, start, size in segments])
            rows, slot_weights = rows[index], slot_weights[index]
        gathered = self._gather(x, rows)
        if grouped:
            beyond = counts if capacity == 0 else (counts - capacity).clamp_(min=0)
            ends = torch.cumsum(beyond, 0, dtype=torch.int32)  # on the device: no copy from the host
            activated = self._weighted_activation_(F.grouped_mm(gathered, self.gate_up, offs=ends), slot_weights[:, None])
            out.index_add_(0, rows, F.grouped_mm(activated, self.down, offs=ends))
            return
        experts = [expert for expert, _, _ in segments]
        part_sizes = [size for _, _, size in segments]
        if torch.is_grad_enabled():
            results = torch.cat([
                self._swiglu(part, self.gate_up[expert], self.down[expert], weight)
                for expert, part, weight in zip(experts, gathered.split(part_sizes), slot_weights[:, None].split(part_sizes))
            ])
        else:
            # each expert's matmuls write their rows of one buffer; the activation runs once over all of them
            gate_up, down = self._per_expert_weights()
            hidden = self.workspace.take("expert_gate_up", (gathered.shape[0], self.gate_up.shape[-1]), x)
            for expert, part, into in zip(experts, gathered.split(part_sizes), hidden.split(part_sizes)):
                torch.mm(part, gate_up[expert], out=into)
            activated = self._weighted_activation_(hidden, slot_weights[:, None])
            results = self.workspace.take("expert_out", tuple(gathered.shape), x)
            for expert, part, into in zip(experts, activated.split(part_sizes), results.split(part_sizes)):
                torch.mm(part, down[expert], out=into)
        out.index_add_(0, rows, results)


_GROUPED_MM: dict[tuple[str, torch.dtype], bool] = {}


def grouped_mm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch's grouped matmul (`F.grouped_mm`, no autograd) runs and is right for this device
    type and dtype; probed once on a small problem, since the kernels that exist differ by device."""
    key = (device.type, dtype)
    if key not in _GROUPED_MM:
        _GROUPED_MM[key] = _probe_grouped_mm(device, dtype)
    return _GROUPED_MM[key]


def _probe_grouped_mm(device: torch.device, dtype: torch.dtype) -> bool:
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


class LocalExchange:
    """The expert exchange when this rank holds every FFN expert: nothing travels."""

    def __init__(self, n_routed_experts: int) -> None:
        self.n_routed_experts = n_routed_experts

    def dispatch(self, tokens: torch.Tensor, routing: Routing) -> Handle:
        """The FFN-expert slots of each token, as (rows, local ids, weights)."""
        return CompletedHandle((tokens, ffn_slots(routing, self.n_routed_experts), routing.weights))

    def compute(self, experts: ExpertFFNs, received: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The weighted expert outputs, one row per received row."""
        return experts(*received)

    def combine(self, expert_out: torch.Tensor) -> Handle:
        """The expert outputs back in token order (already there)."""
        return CompletedHandle(expert_out)
