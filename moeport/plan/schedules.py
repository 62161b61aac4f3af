"""The three schedules of one layer, as a compute stream and a link driven over the layer's steps.

A layer is the runtime's step list (model/layer.py: compute steps, and for each communication
an Issue and a Wait), one compute stream runs the compute steps in order, and one link
carries the communications one after another. A communication starts when it is issued and
the link is free; a Wait holds the compute stream until its communication has arrived, so only
what the compute between an Issue and its Wait covers is hidden: max(0, comm - window) is
exposed.

- sequential: every communication is waited for as soon as it is issued (sum of the parts);
- sbo: LongCat's single-batch overlap: each communication waited for at its Wait step (for
  LongCat-Flash: the dispatch behind FFN0 and attention 1's projections, the combine behind
  attention 1's core and FFN1; for DeepSeek-V3 only the shared expert covers the dispatch);
- tbo: two-micro-batch overlap (DeepSeek-style): the batch is split into two micro-batches of
  half the tokens each, and the compute stream alternates between them at each Issue (SGLang's
  yield points), so each all_to_all is hidden by the other micro-batch's compute as well as its
  own window. Every compute part is costed at half the tokens but reads its weights in full for
  each micro-batch, and launches its operators twice. The layers run back to back, so a
  micro-batch's combine may overlap the other's next attention; the layer time is the whole
  stack's time over its layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

#: A step: ("compute" | "issue" | "wait", part name).
Step = tuple[str, str]

SCMOE_STEPS: list[Step] = [
    ("compute", "attn0"), ("compute", "router"), ("issue", "dispatch"), ("compute", "ffn0"),
    ("compute", "attn1_qkv"), ("wait", "dispatch"), ("compute", "experts"), ("issue", "combine"),
    ("compute", "attn1_core"), ("compute", "ffn1"), ("wait", "combine"),
]
MOE_STEPS: list[Step] = [
    ("compute", "attn"), ("compute", "router"), ("issue", "dispatch"), ("compute", "shared"), ("wait", "dispatch"),
    ("compute", "experts"), ("issue", "combine"), ("wait", "combine"),
]
SCHEDULES = ("sequential", "sbo", "tbo")


def steps_of(layout: str) -> list[Step]:
    """The step list of an MoE layer of `layout` ("scmoe" or "moe")."""
    return SCMOE_STEPS if layout == "scmoe" else MOE_STEPS


def windows(steps: Sequence[Step]) -> dict[str, list[str]]:
    """Per communication, the compute steps between its Issue and its Wait (as schedule.overlap_windows)."""
    out: dict[str, list[str]] = {}
    open_now: list[str] = []
    for kind, name in steps:
        if kind == "issue":
            out[name] = []
            open_now.append(name)
        elif kind == "wait":
            open_now.remove(name)
        else:
            for comm in open_now:
                out[comm].append(name)
    return out


def stages(steps: Sequence[Step]) -> list[list[Step]]:
    """The steps cut after each Issue: the points where two micro-batches take turns."""
    out: list[list[Step]] = [[]]
    for step in steps:
        out[-1].append(step)
        if step[0] == "issue":
            out.append([])
    return [stage for stage in out if stage]


@dataclasses.dataclass(frozen=True)
class Span:
    """One part on the timeline, in seconds: on the compute stream or the link, of a micro-batch and layer."""

    name: str
    track: str  # "compute" or "link"
    start: float
    end: float
    micro_batch: int = 0
    layer: int = 0


@dataclasses.dataclass(frozen=True)
class Run:
    """A simulated run: its total time, the time the compute stream waited for the link, and every span."""

    seconds: float
    exposed: float
    spans: list[Span]


def simulate(steps: Sequence[Step], times: Sequence[dict[str, float]], layers: int = 1,
             wait_at_issue: bool = False) -> Run:
    """Run `layers` layers of `steps` for each micro-batch (`times[i]`: part -> seconds of micro-batch i),
    alternating between micro-batches at each Issue; `wait_at_issue` waits for each communication at once."""
    order = [(layer, mb, step) for layer in range(layers) for stage in stages(steps)
             for mb in range(len(times)) for step in stage]
    now = link_free = exposed = 0.0
    arrives: dict[tuple[int, str], float] = {}
    spans: list[Span] = []
    for layer, mb, (kind, name) in order:
        seconds = times[mb][name]
        if kind == "compute":
            spans.append(Span(name, "compute", now, now + seconds, mb, layer))
            now += seconds
            continue
        if kind == "issue":
            start = max(now, link_free)
            link_free = start + seconds
            spans.append(Span(name, "link", start, link_free, mb, layer))
            if wait_at_issue:
                exposed += max(0.0, link_free - now)
                now = max(now, link_free)
            else:
                arrives[(mb, name)] = link_free
        elif not wait_at_issue:  # a Wait
            ready = arrives.pop((mb, name))
            exposed += max(0.0, ready - now)
            now = max(now, ready)
    return Run(max(now, link_free), exposed, spans)


def run_schedule(schedule: str, steps: Sequence[Step], full: dict[str, float], half: dict[str, float],
                 layers: int) -> Run:
    """One schedule over `layers` MoE layers: `full` the parts' times for the whole batch, `half` for a
    micro-batch of half of it (TBO)."""
    if schedule == "sequential":
        return _repeat(simulate(steps, [full], 1, wait_at_issue=True), layers)
    if schedule == "sbo":
        return _repeat(simulate(steps, [full], 1), layers)
    if schedule == "tbo":
        return simulate(steps, [half, half], layers)
    raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")


def _repeat(one: Run, layers: int) -> Run:
    """A layer that leaves nothing in flight, `layers` times over (the spans are the first layer's)."""
    return Run(one.seconds * layers, one.exposed * layers, one.spans)


__all__ = [
    "MOE_STEPS",
    "SCHEDULES",
    "SCMOE_STEPS",
    "Run",
    "Span",
    "run_schedule",
    "simulate",
    "stages",
    "steps_of",
    "windows",
]
