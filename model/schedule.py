"""The pieces a layer's step list is made of, and the two schedules that drive it.

A layer is a flat list of steps over one state object: `Compute` steps run on the
compute stream; an `Issue` step starts a communication and returns a Handle; the
`Wait` step of the same name receives that Handle's result. A schedule is a driver of
the list: both run the same Compute steps in the same order, so their results are
bit-identical; they differ only in when a communication is waited for:

- sequential: right after it is issued (communication never overlaps compute);
- overlap:    at its Wait step, so the Compute steps between Issue and Wait run
              while the communication is in flight (LongCat's single-batch overlap).

With a Timeline, every compute step and every communication is timed, and so is the
backward exchange of a differentiable one (named `<name>_backward`): autograd runs the
backward, not these drivers, but it issues that exchange where the forward took the result
and waits where the forward issued it (collectives/differentiable.py), so the backward
keeps the forward's schedule: overlapped windows stay overlapped, in reverse.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

from moeport.collectives.base import Handle
from moeport.model.timeline import Timeline

#: The schedules, by name (a profile's `schedule:`).
SCHEDULES = ("overlap", "sequential")


@dataclasses.dataclass(frozen=True)
class Compute:
    """Local work on the compute stream."""

    name: str
    run: Callable[[Any], None]


@dataclasses.dataclass(frozen=True)
class Issue:
    """Start a communication named `name`; returns its Handle."""

    name: str
    run: Callable[[Any], Handle]


@dataclasses.dataclass(frozen=True)
class Wait:
    """Receive the result of the communication `name`."""

    name: str
    run: Callable[[Any, Any], None]


Step = Compute | Issue | Wait


@dataclasses.dataclass
class _InFlight:
    handle: Any
    issued: Any  # event before the Issue step ran
    issue_returned: Any = None  # event after it returned (its own work held up the compute stream)
    completed: Any = None  # event: first seen complete
    result: Any = None
    waited: tuple[Any, Any] | None = None


def overlap_windows(steps: Iterable[Step]) -> dict[str, list[str]]:
    """Per communication of a step list, the Compute steps between its Issue and its Wait: the dense work the
    overlap schedule runs while it is in flight (its window), in order."""
    windows: dict[str, list[str]] = {}
    open_now: list[str] = []
    for step in steps:
        if isinstance(step, Issue):
            windows[step.name] = []
            open_now.append(step.name)
        elif isinstance(step, Wait):
            open_now.remove(step.name)
        else:
            for name in open_now:
                windows[name].append(step.name)
    return windows


def _wait(op: _InFlight, timeline: Timeline | None) -> None:
    before = timeline.mark() if timeline is not None else None
    op.result = op.handle.wait()
    if timeline is not None:
        after = timeline.mark()
        op.waited = (before, after)
        if op.completed is None:
            op.completed = after


def run_steps(steps: Iterable[Step], state: Any, schedule: str = "overlap", timeline: Timeline | None = None) -> Any:
    """Run one layer's steps on `state` under `schedule` ("overlap" or "sequential"); returns `state`."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    in_flight: dict[str, _InFlight] = {}
    for step in steps:
        if isinstance(step, Compute):
            start = timeline.mark() if timeline is not None else None
            step.run(state)
            if timeline is not None:
                end = timeline.mark()
                timeline.add(step.name, "compute", start, end)
                for op in in_flight.values():
                    if op.completed is None and op.handle.is_completed():
                        op.completed = end
        elif isinstance(step, Issue):
            issued = timeline.mark() if timeline is not None else None
            op = in_flight[step.name] = _InFlight(step.run(state), issued)
            if timeline is not None:
                op.issue_returned = timeline.mark()
                if op.handle.backward is not None:  # its gradients' way back, timed too
                    timeline.add_backward(f"{step.name}_backward", op.handle.backward)
                if op.handle.is_completed():
                    op.completed = op.issue_returned  # nothing travelled (a local exchange)
            if schedule == "sequential":
                _wait(op, timeline)
        elif isinstance(step, Wait):
            op = in_flight.pop(step.name)
            if op.waited is None:
                _wait(op, timeline)
            if timeline is not None:
                timeline.add(step.name, "comm", op.issued, op.completed, op.waited, (op.issued, op.issue_returned))
            step.run(state, op.result)
    if in_flight:
        raise RuntimeError(f"communications never waited for: {sorted(in_flight)}")
    return state
