"""The text `moeport plan` prints: the workload, one MoE layer's stages, and each schedule's figures."""

from __future__ import annotations

from moeport.plan.planner import STAGES, Plan, schedule_figures, stages_seconds
from moeport.plan.schedules import SCHEDULES


def _number(value: float | None, digits: int = 1) -> str:
    """A figure, or "-" where there is none (no price; per-user figures of a prefill)."""
    return "-" if value is None else f"{value:,.{digits}f}"


def workload_line(plan: Plan) -> str:
    """One line naming the workload as resolved (ep and FFN experts per token filled in)."""
    wl, s, m = plan.workload, plan.section, plan.model
    who = (f"{s.batch_per_device} sequences per device, context {s.context_length}" if wl.decoding else
           f"{s.prefill_tokens} prompt tokens per device ({wl.sequences:g} prompt(s) of {wl.new + wl.past:g})")
    return (f"{who}, ep {wl.ep}, {wl.ffn_experts_per_token:g} FFN experts per token of top-{m.top_k}; weights "
            f"{wl.weight_dtype}, dispatch {wl.dispatch_dtype}, combine {wl.combine_dtype}"
            + (f", {s.tokens_per_step:g} output token(s) per sequence per step" if wl.decoding else ""))


def format_plan(plan: Plan) -> str:
    """The whole report, as printed."""
    m, hw, wl = plan.model, plan.hardware, plan.workload
    layers = f"{m.moe_layers} MoE layers" + (f" and {m.dense_layers} dense ones" if m.dense_layers else "")
    lines = [f"moeport plan: {m.name} on {hw.name}, {wl.phase} ({layers})", f"  {workload_line(plan)}", "",
             "one MoE layer, per stage:", f"  {'stage':<10} {'us':>10}  {'bound':<11} parts (us)"]
    for stage, seconds in stages_seconds(plan).items():
        parts = [p for p in STAGES[stage] if p in plan.parts]
        bound = max(parts, key=lambda p: plan.parts[p][0])
        detail = ", ".join(f"{p} {plan.parts[p][0] * 1e6:,.1f}" for p in parts) if len(parts) > 1 else ""
        lines.append(f"  {stage:<10} {seconds * 1e6:>10,.1f}  {plan.parts[bound][1]:<11} {detail}".rstrip())
    extra = f"head (embedding, final norm, lm_head) {plan.head * 1e6:,.1f} us per forward"
    if m.dense_layers:
        extra += f"; each dense layer {plan.dense_layer[0] * 1e6:,.1f} us"
    lines += [f"  {extra}", ""]
    if wl.decoding:
        header = ["schedule", "layer us", "exposed us", "step ms", "TPOT ms", "tok/s/user", "tok/s/device", "$/M tok"]
    else:
        header = ["schedule", "layer us", "exposed us", "chunk ms", "", "", "tok/s/device", "$/M tok"]
    widths = [10, 10, 11, 10, 9, 11, 13, 9]
    lines.append("".join(f"{h:>{w}}" if i else f"  {h:<{w}}" for i, (h, w) in enumerate(zip(header, widths))))
    for schedule in SCHEDULES:
        f = schedule_figures(plan, schedule)
        cells = [schedule, _number(f["layer_us"]), _number(f["exposed_comm_us"]), _number(f["step_ms"], 2),
                 _number(f["tpot_ms"], 2) if wl.decoding else "", _number(f["tokens_per_s_per_user"]) if wl.decoding
                 else "", _number(f["tokens_per_s_per_device"], 0), _number(f["usd_per_million_tokens"], 3)]
        lines.append("".join(f"{c:>{w}}" if i else f"  {c:<{w}}" for i, (c, w) in enumerate(zip(cells, widths))))
    if not wl.decoding:
        lines.append("  (prefill: throughput and cost are of prompt tokens)")
    return "\n".join(lines)


__all__ = ["format_plan", "workload_line"]
