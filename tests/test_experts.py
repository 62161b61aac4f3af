"""The grouped FFN experts against a plain loop over slots, on every path they take."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_expert_kernels import require  # fails where this machine has what a kernel needs and the kernel is missing

from moeport.kernels import HOST_CPU, torch_grouped_mm
from moeport.kernels.offered import OfferedKernels
from moeport.model import PRESETS
from moeport.model.expert_costs import ExpertCosts
from moeport.model.experts import ExpertFFNs

CPU = torch.device("cpu")


def _cpu_kernels() -> OfferedKernels:
    return OfferedKernels(HOST_CPU, "cpu")


def _experts(count: int = 8) -> ExpertFFNs:
    config = PRESETS["tiny"]
    experts = ExpertFFNs(config, range(count))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        experts.gate_up.copy_(torch.randn(experts.gate_up.shape, generator=gen) * 0.1)
        experts.down.copy_(torch.randn(experts.down.shape, generator=gen) * 0.1)
    return experts


def _slot_by_slot(experts: ExpertFFNs, x, local_ids, weights):
    """The definition: each valid slot adds weight * SwiGLU_expert(row) to its row."""
    rows = []
    for row in range(x.shape[0]):
        total = torch.zeros_like(x[row])
        for slot in range(local_ids.shape[1]):
            expert = int(local_ids[row, slot])
            if expert >= 0:
                gate, up = (x[row] @ experts.gate_up[expert]).chunk(2)
                total = total + (F.silu(gate) * up * weights[row, slot]) @ experts.down[expert]
        rows.append(total)
    return torch.stack(rows)


def _routing(rows: int, k: int, count: int, skew: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    if skew:  # most slots on expert 0, some invalid (-1)
        ids = torch.where(torch.rand(rows, k, generator=gen) < 0.6, 0, torch.randint(-1, count, (rows, k), generator=gen))
    else:
        ids = torch.randint(-1, count, (rows, k), generator=gen)
    return ids, torch.rand(rows, k, generator=gen)


def _check_against_the_definition(experts: ExpertFFNs, skew: bool) -> None:
    x = torch.randn(24, experts.gate_up.shape[1], generator=torch.Generator().manual_seed(1))
    ids, weights = _routing(24, 4, experts.count, skew, seed=2)
    expected = _slot_by_slot(experts, x, ids, weights)
    with torch.no_grad():
        first = experts(x, ids, weights)
        second = experts(x * 2, ids, weights)  # the workspace is reused: no stale rows
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(second, _slot_by_slot(experts, x * 2, ids, weights), rtol=1e-5, atol=1e-6)


def _only(kind: str):
    """A device_kernel that offers only the CPU's kernel of `kind`, counting its calls."""
    calls = []
    kernels = _cpu_kernels()

    def device_kernel(asked: str, x):
        kernel = kernels.kernel(asked, CPU, torch.float32) if asked == kind and not torch.is_grad_enabled() else None
        if kernel is None:
            return None
        return lambda *args: calls.append(asked) or kernel(*args)
    return device_kernel, calls


@pytest.mark.parametrize("kind, calls_per_forward", [("fused_experts", 1), ("grouped_matmul", 2)])
@pytest.mark.parametrize("skew", [False, True])
def test_each_device_kernel_gives_the_slot_by_slot_result(kind, calls_per_forward, skew, monkeypatch):
    require(kind, _cpu_kernels().kernel(kind, CPU, torch.float32))
    experts = _experts()
    device_kernel, calls = _only(kind)
    monkeypatch.setattr(experts, "device_kernel", device_kernel)
    experts.plan = lambda sizes: pytest.fail("a device kernel needs no capacity")
    _check_against_the_definition(experts, skew)
    assert calls == [kind] * 2 * calls_per_forward  # two forwards


def test_the_device_kernels_run_only_without_autograd():
    experts = _experts()
    x = torch.ones(1, experts.gate_up.shape[1])
    with torch.no_grad():
        assert experts.device_kernel("fused_experts", x) is None  # none offered: torch's operators
    experts.kernels = _cpu_kernels()
    for kind in ("fused_experts", "grouped_matmul"):
        assert experts.device_kernel(kind, x) is None
        with torch.no_grad():
            assert experts.device_kernel(kind, x) is experts.kernels.kernel(kind, CPU, torch.float32)
            assert experts.device_kernel(kind, x.double()) is None  # rows of another dtype than the weights


@pytest.mark.parametrize("capacity", [None, 0, 1, 3, 1000])
@pytest.mark.parametrize("skew", [False, True])
@pytest.mark.parametrize("grouped", [True, False], ids=["grouped-mm", "loop"])
def test_every_capacity_gives_the_slot_by_slot_result(capacity, skew, grouped):
    if grouped:
        require("grouped_mm", torch_grouped_mm.works(CPU, torch.float32))
    experts = _experts()  # no device kernels: the paths of devices without them
    chosen = experts.plan
    # force the path: all per expert (0), batched with overflow, all batched; None: the cost model's capacity
    experts.plan = lambda sizes: (chosen(sizes)[0] if capacity is None else min(capacity, max(sizes)), grouped)
    _check_against_the_definition(experts, skew)


