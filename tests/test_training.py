"""Training: the objective's terms against their formulas, the controller, expert-parallel gradients, NaN stops."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from moeport.jobs import my_rows
from moeport.model import PRESETS, LongcatForCausalLM
from moeport.model.init import init_weights
from moeport.model.objective import balance_loss, expert_groups, group_slot_counts, hidden_z_loss, update_expert_bias
from moeport.model.training import NonFiniteError, Trainer, TrainSettings, is_expert_parameter
from moeport.testing import run_ranks

pytestmark = pytest.mark.timeout(300)

CONFIG = PRESETS["tiny"]  # 8 FFN + 4 zero experts, top-4
SETTINGS = TrainSettings(lr=3e-3, ffn_experts_per_token=2.5, balance_coef=0.05, balance_groups=2, z_loss_coef=1e-4)
BATCH, LENGTH = 4, 17


def batch() -> torch.Tensor:
    return torch.randint(0, CONFIG.vocab_size, (BATCH, LENGTH), generator=torch.Generator().manual_seed(5))


def test_balance_loss_is_the_formula():
    """L = alpha * sum_j f_j P_j, computed term by term with loops on a small case."""
    g = torch.Generator().manual_seed(0)
    n, z, k, d, k_e, alpha = 6, 3, 4, 3, 2.5, 0.1
    scores = torch.rand(5, n + z, generator=g).softmax(-1)
    ids = torch.stack([torch.randperm(n + z, generator=g)[:k] for _ in range(5)])
    t = ids.shape[0]
    group = [i * d // n for i in range(n)] + [d] * z
    want = 0.0
    for j in range(d + 1):
        slots = sum(1 for row in ids.tolist() for i in row if group[i] == j)
        f = d / (k_e * t) * slots if j < d else slots / ((k - k_e) * t)
        p = sum(float(scores[s, i]) for s in range(t) for i in range(n + z) if group[i] == j) / t
        want += f * p
    group_of = expert_groups(n, z, d, torch.device("cpu"))
    assert group_of.tolist() == group
    got = balance_loss(scores, group_of, group_slot_counts(ids, group_of, d), d, k_e, k, t, alpha)
    assert math.isclose(float(got), alpha * want, rel_tol=1e-6)


def test_hidden_z_loss_is_the_formula():
    h = torch.randn(3, 4, 7, generator=torch.Generator().manual_seed(1))
    want = sum(math.log(sum(math.exp(abs(v)) for v in row)) ** 2 for row in h.reshape(-1, 7).tolist()) * 0.01 / 12
    assert math.isclose(float(hidden_z_loss(h, 12, 0.01)), want, rel_tol=1e-6)


def test_controller_update_is_the_formula():
    bias = torch.zeros(12)
    slots = torch.tensor([5.0, 1, 0, 2, 8, 3, 1, 4])
    update_expert_bias(bias, slots, total_tokens=10, ffn_per_token=2.5, top_k=4, rate=0.5)
    want = [0.5 * (2.5 / (4 * 8) - s / (4 * 10)) for s in slots.tolist()]
    assert torch.allclose(bias[:8], torch.tensor(want)) and torch.equal(bias[8:], torch.zeros(4))


def test_controller_brings_ffn_experts_per_token_to_the_target():
    """With the weights frozen (lr 0), the expert biases alone move the average FFN experts per token to K_e."""
    model = init_weights(LongcatForCausalLM(CONFIG), 0)
    for target in (1.5, 3.0):
        for layer in model.model.layers:
            layer.mlp.router.e_score_correction_bias.zero_()
        trainer = Trainer(model, TrainSettings(lr=0.0, ffn_experts_per_token=target, bias_update_rate=2.0,
                                               bias_update_decay=0.97, balance_coef=0.0, z_loss_coef=0.0))
        ids = torch.randint(0, CONFIG.vocab_size, (8, 33), generator=torch.Generator().manual_seed(2))
        stats = [trainer.step(ids) for _ in range(40)]
        assert abs(stats[-1].ffn_experts_per_token - target) <= 0.1 * target, [s.ffn_experts_per_token for s in stats]


def test_loss_falls_and_a_nan_stops_the_run_naming_step_rank_and_tensor():
    model = init_weights(LongcatForCausalLM(CONFIG), 0)
    trainer = Trainer(model, SETTINGS)
    losses = [trainer.step(batch()).loss for _ in range(8)]
    assert losses[-1] < 0.8 * losses[0]
    with torch.no_grad():
        model.model.layers[1].mlps[0].down_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"step 8, rank 0: NaN or Inf in the output of layer 1"):
        trainer.step(batch())


def gradients_job(rt, world_case):
    """This rank's gradients after one backward of its rows of the batch (replicated ones summed over the ranks),
    and whether a NaN stops every rank."""
    model = init_weights(LongcatForCausalLM(CONFIG, rt), 0)
    trainer = Trainer(model, SETTINGS)
    ids = batch()[my_rows(BATCH, rt.rank, rt.world_size)]
    lm, balance, z, _ = trainer.losses(ids)
    (lm + balance + z).backward()
    trainer._sync_gradients()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    stats = trainer.step(ids)  # a whole step after that: the same figures on every rank
    if world_case == "nan" and rt.rank == 1:
        with torch.no_grad():
            model.model.layers[0].mlp.experts.down[0, 0, 0] = float("inf")
    try:
        trainer.step(ids)
        stopped = None
    except NonFiniteError as exc:
        stopped = str(exc)
    return {"experts": (model.experts_here.start, model.experts_here.stop), "grads": grads, "stats": stats,
            "stopped": stopped}


@pytest.fixture(scope="module")
def single_process():
    model = init_weights(LongcatForCausalLM(CONFIG), 0)
    trainer = Trainer(model, SETTINGS)
    lm, balance, z, _ = trainer.losses(batch())
    (lm + balance + z).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("profile, world_size", [("cpu-gloo", 2), ("cpu-gloo", 4), ("cpu-mpi", 2)])
def test_expert_parallel_gradients_equal_one_process(single_process, profile, world_size):
    if profile == "cpu-mpi":
        pytest.importorskip("mpi4py", reason="the mpi extra is not installed")
    nan = profile == "cpu-gloo" and world_size == 2
    results = run_ranks(gradients_job, world_size, profile, args=("nan" if nan else "",), timeout_s=240)
    for r in results:
        start, stop = r["experts"]
        for name, want in single_process.items():
            got = r["grads"][name]
            if is_expert_parameter(name):  # shard by shard: this rank's experts
                want = want[start:stop]
            scale = want.abs().max().item()
            assert (got - want).abs().max().item() <= 1e-5 * max(scale, 1e-3), name
        assert r["stats"] == results[0]["stats"]
    if nan:  # the rank whose expert weight went Inf names itself and where; every rank stops
        assert results[1]["stopped"] == "step 1, rank 1: NaN or Inf in the output of layer 0"
        assert results[0]["stopped"].startswith("step 1, rank 0: NaN or Inf in")


def starved_job(rt):
    """Two whole steps where no token may choose rank 1's FFN experts (their bias far down): that rank receives
    nothing to compute and its experts get no gradient, and every collective still pairs up."""
    model = init_weights(LongcatForCausalLM(CONFIG, rt), 0)
    for layer in model.model.layers:
        layer.mlp.router.e_score_correction_bias[CONFIG.n_routed_experts // 2: CONFIG.n_routed_experts] = -100.0
    trainer = Trainer(model, dataclasses.replace(SETTINGS, bias_update_rate=0.0))
    ids = batch()[my_rows(BATCH, rt.rank, rt.world_size)]
    return [trainer.step(ids) for _ in range(2)], model.model.layers[0].mlp.experts.gate_up.grad


def test_a_rank_whose_experts_get_no_slot_still_trains():
    results = run_ranks(starved_job, 2, "cpu-gloo", timeout_s=120)
    assert results[0][0] == results[1][0]
    assert results[1][1] is None  # rank 1's experts saw no slot
