"""The overlap schedule against the sequential one, side by side in one run.

    python benchmarks/overlap.py [--profile emulated-link] [--repeats 7] [--batch 8] [--length 128] [--plot FILE.png]

On spawned ranks of each profile (default: emulated-link, then plain cpu-gloo on the
small model), the same model alternates between the two schedules (interleaved
repeats, barrier before each), for a prefill forward of batch x length tokens per
rank (as served: next-token logits only) and for decode steps (8 timed together per
repeat).
Prints per phase the median step times, the ratio overlap/sequential, and the hidden
share of the communication under the overlap schedule; where a step's time goes under
the overlap schedule (the dense compute inside the communications' windows, the exposed
communication, the experts, the rest: attention 0, the router, packing, the sum); and
the balance: under the sequential schedule, the communication over the dense work of
its windows (a profile meant to study overlap keeps it between 0.7x and 1.3x).
Targets: on emulated-link, prefill ratio <= 0.75 with >= 85% hidden, decoding ratio <= 0.8
with >= 80% hidden; on plain gloo, within 3% of sequential or faster in both phases.
With --plot, draws the last repeat's timelines, sequential above overlap on one time axis
per phase (one prefill layer, one decode step), per rank, to FILE.png (one profile) or
FILE-PROFILE.png (several).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moeport.jobs import PhaseTimeline, build_model, run_on_ranks, span_dicts  # noqa: E402
from moeport.model.schedule import overlap_windows  # noqa: E402
from moeport.model.timeline import summarize  # noqa: E402
from moeport.profile import load_profile  # noqa: E402
from moeport.report import profile_name  # noqa: E402
from moeport.timeline_plot import draw_timelines  # noqa: E402

#: decode steps timed together per repeat (one step alone is too short to time reliably)
DECODE_STEPS = 8


def _timed(rt, model, run, phase: str, steps: int = 1) -> tuple[float, dict, list[dict]]:
    """Seconds per step of `steps` calls of `run`, the timeline figures per step (`where_time_goes` too), and
    the spans (tagged with `phase` and the step)."""
    timeline = model.timeline = PhaseTimeline.for_backend(rt.backend)
    timeline.phase = phase
    rt.comm.barrier()
    start = time.perf_counter()
    for step in range(steps):
        timeline.step = step
        run()
    rt.backend.synchronize()
    elapsed = time.perf_counter() - start
    tagged = timeline.tagged_spans()
    spans = [span for span, _, _ in tagged]
    totals = {**summarize(spans), **where_time_goes(model, spans)}
    figures = {name: value if name == "hidden_share" else value / steps for name, value in totals.items()}
    model.timeline = None
    return elapsed / steps, figures, span_dicts(tagged)


def where_time_goes(model, spans) -> dict:
    """Seconds of the dense compute that runs in the communications' windows (the Compute steps between an
    Issue and its Wait: ffn0, attn1_qkv, attn1_core, ffn1) and of the experts, over `spans`."""
    windows = {name for names in overlap_windows(model.model.layers[0].steps()).values() for name in names}
    computes = [s for s in spans if s.track == "compute"]
    return {
        "window_compute_seconds": sum(s.ms for s in computes if s.name in windows) / 1e3,
        "experts_seconds": sum(s.ms for s in computes if s.name == "experts") / 1e3,
    }


def measure(rt, batch: int, length: int, repeats: int) -> dict:
    """On one rank: per (phase, schedule) the step times and timeline figures of every repeat; under "spans",
    per schedule, the last repeat's spans of both phases (what --plot draws)."""
    model = build_model(rt)
    gen = torch.Generator().manual_seed(rt.rank)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=gen)
    results: dict = {"spans": {"sequential": [], "overlap": []}}
    with torch.no_grad():
        model(ids)  # warm-up
        for i in range(repeats):
            order = ("overlap", "sequential") if i % 2 else ("sequential", "overlap")
            for schedule in order:
                model.schedule = schedule
                seconds, figures, prefill_spans = _timed(rt, model, lambda: model(ids, logits_to_keep=1), "prefill")
                results.setdefault(("prefill", schedule), []).append((seconds, figures))
                caches = model.new_caches(batch, length + DECODE_STEPS)
                model.schedule = "sequential"
                model(ids, caches)
                model.schedule = schedule
                step = ids[:, -1:]
                seconds, figures, decode_spans = _timed(
                    rt, model, lambda: model(step, caches, logits_to_keep=1), "decode", DECODE_STEPS)
                results.setdefault(("decode", schedule), []).append((seconds, figures))
                results["spans"][schedule] = prefill_spans + decode_spans
    return results


