"""Per-rank timing of a schedule: each compute step, and each communication from issue to completion.

Times come from the Backend's timing events where it has them (device time) and from
host-clock events otherwise; the driver records an event before and after each step.
A communication's completion is the first moment the driver sees its Handle complete:
after a compute step, or when its Wait returns. The exposed part of a communication is
the time its Wait held up the compute stream.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable


@dataclasses.dataclass
class Span:
    """One interval on a rank's timeline, in milliseconds from the timeline's origin."""

    layer: int
    name: str
    track: str  # "compute" or "comm"
    start_ms: float
    end_ms: float
    exposed_ms: float = 0.0  # comm only: how long the compute stream waited for it

    @property
    def ms(self) -> float:
        """Length of the span."""
        return self.end_ms - self.start_ms


class Timeline:
    """Records events during a run and turns them into Spans once the device is idle."""

    def __init__(self, new_event: Callable[[], Any], synchronize: Callable[[], None]) -> None:
        self._new_event = new_event
        self._synchronize = synchronize
        self._origin = self.mark()
        self._pending: list[tuple[int, str, str, Any, Any, tuple[tuple[Any, Any], ...]]] = []
        self._deferred: list[tuple[int, str, str, Callable[[], Any]]] = []
        self.layer = 0

    @classmethod
    def for_backend(cls, backend: Any) -> "Timeline":
        """A timeline using `backend`'s timing events (host clocks where it has none)."""
        return cls(lambda: backend.new_event(timing=True), backend.synchronize)

    def mark(self) -> Any:
        """Record an event now and return it."""
        event = self._new_event()
        event.record()
        return event

    def add(self, name: str, track: str, start: Any, end: Any, *blocked: tuple[Any, Any] | None) -> None:
        """Keep an interval (events) for `name` in the current layer.

        `blocked`: (start, end) event pairs during which a communication held up the
        compute stream (its issue work, its wait); their sum is its exposed time.
        """
        self._pending.append((self.layer, name, track, start, end, tuple(b for b in blocked if b is not None)))

    def add_backward(self, name: str, exchange: Any) -> None:
        """Keep, under `name` in the current layer, a communication whose events arrive later: the backward
        exchange `exchange` (collectives.differentiable.BackwardExchange) of a forward one, timed on this
        timeline. Left out of `spans` while it has not run."""
        exchange.mark = self.mark
        self._deferred.append((self.layer, name, "comm", exchange.span))

    def spans(self) -> list[Span]:
        """Every interval recorded so far, in milliseconds from the origin."""
        self._synchronize()
        out = []
        pending = list(self._pending)
        for layer, name, track, span in self._deferred:
            events = span()
            if events is not None:  # from issue to completion (seen at latest when its wait returned)
                end = events["wait_began"] if events["complete_before_wait"] else events["wait_returned"]
                blocked = ((events["issued"], events["issue_returned"]), (events["wait_began"], events["wait_returned"]))
                pending.append((layer, name, track, events["issued"], end, blocked))
        for layer, name, track, start, end, blocked in pending:
            exposed = sum(a.elapsed_time(b) for a, b in blocked)
            out.append(Span(layer, name, track, self._origin.elapsed_time(start), self._origin.elapsed_time(end), exposed))
        return out


def summarize(spans: list[Span]) -> dict[str, float]:
    """Totals in seconds: compute, comm, exposed comm, hidden share of comm."""
    compute = sum(s.ms for s in spans if s.track == "compute") / 1e3
    comm = sum(s.ms for s in spans if s.track == "comm") / 1e3
    exposed = sum(min(s.exposed_ms, s.ms) for s in spans if s.track == "comm") / 1e3
    return {
        "compute_seconds": compute,
        "comm_seconds": comm,
        "exposed_comm_seconds": exposed,
        "hidden_share": (1.0 - exposed / comm) if comm > 0 else 1.0,
    }
