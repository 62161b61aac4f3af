"""Silent-data-corruption checks for training: replicas compared by checksum, steps recomputed, faults injected.

Training is deterministic, so every rank's copy of a replicated weight (everything but
the FFN experts, plus the routers' expert biases) is bit-identical after every step.

- `checksum`: an exact, order-independent fingerprint of a tensor: its bits viewed as
  integers, summed in int64 (wrapping). One pass over memory; any one-bit flip changes it.
- `ReplicaChecker`: records each replicated tensor's checksum right after every optimizer
  step and, in the next step right before the optimizer's update (the Trainer's
  `before_update`), compares this rank's copy against that record: a flip in memory since
  then, between the steps or during the forward and backward, shows on this rank alone,
  and the evidence is kept. Every N steps the ranks
  all-gather their checksums and evidence (one small tensor) through the Communicator;
  each rank then reaches the same verdict from the same data, so every rank raises
  `ReplicaMismatchError` with the same message naming the step, the tensor (its
  checkpoint name) and the rank(s) whose copy differs.
- `RecomputeChecker`: every N steps runs the step twice from the same state and compares
  the step's figures, every weight and router bias bit for bit; a difference on any rank
  raises `RecomputeMismatchError` on every rank.
- `FaultInjection` / `flip_bit`: flips one bit of one replicated weight on one rank after
  one step, for testing the checks.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import torch

from moeport.model.training import StepStats

#: Integer dtypes of each element size, for viewing a tensor's bits.
_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class SilentCorruptionError(RuntimeError):
    """Training found silent data corruption: values that a deterministic run must not have."""


class ReplicaMismatchError(SilentCorruptionError):
    """The ranks' copies of a replicated tensor differ, or a rank's copy changed in memory between steps."""


class RecomputeMismatchError(SilentCorruptionError):
    """The same step, run twice from the same state, gave different results."""


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`'s bits viewed as integers of its element size (no copy)."""
    return tensor.detach().view(_INT_OF_SIZE[tensor.element_size()])