def plot(path: str, title: str, results: list[dict]) -> bool:
    """Draw every rank's last-repeat timelines, sequential above overlap, to the PNG `path` (one time axis per
    phase: one prefill layer, one decode step); False (nothing written) without matplotlib."""
    rows = [(f"rank {rank}, {schedule}", r["spans"][schedule])
            for rank, r in enumerate(results) for schedule in ("sequential", "overlap")]
    return draw_timelines(path, rows, title)


def plot_path(path: str, name: str, several: bool) -> str:
    """Where --plot writes a profile's picture: `path` itself for one profile, PATH-NAME.png for several."""
    if not several:
        return path
    stem, ext = os.path.splitext(path)
    return f"{stem}-{name}{ext or '.png'}"


def report(name: str, results: list[dict]) -> None:
    """Print the medians over repeats, taking each repeat's slowest rank (the step ends when all ranks are done);
    nothing where this process holds no results (a rank other than 0 under torchrun or mpiexec)."""
    if not results:
        return
    print(f"profile {name}:")
    for phase in ("prefill", "decode"):
        medians = {}
        for schedule in ("sequential", "overlap"):
            runs = zip(*(r[(phase, schedule)] for r in results))
            steps = [max(rank_run[0] for rank_run in repeat) for repeat in runs]
            medians[schedule] = statistics.median(steps)
        figures = [f for r in results for _, f in r[(phase, "overlap")]]
        hidden = statistics.median(f["hidden_share"] for f in figures)
        comm = statistics.median(f["comm_seconds"] for f in figures)
        seq_comm = statistics.median(f["comm_seconds"] for r in results for _, f in r[(phase, "sequential")])
        print(
            f"  {phase:<7} sequential {medians['sequential'] * 1e3:8.2f} ms  overlap {medians['overlap'] * 1e3:8.2f} ms  "
            f"ratio {medians['overlap'] / medians['sequential']:.3f}  hidden share {hidden:.1%}  "
            f"comm {seq_comm * 1e3:.2f} ms (sequential) / {comm * 1e3:.2f} ms (overlap)"
        )
        print(breakdown_line(phase, results, medians["overlap"]))
        window = statistics.median(f["window_compute_seconds"] for r in results for _, f in r[(phase, "sequential")])
        print(f"    balance (sequential): comm / the dense work of its windows {seq_comm / window:.2f}x "
              f"({seq_comm * 1e3:.2f} / {window * 1e3:.2f} ms)")


def breakdown_line(phase: str, results: list[dict], step_seconds: float) -> str:
    """Where a step of `phase` goes under the overlap schedule (medians over ranks and repeats): the dense compute
    inside the communications' windows, the exposed communication, the experts, and the rest of the step."""
    figures = [f for r in results for _, f in r[(phase, "overlap")]]
    parts = {key: statistics.median(f[key] for f in figures)
             for key in ("window_compute_seconds", "exposed_comm_seconds", "experts_seconds")}
    rest = step_seconds - sum(parts.values())
    what = "per decode step" if phase == "decode" else "per prefill"
    return (f"    overlap, {what}: dense compute in the windows {parts['window_compute_seconds'] * 1e3:.2f} ms, "
            f"exposed comm {parts['exposed_comm_seconds'] * 1e3:.2f} ms, experts {parts['experts_seconds'] * 1e3:.2f} "
            f"ms, rest {rest * 1e3:.2f} ms (of {step_seconds * 1e3:.2f} ms)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", action="append", help="profiles to compare on (default: emulated-link, cpu-gloo)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--plot", metavar="FILE.png", help="draw sequential above overlap, per phase and rank")
    args = parser.parse_args()
    names = args.profile or ["emulated-link", "cpu-gloo"]
    for name in names:
        profile = load_profile(name)
        if name == "cpu-gloo":
            profile = profile.replace(model={"preset": "small"})
        results = run_on_ranks(measure, (args.batch, args.length, args.repeats), profile, timeout_s=1800)
        report(name, results)
        if args.plot and results:
            path = plot_path(args.plot, profile_name(profile), len(names) > 1)
            title = f"benchmarks/overlap.py: profile {profile_name(profile)}, sequential vs overlap (last repeat)"
            if plot(path, title, results):
                print(f"  wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
