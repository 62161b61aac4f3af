"""A plan: one model on one hardware, for one workload and phase, under each schedule.

`make_plan` resolves the workload (the expert-parallel degree and FFN experts per token the plan
leaves open), costs every part of a layer (stages.py) for the whole batch and for half of it,
drives the three schedules (schedules.py) and returns the figures `moeport plan` prints: per-stage
times, and per schedule the layer time, the time per output token, tokens/s per user and per
device, and the cost per million tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from moeport.base.errors import UserError
from moeport.plan.architectures import Architecture
from moeport.plan.hardware import HardwareSpec
from moeport.plan.schedules import SCHEDULES, Run, run_schedule, steps_of
from moeport.plan.stages import (
    Workload,
    decode_workload,
    dense_layer_parts,
    head,
    layer_parts,
    prefill_workload,
    time_of,
)
from moeport.plan.workload import PlanSection

PHASES = ("decode", "prefill")
#: The stages `stages_us` reports, each the sum of these parts of one MoE layer (both attention sublayers
#: together where the model has two; DeepSeek-V3's dense_ffn is its shared expert).
STAGES = {
    "attention": ("attn0", "attn1_qkv", "attn1_core", "attn"),
    "dense_ffn": ("ffn0", "ffn1", "shared"),
    "router": ("router",),
    "experts": ("experts",),
    "dispatch": ("dispatch",),
    "combine": ("combine",),
}
#: The serving scale the default expert-parallel degree stops at: 128 devices, as LongCat-Flash's and
#: DeepSeek-V3's reported deployments (the LongCat-Flash report: 128 H800).
DEFAULT_MAX_EP = 128


def default_ep(model: Architecture) -> int:
    """The largest divisor of the model's FFN experts up to DEFAULT_MAX_EP."""
    return max(d for d in range(1, min(model.experts, DEFAULT_MAX_EP) + 1) if model.experts % d == 0)


def resolve_workload(model: Architecture, section: PlanSection, phase: str, source: str) -> Workload:
    """The workload of `phase` the plan describes, its open values filled in and checked against the model."""
    if phase not in PHASES:
        raise UserError(f"--phase {phase}: expected one of {', '.join(PHASES)}")
    ep = section.ep if section.ep is not None else default_ep(model)
    if ep > model.experts or model.experts % ep:
        how = "is larger than" if ep > model.experts else "does not divide"
        raise UserError(f"{source}: plan.ep: {ep} {how} the {model.experts} FFN experts of {model.name}")
    k = section.ffn_experts_per_token
    k = model.default_ffn_experts_per_token() if k is None else k
    if k > model.top_k:
        raise UserError(f"{source}: plan.ffn_experts_per_token: {k:g} is more than the top-{model.top_k} slots "
                        f"of {model.name}")
    rest = {"ep": ep, "ffn_experts_per_token": k, "weight_dtype": section.weight_dtype,
                "dispatch_dtype": section.dispatch_dtype, "combine_dtype": section.combine_dtype}
    if phase == "decode":
        return decode_workload(section.batch_per_device, section.context_length, **rest)
    return prefill_workload(section.prefill_tokens, section.context_length, **rest)


@dataclasses.dataclass(frozen=True)
class Plan:
    """A costed plan: its inputs, each part's time (whole batch and half), and each schedule's run."""

    model: Architecture
    hardware: HardwareSpec
    section: PlanSection
    workload: Workload
    parts: dict[str, tuple[float, str]]  # part -> (seconds, bound), whole batch
    half_parts: dict[str, float]  # part -> seconds, one micro-batch of half the batch
    dense_layer: tuple[float, float]  # seconds of one dense layer: whole batch, half
    head: float  # seconds per forward: embedding, final norm, lm_head
    runs: dict[str, Run]  # schedule -> its run over the MoE layers


