"""A picture of a schedule a person can read: one prefill layer and one decode step, stage by stage.

`windows(spans)` picks, from one rank's spans (dicts with Span's fields and `phase`, `step`
as `moeport.jobs.run_job` returns them), the part that is drawn: per phase, one prefill
layer (the median-length layer of the prefill) and one decode step (the median-length
decode step, with all its layers); spans without a phase count as one phase, "run", drawn
like the prefill. `draw_timelines(path, rows, title)` draws such windows, a row per rank
(or per rank and schedule), a column per phase, columns on one time axis each, with
matplotlib; `moeport run --trace` and `benchmarks/overlap.py --plot` both draw through it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from moeport.base.atomic import atomic_path
from moeport.jobs import PHASES

#: The phase of spans that carry none.
UNTAGGED = "run"
#: The phase drawn as one whole step (all its layers); any other phase is drawn one layer.
WHOLE_STEP = "decode"
#: Stage colours, given to stage names in the order they first run (no reds: red marks the exposed part).
PALETTE = ("#4c72b0", "#55a868", "#dd8452", "#8172b3", "#937860", "#da8bc3", "#8c8c8c", "#ccb974", "#64b5cd",
           "#2f4b7c", "#a5d6a7", "#ffb74d")
EXPOSED = "#c0392b"


@dataclasses.dataclass
class Bar:
    """One span as drawn, in ms from the start of its window.

    `waits` (comm only): when the compute stream was held up by it, (start, end) pairs in the
    window's ms: while its Issue ran (from its start to the first compute step that started
    inside it) and at its Wait (from the end of the last compute step that ended inside it to
    its end); the whole bar when no compute step ran inside it (it was waited for at once).
    Their sum is close to `exposed_ms`, the time the schedule measured.
    """

    track: str
    name: str
    layer: int
    step: int
    start_ms: float
    end_ms: float
    exposed_ms: float = 0.0
    waits: list[tuple[float, float]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Window:
    """What one panel shows: `phase`, `label` (which layer or step) and its bars; times from its first start."""

    phase: str
    label: str
    bars: list[Bar]

    @property
    def length_ms(self) -> float:
        """From the window's start to its last end."""
        return max((b.end_ms for b in self.bars), default=0.0)


def _phase(span: dict[str, Any]) -> str:
    """The phase of a span (UNTAGGED where it has none)."""
    return span.get("phase", UNTAGGED)


def _groups(spans: list[dict[str, Any]], phase: str) -> dict[tuple[int, ...], list[dict[str, Any]]]:
    """The spans of `phase`, per step (WHOLE_STEP) or per (step, layer) (any other phase)."""
    out: dict[tuple[int, ...], list[dict[str, Any]]] = {}
    for s in spans:
        if _phase(s) == phase:
            key = (s.get("step", 0),) if phase == WHOLE_STEP else (s.get("step", 0), s["layer"])
            out.setdefault(key, []).append(s)
    return out


def _extent(group: list[dict[str, Any]]) -> float:
    """From the first start to the last end of a group of spans, in ms."""
    return max(s["end_ms"] for s in group) - min(s["start_ms"] for s in group)