def checksum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor`'s bits as integers, in int64 (0-dim, on its device): exact, independent of the order."""
    return bits(tensor).sum(dtype=torch.int64)


def checksums(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Each tensor's `checksum`, as one int64 vector [len(tensors)]."""
    return torch.stack([checksum(t) for t in tensors])


def replicated_tensors(trainer: Any) -> list[tuple[str, torch.Tensor]]:
    """(checkpoint name, tensor) of everything every rank holds a copy of: the trainer's replicated weights, then
    the routers' expert biases (the compute-budget controller moves them alike on every rank)."""
    named = [(name, p) for name, p in trainer.replicated]
    named += [(name, b) for name, b in trainer.model.named_buffers() if name.endswith("e_score_correction_bias")]
    return named


def _ranks(ranks: list[int]) -> str:
    """'rank 1', 'ranks 0 and 1', 'ranks 0, 2 and 3'."""
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    return "ranks " + ", ".join(str(r) for r in ranks[:-1]) + f" and {ranks[-1]}"


def replica_verdict(names: list[str], sums: torch.Tensor, seen: torch.Tensor, step: int) -> str | None:
    """The message of a replica check after `step` steps, or None when all is well.

    sums [W, T]: each rank's checksum of each tensor; seen [W, T]: the step after which a rank saw its own copy
    change in memory (-1: never). A rank whose own record shows a change is the culprit; without such evidence, the
    ranks outside a strict majority; with no strict majority (two replicas), every rank holding a copy that differs.
    A pure function of gathered data: every rank reaches the same verdict.
    """
    evidence = seen >= 0
    differs = (sums != sums[0:1]).any(dim=0)
    bad = (differs | evidence.any(dim=0)).nonzero().flatten().tolist()
    if not bad:
        return None
    witnessed = evidence.any(dim=0).nonzero().flatten().tolist()
    t = witnessed[0] if witnessed else bad[0]
    more = f" (and {len(bad) - 1} more tensor{'s' if len(bad) > 2 else ''})" if len(bad) > 1 else ""
    head = f"silent data corruption (replica check after step {step})"
    if witnessed:
        culprits = evidence[:, t].nonzero().flatten().tolist()
        how = "differs from the other ranks' copies" if bool(differs[t]) else "no longer matches its own record"
        if len(culprits) == 1:
            r = culprits[0]
            return (f"{head}: rank {r}'s copy of {names[t]} {how}: it changed in memory after step {int(seen[r, t])} "
                    f"(after that step's optimizer step: not a wrong computation){more}")
        when = ", ".join(f"rank {r} after step {int(seen[r, t])}" for r in culprits)
        return (f"{head}: the copies of {names[t]} on {_ranks(culprits)} {how}: each changed in memory after its "
                f"optimizer step ({when}){more}")
    world = sums.shape[0]
    values, counts = sums[:, t].unique(return_counts=True)
    if counts.max() * 2 > world:
        majority = values[counts.argmax()]
        culprits = (sums[:, t] != majority).nonzero().flatten().tolist()
        return (f"{head}: {names[t]} differs on {_ranks(culprits)} (the other {world - len(culprits)} ranks agree; "
                "no rank's own record shows a change in memory: a wrong computation, or a change during an "
                f"update){more}")
    return (f"{head}: the copies of {names[t]} differ between {_ranks(list(range(world)))} (no majority, and no "
            f"rank's own record shows which changed: a wrong computation, or a change during an update){more}")


class ReplicaChecker:
    """Finds replicated tensors whose copies differ: call `record()` right after every optimizer step and
    `verify()` before every step (and before a checkpoint is written); every `every` steps `verify` compares the
    ranks' copies (`every` 0: the checker is off and both do nothing). Every rank calls both at the same points.
    In each step, right before the optimizer's update, this rank's copy is checked against its record. `seconds`
    is the time spent here."""

    def __init__(self, trainer: Any, every: int) -> None:
        self.trainer, self.every = trainer, every
        named = replicated_tensors(trainer)
        self.names = [name for name, _ in named]
        self.tensors = [t for _, t in named]
        self.seconds = 0.0
        self._recorded: torch.Tensor | None = None
        self._seen: torch.Tensor | None = None  # per tensor: the step after which its copy changed here, or -1
        self._compared_at = trainer.steps_done  # the ranks start alike: the first comparison is `every` steps on
        self.record()
        if every > 0:
            trainer.before_update.append(self._note_changes)

    def record(self) -> None:
        """Remember this rank's checksums: the state its optimizer step left (call right after each step)."""
        if self.every <= 0:
            return
        started = time.perf_counter()
        self._recorded = checksums(self.tensors)
        if self._seen is None:
            self._seen = torch.full_like(self._recorded, -1)
        self.seconds += time.perf_counter() - started

    def verify(self, force: bool = False) -> None:
        """Compare this rank's copy against its record (kept, without waiting for the device); when a comparison
        across the ranks is due (every `every` steps, or `force`), compare and raise ReplicaMismatchError on every
        rank at once if any copy differs or any rank's copy changed in memory."""
        if self.every <= 0:
            return
        step = self.trainer.steps_done
        if not (force or (step % self.every == 0 and step != self._compared_at)):
            return
        self._compared_at = step
        current = self._note_changes()
        started = time.perf_counter()
        try:
            self._compare(current, step)
        finally:
            self.seconds += time.perf_counter() - started

    def _note_changes(self) -> torch.Tensor:
        """This rank's checksums now; a tensor that no longer matches its record is noted (kept) as changed in
        memory after the steps done so far."""
        started = time.perf_counter()
        current = checksums(self.tensors)
        changed = (current != self._recorded) & (self._seen < 0)
        self._seen = torch.where(changed, torch.full_like(self._seen, self.trainer.steps_done), self._seen)
        self.seconds += time.perf_counter() - started
        return current

    def _compare(self, current: torch.Tensor, step: int) -> None:
        """Gather every rank's checksums and evidence; raise the common verdict, if any."""
        mine = torch.stack([current, self._seen])  # [2, T]
        comm = self.trainer.comm
        gathered = comm.all_gather(mine) if comm.world_size > 1 else mine  # [2W, T], rank order
        gathered = gathered.cpu()
        message = replica_verdict(self.names, gathered[0::2], gathered[1::2], step)
        if message is not None:
            raise ReplicaMismatchError(message)


def _first_difference(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> int:
    """The position (in `before`'s order) of the first tensor whose bits differ between the two; -1 if none."""
    for index, (name, tensor) in enumerate(before.items()):
        other = after[name]
        if tensor.shape != other.shape or tensor.dtype != other.dtype or not torch.equal(bits(tensor), bits(other)):
            return index
    return -1


def _untimed(stats: StepStats) -> list[Any]:
    """A step's figures without its timings (which no rerun repeats)."""
    return [getattr(stats, f.name) for f in dataclasses.fields(stats) if f.name not in StepStats.TIMED]


def _same_figures(a: StepStats, b: StepStats) -> bool:
    """Whether two steps' figures are bit for bit the same (NaN equal to NaN)."""
    return all(x == y or (isinstance(x, float) and math.isnan(x) and math.isnan(y))
               for x, y in zip(_untimed(a), _untimed(b)))


def _snapshot(model: Any) -> dict[str, torch.Tensor]:
    """A copy of every tensor of the model's state (weights and buffers, the routers' biases among them)."""
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


class RecomputeChecker:
    """Runs every `every`-th step (0: none) twice from the same state and compares the results bit for bit.

    `step(ids)` stands in for `trainer.step(ids)`; every rank calls it together. The run continues from the second
    run's state. `seconds` is the time beyond the step itself (snapshot, restore, second run, comparison).
    """

    def __init__(self, trainer: Any, every: int) -> None:
        self.trainer, self.every = trainer, every
        self.seconds = 0.0

    def due(self) -> bool:
        """Whether the next step is one to run twice (the every-th, 2*every-th, ... step)."""
        return self.every > 0 and (self.trainer.steps_done + 1) % self.every == 0

    def step(self, ids: torch.Tensor) -> StepStats:
        """The next training step: run twice and compared when due, else once."""
        return self.twice(ids) if self.due() else self.trainer.step(ids)

    def twice(self, ids: torch.Tensor, between: Callable[[], None] | None = None) -> StepStats:
        """Run the next step, restore the model's and the trainer's state, call `between` (for tests), run it
        again and compare the figures, weights and router biases; RecomputeMismatchError on every rank if any
        rank's runs differ. Returns the second run's figures."""
        trainer, model = self.trainer, self.trainer.model
        started = time.perf_counter()
        weights, state = _snapshot(model), copy.deepcopy(trainer.state_dict())
        step = trainer.steps_done
        first_started = time.perf_counter()
        first = trainer.step(ids)
        first_seconds = time.perf_counter() - first_started
        after_first = _snapshot(model)
        with torch.no_grad():
            model.load_state_dict(weights)
        trainer.load_state_dict(state)
        if between is not None:
            between()
        second = trainer.step(ids)
        names = list(after_first)
        index = _first_difference(after_first, model.state_dict())
        if index < 0 and not _same_figures(first, second):
            index = len(names)  # only the figures differ
        self._agree(names + ["the step's figures (loss, gradient norm, ...)"], index, step)
        self.seconds += time.perf_counter() - started - first_seconds
        return second

    def _agree(self, names: list[str], index: int, step: int) -> None:
        """Share each rank's first difference (-1: none); raise the same error on every rank if any differs."""
        comm = self.trainer.comm
        mine = torch.tensor([index], dtype=torch.int64, device=self.trainer.model.device)
        found = (comm.all_gather(mine) if comm.world_size > 1 else mine).cpu().tolist()
        differing = [(rank, at) for rank, at in enumerate(found) if at >= 0]
        if differing:
            where = ", ".join(f"rank {rank} (first in {names[at]})" for rank, at in differing)
            raise RecomputeMismatchError(
                f"silent data corruption (recompute check of step {step + 1}): the same step run twice from the "
                f"same state gave different results on {where}")


@dataclasses.dataclass(frozen=True)
class FaultInjection:
    """A fault for testing the checks: on `rank`, right after `step` steps, flip one bit (`flip_bit`) of the first
    element of the first replicated weight (`replicated_tensors(trainer)[0]`)."""

    rank: int
    step: int

    def after_step(self, trainer: Any) -> str | None:
        """Inject the fault if this is its rank and step (call right after each step); the tensor's name, or None."""
        if trainer.comm.rank != self.rank or trainer.steps_done != self.step:
            return None
        name, tensor = replicated_tensors(trainer)[0]
        flip_bit(tensor)
        return name


def top_mantissa_bit(dtype: torch.dtype) -> int:
    """The highest mantissa bit of a floating-point dtype (float32: 22): flipping it changes the value by a third
    or more and leaves it finite."""
    return round(-math.log2(torch.finfo(dtype).eps)) - 1


def flip_bit(tensor: torch.Tensor, index: int = 0, bit: int | None = None) -> int:
    """Flip bit `bit` (default: `top_mantissa_bit`) of element `index` of `tensor` (flattened), in place, as a memory
    fault would; returns the bit."""
    bit = top_mantissa_bit(tensor.dtype) if bit is None else bit
    width = 8 * tensor.element_size()
    if not 0 <= bit < width:
        raise ValueError(f"bit {bit}: expected 0 to {width - 1} for {tensor.dtype}")
    mask = 1 << bit
    if mask >= 1 << (width - 1):  # the sign bit, as a signed integer of that width
        mask -= 1 << width
    with torch.no_grad():
        bits(tensor).view(-1)[index] ^= mask
    return bit


__all__ = ["FaultInjection", "RecomputeChecker", "RecomputeMismatchError", "ReplicaChecker", "ReplicaMismatchError",
           "SilentCorruptionError", "bits", "checksum", "checksums", "flip_bit", "replica_verdict",
           "replicated_tensors", "top_mantissa_bit"]
