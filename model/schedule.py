"""The two schedules: drivers of a layer's step list.

Both run the same Compute steps in the same order, so their results are
bit-identical; they differ only in when a communication is waited for:

- sequential: right after it is issued (communication never overlaps compute);
- overlap:    at its Wait step, so the Compute steps between Issue and Wait run
              while the communication is in flight (LongCat's single-batch overlap).
"""

from __future__ import annotations

from typing import Any, Iterable

from moeport.model.steps import Compute, Issue, LayerState, Step, Wait

SCHEDULES = ("overlap", "sequential")


def run_steps(steps: Iterable[Step], state: LayerState, schedule: str = "overlap") -> LayerState:
    """Run one layer's steps on `state` under `schedule` ("overlap" or "sequential")."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    in_flight: dict[str, Any] = {}
    results: dict[str, Any] = {}
    for step in steps:
        if isinstance(step, Compute):
            step.run(state)
        elif isinstance(step, Issue):
            handle = step.run(state)
            if schedule == "sequential":
                results[step.name] = handle.wait()
            else:
                in_flight[step.name] = handle
        elif isinstance(step, Wait):
            result = results.pop(step.name) if step.name in results else in_flight.pop(step.name).wait()
            step.run(state, result)
    if in_flight:
        raise RuntimeError(f"communications never waited for: {sorted(in_flight)}")
    return state
