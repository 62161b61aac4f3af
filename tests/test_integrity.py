"""Silent-data-corruption checks: exact checksums, the replica checker's verdicts on real ranks, the recompute check."""

from __future__ import annotations

import pytest
import torch

from moeport.jobs import my_rows
from moeport.model import PRESETS, LongcatForCausalLM
from moeport.model.init import init_weights
from moeport.model.integrity import (
    FaultInjection,
    RecomputeChecker,
    RecomputeMismatchError,
    ReplicaChecker,
    ReplicaMismatchError,
    checksum,
    flip_bit,
    replica_verdict,
    replicated_tensors,
)
from moeport.model.training import Trainer, TrainSettings
from moeport.testing import run_ranks

pytestmark = pytest.mark.timeout(300)

CONFIG = PRESETS["tiny"]
SETTINGS = TrainSettings(lr=3e-3, ffn_experts_per_token=2.5, balance_coef=0.05, z_loss_coef=1e-4)
BATCH, LENGTH = 4, 17


def batch() -> torch.Tensor:
    return torch.randint(0, CONFIG.vocab_size, (BATCH, LENGTH), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_checksum_is_exact_and_order_independent(dtype):
    t = torch.randn(64, 33, generator=torch.Generator().manual_seed(0)).to(dtype)
    before = checksum(t)
    assert torch.equal(checksum(t.flatten()[torch.randperm(t.numel())]), before)
    for bit in range(8 * t.element_size()):  # any one-bit flip shows, the sign bit included; flipping back restores
        flip_bit(t, 17, bit)
        assert not torch.equal(checksum(t), before), bit
        flip_bit(t, 17, bit)
        assert torch.equal(checksum(t), before)
    value = float(t.flatten()[0])
    flip_bit(t)  # the default: the top mantissa bit of the first element, which keeps it finite
    assert torch.isfinite(t.flatten()[0]) and float(t.flatten()[0]) != value


def test_the_verdict_names_the_odd_rank_out_and_prefers_a_ranks_own_evidence():
    names = ["a.weight", "b.weight"]
    sums = torch.tensor([[1, 2], [1, 2], [1, 9]])
    never = torch.full((3, 2), -1)
    assert replica_verdict(names, sums[:2], never[:2], 4) is None
    message = replica_verdict(names, sums, never, 4)
    assert "after step 4" in message and "b.weight differs on rank 2 (the other 2 ranks agree" in message
    seen = never.clone()
    seen[0, 0] = 3  # rank 0 saw a.weight change in memory after step 3: that tensor and rank come first
    message = replica_verdict(names, sums, seen, 4)
    assert "rank 0's copy of a.weight no longer matches its own record" in message and "after step 3" in message
    assert "(and 1 more tensor)" in message


def test_recompute_passes_on_a_deterministic_step_and_catches_a_change_between_the_runs():
    model = init_weights(LongcatForCausalLM(CONFIG), 0)
    twin = init_weights(LongcatForCausalLM(CONFIG), 0)
    trainer, plain = Trainer(model, SETTINGS), Trainer(twin, SETTINGS)
    check = RecomputeChecker(trainer, every=2)
    for _ in range(2):  # the second step runs twice; the results equal a plain run's, bit for bit
        assert check.step(batch()) == plain.step(batch())
    assert check.seconds > 0 and trainer.steps_done == 2
    for (name, mine), (_, theirs) in zip(model.state_dict().items(), twin.state_dict().items()):
        assert torch.equal(mine, theirs), name
    name, weight = replicated_tensors(trainer)[0]
    with pytest.raises(RecomputeMismatchError, match=rf"recompute check of step 3\).*rank 0 \(first in {name}\)"):
        check.twice(batch(), between=lambda: flip_bit(weight))


def two_ranks_job(rt):
    """Each scenario on the same two ranks; returns what each check said on this rank (None: it passed)."""
    model = init_weights(LongcatForCausalLM(CONFIG, rt), 0)
    trainer = Trainer(model, SETTINGS)
    ids = batch()[my_rows(BATCH, rt.rank, rt.world_size)]
    name, weight = replicated_tensors(trainer)[0]
    said = {"name": name}

    def outcome(check, *args):
        try:
            check(*args)
            return None
        except (ReplicaMismatchError, RecomputeMismatchError) as exc:
            return str(exc)

    checker = ReplicaChecker(trainer, every=1)
    for _ in range(2):  # clean steps: every check passes
        checker.verify()
        trainer.step(ids)
        checker.record()
    said["clean"] = outcome(checker.verify)
    FaultInjection(rank=1, step=trainer.steps_done).after_step(trainer)  # a flip in memory after the optimizer step
    said["flip"] = outcome(checker.verify, True)
    if rt.rank == 1:
        flip_bit(weight)  # undo it
    checker = ReplicaChecker(trainer, every=1)  # fresh evidence
    if rt.rank == 1:
        flip_bit(weight)
    checker.record()  # as if rank 1's optimizer step had computed the odd copy: no rank has evidence
    said["computed"] = outcome(checker.verify, True)
    if rt.rank == 1:
        flip_bit(weight)
    checker = ReplicaChecker(trainer, every=1)
    flips = []

    def flip_during_the_step():  # as a fault in the forward or backward would: before the update reads it
        if not flips:
            flips.append(flip_bit(weight))
    if rt.rank == 1:
        trainer.before_update.insert(0, flip_during_the_step)
    trainer.step(ids)
    checker.record()
    said["flip_in_step"] = outcome(checker.verify, True)
    said["flip_in_step_step"] = trainer.steps_done - 1
    recompute = RecomputeChecker(trainer, every=1)
    said["recompute"] = outcome(recompute.step, ids)
    said["recompute_flip"] = outcome(recompute.twice, ids, lambda: flip_bit(weight) if rt.rank == 1 else None)
    return said


def test_on_two_ranks_the_checks_name_the_culprit_on_every_rank():
    first, second = run_ranks(two_ranks_job, 2, "cpu-gloo", timeout_s=240)
    for key in ("clean", "flip", "computed", "flip_in_step", "recompute", "recompute_flip"):
        assert first[key] == second[key], key  # every rank reaches the same verdict
    name = first["name"]
    assert first["clean"] is None and first["recompute"] is None
    assert first["flip"].startswith(f"silent data corruption (replica check after step 2): rank 1's copy of {name} "
                                    "differs from the other ranks' copies: it changed in memory after step 2")
    assert f"the copies of {name} differ between ranks 0 and 1" in first["computed"]
    assert f"rank 1's copy of {name} differs from the other ranks' copies: it changed in memory after step " \
           f"{first['flip_in_step_step']}" in first["flip_in_step"]  # seen before the update spread it
    assert "recompute check of step 5" in first["recompute_flip"]
    assert f"rank 1 (first in {name})" in first["recompute_flip"]
