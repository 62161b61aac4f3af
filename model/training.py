"""One expert-parallel training step of LongCat-Flash, on any backend and collective library.

Every rank holds its share of the batch (data-parallel attention) and its FFN experts;
the forward runs under the model's schedule, with gradients through the dispatch, the
combine and the zero-computation experts (the differentiable exchange). The loss is each
rank's share of the global batch's objective (model/objective.py: next-token loss,
device-level balance loss, hidden z-loss), so after `backward`:

- each FFN expert's gradient is complete on its owning rank (its tokens came from every
  rank), and its optimizer state lives only there;
- every replicated weight's gradient is summed over the ranks through the Communicator
  (whatever collective library the profile picks), in buckets issued asynchronously
  as the backward produces them, then waited for (model/grad_sync.py).

Then the gradient norm is clipped over the whole model (experts counted once, on their
owners), a NaN or Inf stops the run naming the step, the rank and the first tensor where
it appeared, AdamW steps (the report's epsilon by default), and the compute-budget
controller moves every router's expert bias by the same amount on every rank.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Callable, ClassVar

import torch

from moeport.collectives.base import Communicator
from moeport.model.grad_sync import GradientBuckets
from moeport.model.objective import (
    balance_loss,
    expert_groups,
    group_counts,
    hidden_z_loss,
    next_token_loss,
    update_expert_bias,
)
from moeport.model.router import Routing
from moeport.model.timeline import Timeline, summarize


class NonFiniteError(RuntimeError):
    """A NaN or Inf appeared: in which step, on which rank, in which tensor first."""


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """What a training step needs beyond the model (the profile's `train:` section fills it).

    ffn_experts_per_token is K_e; balance_groups is D (None: one group per expert-parallel rank);
    bias_update_rate is the controller's mu at step 0, times bias_update_decay each step.
    """

    lr: float = 1e-3
    ffn_experts_per_token: float = 8.0
    balance_coef: float = 0.01
    balance_groups: int | None = None
    z_loss_coef: float = 1e-6
    bias_update_rate: float = 1e-3
    bias_update_decay: float = 1.0
    adam_eps: float = 1e-16  # the LongCat-Flash report's: far below the gradients' RMS
    adam_betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_steps: int = 0
    lr_decay: str = "constant"  # or "cosine": from lr after warmup down to 0 at total_steps
    total_steps: int = 0
    lr_multipliers: dict[str, float] = dataclasses.field(default_factory=dict)  # by PARAMETER_GROUPS name

    def lr_factor(self, step: int) -> float:
        """The learning rate at `step` (from 0) as a fraction of lr: linear warmup, then constant or cosine."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.lr_decay == "cosine" and self.total_steps > self.warmup_steps:
            progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0


#: The parameter groups a learning-rate multiplier may name: embedding (the input embedding), unembedding
#: (lm_head), router (its classifier), experts (the FFN experts), norm (every norm's weight), hidden (the rest).
PARAMETER_GROUPS = ("embedding", "unembedding", "router", "experts", "norm", "hidden")


def group_multipliers(multipliers: Mapping[str, float] | None, what: str = "") -> dict[str, float]:
    """Per-group multipliers (learning rate, init std) with every PARAMETER_GROUPS name present, a missing one 1;
    a ValueError (starting with `what`, where given) names an unknown group or a negative multiplier."""
    given = dict(multipliers or {})
    prefix = f"{what}: " if what else ""
    for group, value in given.items():
        if group not in PARAMETER_GROUPS:
            raise ValueError(f"{prefix}unknown parameter group {group!r}; expected one of {', '.join(PARAMETER_GROUPS)}")
        if value < 0:
            raise ValueError(f"{prefix}{group}: expected a multiplier of 0 or more, got {value}")
    return {group: float(given.get(group, 1.0)) for group in PARAMETER_GROUPS}


def parameter_group(name: str) -> str:
    """The PARAMETER_GROUPS entry of a parameter, by its name in the model."""
    if name.startswith("model.embed_tokens."):
        return "embedding"
    if name.startswith("lm_head."):
        return "unembedding"
    if ".mlp.router." in name:
        return "router"
    if is_expert_parameter(name):
        return "experts"
    if "norm" in name:
        return "norm"
    return "hidden"


@dataclasses.dataclass
class StepStats:
    """One step's figures: the global loss and its terms, the gradient norm before clipping, the average FFN
    experts per token and the zero-expert share of the slots (the same on every rank); with a timeline, this
    rank's step time and the parts of it its compute waited for the MoE's exchanges (dispatch and combine,
    forward and backward) and for the replicated gradients' sums (else zeros)."""

    step: int
    loss: float
    lm_loss: float
    balance_loss: float
    z_loss: float
    grad_norm: float
    ffn_experts_per_token: float
    zero_expert_share: float
    #: The timing fields: each rank's own, and never the same twice.
    TIMED: ClassVar[tuple[str, ...]] = ("seconds", "moe_comm_exposed_seconds", "grad_sync_exposed_seconds")
    seconds: float = 0.0
    moe_comm_exposed_seconds: float = 0.0
    grad_sync_exposed_seconds: float = 0.0


def is_expert_parameter(name: str) -> bool:
    """Whether a parameter is an FFN expert's (held by its owning rank alone)."""
    return ".mlp.experts." in name


class Trainer:
    """Trains `model` (this rank's part of it) with `settings`; `step(ids)` runs one step on this rank's rows
    ids [B, S + 1] (inputs and, shifted by one, targets); every rank calls it together. With `new_timeline`
    (a function making an empty Timeline) each step is timed and StepStats carries where the time went.
    `close()` releases the gradients' own communicator."""

    def __init__(self, model: Any, settings: TrainSettings, new_timeline: Callable[[], Timeline] | None = None) -> None:
        self.model, self.settings, self.new_timeline = model, settings, new_timeline
        self.comm: Communicator = model.context.ep
        config = model.config
        self.groups = settings.balance_groups or self.comm.world_size
        self.group_of = expert_groups(config.n_routed_experts, config.zero_expert_num, self.groups, model.device)
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.replicated = [(n, p) for n, p in self.named if not is_expert_parameter(n)]
        self.grad_sync: GradientBuckets | None = None
        if self.comm.world_size > 1:
            self.grad_sync = GradientBuckets(self.replicated, self.comm.new_group(list(range(self.comm.world_size))))
        groups: dict[str, list[torch.nn.Parameter]] = {}
        for name, p in self.named:
            groups.setdefault(parameter_group(name), []).append(p)
        self.optimizer = torch.optim.AdamW(
            [{"params": params, "group": group, "multiplier": settings.lr_multipliers.get(group, 1.0)}
             for group, params in groups.items()],
            lr=settings.lr, betas=settings.adam_betas, eps=settings.adam_eps, weight_decay=settings.weight_decay)
        self.steps_done = 0
        self.before_update: list[Callable[[], Any]] = []  # called in every step right before the optimizer's update
        self._routings: list[Routing] = []
        self._hidden: list[torch.Tensor] = []
        self._recording = False  # only the trainer's own forwards are recorded
        for layer in model.model.layers:
            layer.mlp.router.register_forward_hook(lambda _m, _i, out: self._record(self._routings, out))
            layer.register_forward_hook(lambda _m, _i, out: self._record(self._hidden, out))

    def _record(self, into: list, value: Any) -> None:
        if self._recording:
            into.append(value)

    def router_grad_ratio(self, ids: torch.Tensor) -> float:
        """||grad of the balance loss|| / ||grad of the next-token loss|| on the routers' classifiers, over the
        global batch (this rank's rows `ids` [B, S + 1]); the report keeps it below about 0.1. Leaves no
        gradient behind."""
        routers = [layer.mlp.router.classifier.weight for layer in self.model.model.layers]
        self.model.train()
        lm, balance, _, _ = self.losses(ids.to(self.model.device))
        norms = []
        for term in (balance, lm):
            grads = torch.autograd.grad(term, routers, retain_graph=True, allow_unused=True)
            flat = torch.cat([(g if g is not None else torch.zeros_like(w)).reshape(-1)
                              for g, w in zip(grads, routers)]).to(torch.float32)
            norms.append(float(self._global_sum(flat).norm()))
        return norms[0] / norms[1] if norms[1] > 0 else float("inf")

    def state_dict(self) -> dict[str, Any]:
        """This rank's training state beyond the weights (the controller's lives in the routers' biases): the
        steps done and the optimizer's state (of this rank's parameters: its experts' only here)."""
        return {"steps_done": self.steps_done, "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict` of the same rank of the same layout."""
        self.steps_done = int(state["steps_done"])
        self.optimizer.load_state_dict(state["optimizer"])

    def _global_sum(self, values: torch.Tensor) -> torch.Tensor:
        """`values` summed over the expert-parallel ranks (a copy)."""
        values = values.detach().clone()
        return self.comm.all_reduce(values) if self.comm.world_size > 1 else values

    def losses(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's shares of (next-token, balance, z) losses and the global slot counts per expert [L, N + Z]."""
        s, config = self.settings, self.model.config
        inputs, targets = ids[:, :-1], ids[:, 1:]
        total = int(self._global_sum(torch.tensor([float(targets.numel())]))[0])
        self._routings.clear()
        self._hidden.clear()
        self._recording = True
        try:
            logits = self.model(inputs)
        finally:
            self._recording = False
        lm = next_token_loss(logits, targets, total)
        slots = torch.stack([torch.bincount(r.ids.reshape(-1), minlength=config.num_experts_total)
                             for r in self._routings]).to(torch.float32)
        slots = self._global_sum(slots)
        balance = sum(
            balance_loss(r.scores, self.group_of, group_counts(row, self.group_of, self.groups), self.groups,
                         s.ffn_experts_per_token, config.moe_topk, total, s.balance_coef)
            for r, row in zip(self._routings, slots))
        z = sum(hidden_z_loss(h, total, s.z_loss_coef) for h in self._hidden)
        return lm, balance, z, slots

    def close(self) -> None:
        """Release the communicator the gradients' sums travel on (every rank together, after the last step)."""
        if self.grad_sync is not None:
            self.grad_sync.comm.close()
            self.grad_sync = None

    def step(self, ids: torch.Tensor) -> StepStats:
        """One training step on this rank's rows; returns the step's figures."""
        timeline = self.new_timeline() if self.new_timeline is not None else None
        if timeline is not None:
            start = timeline.mark()
        self.model.timeline = timeline
        if self.grad_sync is not None:
            self.grad_sync.mark = timeline.mark if timeline is not None else None
        try:
            stats = self._step(ids)
        finally:
            self.model.timeline = None
        if timeline is None:
            return stats
        end = timeline.mark()
        moe = summarize(timeline.spans())["exposed_comm_seconds"]  # every comm span on it is a MoE exchange
        sync = sum(a.elapsed_time(b) for a, b in self.grad_sync.blocked) / 1e3 if self.grad_sync is not None else 0.0
        return dataclasses.replace(stats, seconds=start.elapsed_time(end) / 1e3, moe_comm_exposed_seconds=moe,
                                   grad_sync_exposed_seconds=sync)

    def _step(self, ids: torch.Tensor) -> StepStats:
        self.model.train()
        lm, balance, z, slots = self.losses(ids.to(self.model.device))
        loss = lm + balance + z
        self._stop_if_any(self._first_nonfinite_forward(loss))  # before backward: every rank stops together
        if self.grad_sync is not None:
            self.grad_sync.arm()
        loss.backward()
        self._sync_gradients()
        self._stop_if_any(self._first_nonfinite_gradient())
        norm = self._clip()
        factor = self.settings.lr_factor(self.steps_done)
        for group in self.optimizer.param_groups:
            group["lr"] = self.settings.lr * group["multiplier"] * factor
        for call in self.before_update:
            call()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._control(slots)
        terms = self._global_sum(torch.stack([lm.detach(), torch.as_tensor(balance).detach(),
                                              torch.as_tensor(z).detach()]).to(torch.float32))
        config = self.model.config
        ffn = slots[:, : config.n_routed_experts].sum(dim=1)
        tokens = slots.sum(dim=1) / config.moe_topk
        self.steps_done += 1
        return StepStats(self.steps_done - 1, float(terms.sum()), float(terms[0]), float(terms[1]), float(terms[2]),
                         norm, float((ffn / tokens).mean()), float(1.0 - (ffn / slots.sum(dim=1)).mean()))

    def _sync_gradients(self) -> None:
        """Sum every replicated weight's gradient over the ranks: the buckets the backward has not issued yet
        are issued, then all are waited for."""
        if self.grad_sync is not None:
            self.grad_sync.finish()

    def _first_nonfinite_forward(self, loss: torch.Tensor) -> str | None:
        """Where this rank's forward first went NaN or Inf: the first layer output that did, else the loss."""
        if torch.isfinite(loss).all():
            return None
        for index, hidden in enumerate(self._hidden):
            if not torch.isfinite(hidden).all():
                return f"the output of layer {index}"
        return "the loss"

    def _first_nonfinite_gradient(self) -> str | None:
        """The first parameter whose gradient holds a NaN or Inf on this rank, in parameter order."""
        for name, p in self.named:
            if p.grad is not None and not torch.isfinite(p.grad).all():
                return f"the gradient of {name}"
        return None

    def _stop_if_any(self, first: str | None) -> None:
        """Stop the run on every rank where any rank found a NaN or Inf, naming the step, the rank and the first
        tensor (a rank that found none says so)."""
        bad = self._global_sum(torch.tensor([0.0 if first is None else 1.0]))
        if bad.item() > 0:
            where = first or "none of this rank's tensors (another rank's)"
            raise NonFiniteError(f"step {self.steps_done}, rank {self.comm.rank}: NaN or Inf in {where}")

    def _clip(self) -> float:
        """Scale the gradients so their global norm is at most grad_clip; returns the norm before."""
        replicated = sum(float(p.grad.detach().to(torch.float32).square().sum()) for _, p in self.replicated)
        experts = sum(float(p.grad.detach().to(torch.float32).square().sum())
                      for n, p in self.named if is_expert_parameter(n) and p.grad is not None)
        # float32 on every rank, also where this rank's experts had no slot (no gradient: a sum of nothing)
        norm = math.sqrt(replicated + float(self._global_sum(torch.tensor([float(experts)]))[0]))
        if self.settings.grad_clip > 0 and norm > self.settings.grad_clip:
            for _, p in self.named:
                if p.grad is not None:
                    p.grad.mul_(self.settings.grad_clip / (norm + 1e-6))
        return norm

    def _control(self, slots: torch.Tensor) -> None:
        """The compute-budget controller's step on every layer's router bias, from the global slot counts."""
        s, config = self.settings, self.model.config
        rate = s.bias_update_rate * s.bias_update_decay ** self.steps_done
        for layer, row in zip(self.model.model.layers, slots):
            tokens = float(row.sum()) / config.moe_topk
            update_expert_bias(layer.mlp.router.e_score_correction_bias, row[: config.n_routed_experts], tokens,
                               s.ffn_experts_per_token, config.moe_topk, rate)


__all__ = ["PARAMETER_GROUPS", "NonFiniteError", "StepStats", "TrainSettings", "Trainer", "group_multipliers",
           "is_expert_parameter", "parameter_group"]