def _waits(comm: dict[str, Any], computes: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """When the compute stream was held up by `comm` (see Bar.waits), in the spans' ms."""
    start, end = comm["start_ms"], comm["end_ms"]
    starts = [c["start_ms"] for c in computes if start <= c["start_ms"] < end]
    ends = [c["end_ms"] for c in computes if start < c["end_ms"] <= end]
    pairs = [(start, min(starts)), (max(ends), end)] if starts and ends else [(start, end)]
    return [(a, b) for a, b in pairs if b > a]


def _window(phase: str, key: tuple[int, ...], group: list[dict[str, Any]], count: int) -> Window:
    """The Window of one group of spans, times from its first start."""
    origin = min(s["start_ms"] for s in group)
    computes = [s for s in group if s["track"] == "compute"]
    bars = []
    for s in sorted(group, key=lambda s: (s["start_ms"], s["track"])):
        waits = _waits(s, computes) if s["track"] == "comm" else []
        bars.append(Bar(s["track"], s["name"], s["layer"], s.get("step", 0), s["start_ms"] - origin,
                        s["end_ms"] - origin, s.get("exposed_ms", 0.0), [(a - origin, b - origin) for a, b in waits]))
    if phase == WHOLE_STEP:
        label = f"step {key[0] + 1} of {count} (median length), all layers"
    else:
        label = f"layer {key[-1]} (median length of {count})"
    return Window(phase, label, bars)


def windows(spans: list[dict[str, Any]]) -> dict[str, Window]:
    """Per phase present in one rank's `spans`, in run order: the Window drawn for it.

    Prefill (and untagged spans): the layer of median length among the phase's layers.
    Decode: the step of median length among its steps, all layers of it. Of an even
    number, the shorter of the middle two.
    """
    present = {_phase(s) for s in spans}
    order = [p for p in PHASES if p in present] + sorted(present - set(PHASES))
    out = {}
    for phase in order:
        groups = _groups(spans, phase)
        ranked = sorted(groups, key=lambda k: (_extent(groups[k]), k))
        key = ranked[(len(ranked) - 1) // 2]
        out[phase] = _window(phase, key, groups[key], len(groups))
    return out


def stage_colours(rows: list[tuple[str, dict[str, Window]]]) -> dict[str, str]:
    """A colour per stage name, in the order the stages first run in the windows of `rows`."""
    names: list[str] = []
    for _, drawn in rows:
        for window in drawn.values():
            for bar in window.bars:
                if bar.name not in names:
                    names.append(bar.name)
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}


#: Track rows on a panel (compute above comm).
TRACK_Y = {"compute": 1, "comm": 0}


def _draw_window(ax: Any, window: Window, colours: dict[str, str], xmax: float) -> None:
    """One panel: the window's compute and comm tracks, stages coloured and named, waits hatched in red."""
    for bar in window.bars:
        y = TRACK_Y.get(bar.track, 0)
        width = bar.end_ms - bar.start_ms
        ax.broken_barh([(bar.start_ms, width)], (y - 0.38, 0.76), facecolors=colours[bar.name],
                       edgecolors="white", linewidth=0.5)
        if width > (0.01 + 0.009 * len(bar.name)) * xmax:  # the name fits inside the bar
            ax.text(bar.start_ms + width / 2, y, bar.name, ha="center", va="center", fontsize=7, clip_on=True)
        for track_y in (TRACK_Y["comm"], TRACK_Y["compute"]) if bar.waits else ():  # exposed; compute held up
            ax.broken_barh([(a, b - a) for a, b in bar.waits], (track_y - 0.38, 0.76), facecolors="none",
                           edgecolors=EXPOSED, hatch="////", linewidth=0.8)
        if bar.track == "comm" and bar.exposed_ms > 0:
            ax.text(bar.end_ms, TRACK_Y["comm"] - 0.46, f"{bar.exposed_ms:.2f}", ha="right", va="top", fontsize=6,
                    color=EXPOSED, clip_on=True)
    layers = sorted({b.layer for b in window.bars})
    for layer in layers[1:]:  # where each further layer of a whole step starts
        start = min(b.start_ms for b in window.bars if b.layer == layer)
        ax.axvline(start, color="black", linewidth=0.6, linestyle=":")
        ax.text(start, 1.5, f" layer {layer}", fontsize=6, va="center")
    ax.set_yticks([TRACK_Y["compute"], TRACK_Y["comm"]], ["compute", "comm"])
    ax.set_ylim(-0.75, 1.65)
    ax.set_xlim(0, xmax * 1.01 if xmax > 0 else 1.0)


def _columns(drawn: list[tuple[str, dict[str, Window]]]) -> list[str]:
    """The phases drawn as columns, in run order (one empty column when there is nothing to draw)."""
    present = {p for _, found in drawn for p in found}
    ordered = [p for p in [*PHASES, UNTAGGED] if p in present] + sorted(present - {*PHASES, UNTAGGED})
    return ordered or [UNTAGGED]


def _legend(fig: Any, colours: dict[str, str]) -> float:
    """The stage colours and the exposed hatch under the panels; returns the figure's height they take (0..1)."""
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=c, label=n) for n, c in colours.items()]
    handles.append(Patch(facecolor="none", edgecolor=EXPOSED, hatch="////",
                         label="exposed: the compute stream waits for the comm (its exposed ms in red)"))
    columns = 6
    fig.legend(handles=handles, loc="lower center", ncol=columns, fontsize=7, frameon=False)
    return (0.2 * -(-len(handles) // columns) + 0.15) / fig.get_figheight()


def draw_timelines(path: str, rows: list[tuple[str, list[dict[str, Any]]]], title: str) -> bool:
    """Draw `rows` ((label, one rank's spans) each) to the PNG `path`; False (nothing written) without matplotlib
    or without rows.

    A row per entry, a column per phase (prefill layer, decode step: `windows`), each column
    on one time axis, in ms from each window's start. Each stage has its colour (legend),
    compute on the upper track and communication on the lower; the time the compute stream
    was held up by a communication (Bar.waits: its issue, its wait) is hatched in red on both
    tracks, and the comm's exposed_ms is written in red under its end. Written through atomic_path.
    """
    if not rows:
        return False
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    drawn = [(label, windows(spans)) for label, spans in rows]
    phases = _columns(drawn)
    colours = stage_colours(drawn)
    fig = Figure(figsize=(7.5 * len(phases), 1.35 * len(drawn) + 1.6))
    axes = fig.subplots(len(drawn), len(phases), squeeze=False)
    for column, phase in enumerate(phases):
        xmax = max((found[phase].length_ms for _, found in drawn if phase in found), default=0.0)
        for row, (label, found) in enumerate(drawn):
            _panel(axes[row][column], label, phase, found.get(phase), colours, xmax)
    bottom = _legend(fig, colours)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return True


def _panel(ax: Any, label: str, phase: str, window: Window | None, colours: dict[str, str], xmax: float) -> None:
    """One row's panel of one phase, titled with the row's label, the phase and the window; blank without a window."""
    if window is None:
        ax.set_axis_off()
        return
    _draw_window(ax, window, colours, xmax)
    ax.set_title(f"{label}: {phase}, {window.label}", fontsize=8)
    ax.set_xlabel(f"ms from the start of the {'step' if phase == WHOLE_STEP else 'layer'}", fontsize=7)
    ax.tick_params(labelsize=7)