def make_plan(model: Architecture, hardware: HardwareSpec, section: PlanSection, phase: str = "decode",
              source: str = "plan") -> Plan:
    """Cost `model` on `hardware` for the workload `section` describes, in `phase`, under every schedule."""
    wl = resolve_workload(model, section, phase, source)
    half = wl.split(2)
    parts = {name: time_of(work, hardware, wl) for name, work in layer_parts(model, wl).items()}
    half_parts = {name: time_of(work, hardware, half).seconds for name, work in layer_parts(model, half).items()}
    dense_full = sum(time_of(w, hardware, wl).seconds for w in dense_layer_parts(model, wl).values())
    dense_half = sum(time_of(w, hardware, half).seconds for w in dense_layer_parts(model, half).values())
    full = {name: timed.seconds for name, timed in parts.items()}
    steps = steps_of(model.layout)
    runs = {s: run_schedule(s, steps, full, half_parts, model.moe_layers) for s in SCHEDULES}
    return Plan(model, hardware, section, wl, {n: (t.seconds, t.bound) for n, t in parts.items()}, half_parts,
                (dense_full, dense_half), time_of(head(model, wl), hardware, wl).seconds, runs)


def stages_seconds(plan: Plan) -> dict[str, float]:
    """The reported stages of one MoE layer (whole batch), in seconds."""
    return {stage: sum(plan.parts[p][0] for p in parts if p in plan.parts) for stage, parts in STAGES.items()}


def schedule_figures(plan: Plan, schedule: str) -> dict[str, float | None]:
    """Layer time, step time, time per output token, tokens/s per user and per device, $ per million tokens.

    A step is every layer and the head once. In the prefill phase the step is one chunk and the
    throughput and cost are of input tokens; tpot_ms and tokens_per_s_per_user are None there."""
    run, wl, model = plan.runs[schedule], plan.workload, plan.model
    dense = plan.dense_layer[0] if schedule != "tbo" else 2 * plan.dense_layer[1]
    step = run.seconds + model.dense_layers * dense + plan.head
    out: dict[str, float | None] = {
        "layer_us": run.seconds / model.moe_layers * 1e6,
        "exposed_comm_us": run.exposed / model.moe_layers * 1e6,
        "step_ms": step * 1e3,
    }
    if wl.decoding:
        tpot = step / plan.section.tokens_per_step
        per_user, per_device = 1.0 / tpot, wl.sequences / tpot
        out.update(tpot_ms=tpot * 1e3, tokens_per_s_per_user=per_user, tokens_per_s_per_device=per_device)
    else:
        per_device = wl.tokens / step
        out.update(tpot_ms=None, tokens_per_s_per_user=None, tokens_per_s_per_device=per_device)
    price = plan.hardware.price_per_hour
    out["usd_per_million_tokens"] = None if price is None else price / 3600.0 / per_device * 1e6
    return out


def plan_json(plan: Plan) -> dict[str, Any]:
    """The plan as one JSON-ready object (what `moeport plan --json` prints)."""
    wl = plan.workload
    return {
        "phase": wl.phase,
        "model": plan.model.describe(),
        "hardware": plan.hardware.model_dump(),
        "plan": {**plan.section.model_dump(), "ep": wl.ep, "ffn_experts_per_token": wl.ffn_experts_per_token},
        "stages_us": {stage: seconds * 1e6 for stage, seconds in stages_seconds(plan).items()},
        "parts": {name: {"us": seconds * 1e6, "bound": bound} for name, (seconds, bound) in plan.parts.items()},
        "dense_layer_us": plan.dense_layer[0] * 1e6 if plan.model.dense_layers else None,
        "head_us": plan.head * 1e6,
        "schedules": {schedule: schedule_figures(plan, schedule) for schedule in SCHEDULES},
    }


__all__ = [
    "PHASES",
    "STAGES",
    "Plan",
    "default_ep",
    "make_plan",
    "plan_json",
    "resolve_workload",
    "schedule_figures",
    "stages_seconds",
]