@pytest.mark.parametrize("skew", [False, True])
def test_gradients_match_the_slot_by_slot_definition(skew):
    experts = _experts()
    x = torch.randn(12, experts.gate_up.shape[1], generator=torch.Generator().manual_seed(3), requires_grad=True)
    ids, weights = _routing(12, 3, experts.count, skew=skew, seed=4)
    weights.requires_grad_(True)
    ours = torch.autograd.grad(experts(x, ids, weights).square().sum(), (x, weights, experts.gate_up, experts.down))
    definition = torch.autograd.grad(
        _slot_by_slot(experts, x, ids, weights).square().sum(), (x, weights, experts.gate_up, experts.down)
    )
    for a, b in zip(ours, definition):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _raises(*args, **kwargs):
    raise NotImplementedError("no grouped kernel for this dtype")


def _wrong_answer(a, b, offs):
    return torch.zeros(a.shape[0], b.shape[-1], dtype=a.dtype)


@pytest.mark.parametrize("replacement", [None, _raises, _wrong_answer], ids=["absent", "raises", "wrong-answer"])
def test_grouped_mm_is_used_only_where_it_runs_and_is_right(replacement, monkeypatch):
    if replacement is None:
        monkeypatch.delattr(F, "grouped_mm", raising=False)
    else:
        monkeypatch.setattr(F, "grouped_mm", replacement, raising=False)
    assert torch_grouped_mm._probe(CPU, torch.float32) is False


def test_no_valid_slot_gives_zeros():
    experts = _experts()
    x = torch.randn(5, experts.gate_up.shape[1])
    out = experts(x, torch.full((5, 2), -1), torch.rand(5, 2))
    assert torch.equal(out, torch.zeros_like(x))


def test_capacity_balances_padding_against_extra_matmuls():
    costs, threads = ExpertCosts(), torch.get_num_threads()

    def capacity(sizes):
        return costs.capacity(sizes, len(sizes), threads, grouped_here=False)

    assert capacity([0] * 7 + [1]) == 0  # one slot: padding every expert costs more
    assert capacity([50, 50, 50, 50]) == 50  # even counts: batch all of them
    assert capacity([50, 50, 50, 51]) == 51  # one slot over: padding three rows is cheaper than a matmul
    assert capacity([50, 50, 50, 150]) == 50  # one expert far over: run its rest alone rather than pad everyone


def test_few_slots_over_many_experts_run_as_a_loop_many_as_one_grouped_matmul(monkeypatch):
    costs, threads = ExpertCosts(), torch.get_num_threads()
    decoding = [1] * 10 + [0] * 54  # a grouped matmul would visit 54 empty groups for 10 slots
    assert not costs.grouped_beyond(decoding, 0, 64, threads)
    assert costs.grouped_beyond([3] * 64, 0, 64, threads)
    assert costs.grouped_beyond([5] * 64, 2, 64, threads)
    assert not costs.grouped_beyond([5] * 64, 5, 64, threads)  # nothing beyond the capacity
    experts = _experts(count=64)
    monkeypatch.setitem(torch_grouped_mm._WORKS, ("cpu", torch.float32), False)
    assert experts.plan([3] * 64) == (3, False)  # none where it does not work
    monkeypatch.setattr(F, "grouped_mm", lambda *args, **kwargs: pytest.fail("no autograd through grouped matmuls"),
                        raising=False)
    monkeypatch.setitem(torch_grouped_mm._WORKS, ("cpu", torch.float32), True)
    x = torch.randn(96, experts.gate_up.shape[1])
    ids, weights = _routing(96, 2, 64, skew=False, seed=7)
    experts(x, ids, weights).sum().backward()  # with autograd: the definition


def test_kept_per_expert_weight_views_follow_new_weights():
    experts = _experts()
    experts.plan = lambda sizes: (0, False)  # every slot through the per-expert loop, which keeps the views
    x = torch.randn(6, experts.gate_up.shape[1], generator=torch.Generator().manual_seed(5))
    ids, weights = _routing(6, 2, experts.count, skew=False, seed=6)
    with torch.inference_mode():
        experts(x, ids, weights)
    with torch.no_grad():
        experts.gate_up.mul_(2)  # in place: the kept views see it
        torch.testing.assert_close(experts(x, ids, weights), _slot_by_slot(experts, x, ids, weights), rtol=1e-5, atol=1e-6)
    experts.down = torch.nn.Parameter(experts.down.detach() * 3)  # a new tensor: the views are made again
    with torch.no_grad():
        torch.testing.assert_close(experts(x, ids, weights), _slot_by_slot(experts, x, ids, weights), rtol=1e-5, atol=1e-6)
