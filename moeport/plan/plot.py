"""`moeport plan --plot FILE.png`: one MoE layer's parts on a timeline under each schedule.

One row per schedule, each with its compute stream above its link; TBO's two micro-batches in
one colour each shade, the steady-state layer of the stack (the middle one). Needs matplotlib
(the `plot` extra: pip install 'moeport[plot]').
"""

from __future__ import annotations

from moeport.base.atomic import atomic_path
from moeport.base.errors import UserError
from moeport.plan.planner import STAGES, Plan
from moeport.plan.report import workload_line
from moeport.plan.schedules import SCHEDULES, Span

_COLOURS = {"attention": "#4C72B0", "dense_ffn": "#55A868", "router": "#8172B2", "experts": "#C44E52",
            "dispatch": "#DD8452", "combine": "#CCB974"}
_STAGE_OF = {part: stage for stage, parts in STAGES.items() for part in parts}


def layer_spans(plan: Plan, schedule: str) -> list[Span]:
    """The spans of one layer under `schedule`, from 0: TBO's middle layer of the stack, else the first."""
    spans = plan.runs[schedule].spans
    layer = plan.model.moe_layers // 2 if schedule == "tbo" else 0
    chosen = [s for s in spans if s.layer == layer] or spans
    origin = min(s.start for s in chosen)
    return [Span(s.name, s.track, s.start - origin, s.end - origin, s.micro_batch, s.layer) for s in chosen]


def draw_plan(plan: Plan, path: str) -> None:
    """Draw the three schedules' layers to `path` (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        raise UserError("--plot: needs matplotlib; install it with pip install 'moeport[plot]'") from None
    fig, axes = plt.subplots(len(SCHEDULES), 1, figsize=(12, 1.7 * len(SCHEDULES) + 1.2), sharex=True)
    for ax, schedule in zip(axes, SCHEDULES):
        for span in layer_spans(plan, schedule):
            y = 1 if span.track == "compute" else 0
            ax.barh(y, (span.end - span.start) * 1e6, left=span.start * 1e6, height=0.7,
                    color=_COLOURS[_STAGE_OF[span.name]], alpha=1.0 if span.micro_batch == 0 else 0.55,
                    hatch="//" if span.micro_batch else None, edgecolor="white", linewidth=0.5)
        ax.set_yticks([0, 1], ["link", "compute"])
        ax.set_ylabel(schedule, rotation=0, ha="right", va="center", fontweight="bold")
        layer_us = plan.runs[schedule].seconds / plan.model.moe_layers * 1e6
        ax.set_title(f"{schedule}: {layer_us:,.1f} us per layer", loc="left", fontsize=9)
    axes[-1].set_xlabel("us (TBO: micro-batch B hatched)")
    handles = [Patch(color=c, label=s) for s, c in _COLOURS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8)
    fig.suptitle(f"{plan.model.name} on {plan.hardware.name}, {plan.workload.phase}: {workload_line(plan)}",
                 fontsize=8, x=0.01, ha="left", y=0.995)
    fig.tight_layout(rect=(0, 0.05, 1, 0.96))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


__all__ = ["draw_plan", "layer_spans"]
