"""What `moeport run` prints: throughput, routing, per-phase and per-layer overlap figures, traces."""

from __future__ import annotations

import json
import os
from typing import Any

from moeport.base.atomic import make_folder, write_text
from moeport.jobs import PHASES
from moeport.launch import detect_rank_env
from moeport.profile import Profile
from moeport.timeline_plot import draw_timelines


def per_layer(spans: list[dict[str, Any]], phase: str | None = None) -> dict[int, dict[str, float]]:
    """Seconds of compute, comm and exposed comm per layer, with the hidden share; of `phase`'s spans only if given."""
    out: dict[int, dict[str, float]] = {}
    for s in spans:
        if phase is not None and s.get("phase") != phase:
            continue
        row = out.setdefault(s["layer"], {"compute": 0.0, "comm": 0.0, "exposed": 0.0})
        length = (s["end_ms"] - s["start_ms"]) / 1e3
        if s["track"] == "compute":
            row["compute"] += length
        else:
            row["comm"] += length
            row["exposed"] += min(s["exposed_ms"] / 1e3, length)
    for row in out.values():
        row["hidden_share"] = 1.0 - row["exposed"] / row["comm"] if row["comm"] > 0 else 1.0
    return out


def chrome_trace(rank: int, spans: list[dict[str, Any]]) -> dict[str, Any]:
    """A Chrome / Perfetto trace of one rank: compute and comm on separate tracks."""
    tracks = {"compute": 1, "comm": 2}
    events: list[dict[str, Any]] = [
        {"ph": "M", "name": "process_name", "pid": rank, "args": {"name": f"rank {rank}"}},
        *({"ph": "M", "name": "thread_name", "pid": rank, "tid": tid, "args": {"name": name}} for name, tid in tracks.items()),
    ]
    for s in spans:
        events.append({
            "ph": "X", "pid": rank, "tid": tracks[s["track"]], "name": s["name"], "cat": s["track"],
            "ts": s["start_ms"] * 1e3, "dur": max(0.0, (s["end_ms"] - s["start_ms"]) * 1e3),
            "args": {"layer": s["layer"], "exposed_ms": s["exposed_ms"], "phase": s.get("phase"), "step": s.get("step")},
        })
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_traces(trace_dir: str, results: list[dict[str, Any]], title: str) -> list[str]:
    """One Chrome trace JSON per rank (every span) and, with matplotlib installed, timeline.png; returns the paths.

    The PNG shows per rank one prefill layer and one decode step (moeport.timeline_plot).
    """
    make_folder(trace_dir)
    written = []
    for r in results:
        path = os.path.join(trace_dir, f"trace-rank{r['rank']}.json")
        write_text(path, json.dumps(chrome_trace(r["rank"], r["spans"])))
        written.append(path)
    path = os.path.join(trace_dir, "timeline.png")
    if draw_timelines(path, [(f"rank {r['rank']}", r["spans"]) for r in results], title):
        written.append(path)
    return written


def comm_figures(summaries: list[dict[str, float]]) -> dict[str, float]:
    """Communication and exposed communication seconds (mean over the ranks' timeline `summaries`), and the hidden share."""
    comm = sum(t["comm_seconds"] for t in summaries) / len(summaries)
    exposed = sum(t["exposed_comm_seconds"] for t in summaries) / len(summaries)
    return {"comm_seconds": comm, "exposed_comm_seconds": exposed, "hidden_share": 1.0 - exposed / comm if comm > 0 else 1.0}


def totals(profile: Profile, results: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures of a run, over every rank's result in `results` (all the job's ranks, from `run_on_ranks`).

    Beside the whole run's, per phase: `prefill_` / `decode_` + comm_seconds, exposed_comm_seconds
    and hidden_share (each over that phase's spans alone, every rank reporting); prefill_seconds
    and step_seconds (the median decode step) are the slowest rank's.
    """
    decode = max(r["decode_seconds"] for r in results)
    generated = sum(r["generated_tokens"] for r in results)
    prefill = max(r["prefill_seconds"] for r in results)
    return {
        "tokens_per_s": generated / decode if decode > 0 else 0.0,
        "prefill_tokens_per_s": sum(r["tokens"] - r["generated_tokens"] for r in results) / prefill,
        "prefill_seconds": prefill,
        "step_seconds": max(r["step_seconds"] for r in results),
        **comm_figures([r["timeline"] for r in results]),
        **{f"{phase}_{key}": value for phase in PHASES
           for key, value in comm_figures([r["phases"][phase] for r in results]).items()},
        "schedule": profile.schedule,
        "world_size": profile.world_size,
        "backend": profile.backend,
        "collectives": profile.collectives.backend or profile.collectives.library,
        "ranks_reporting": len(results),
    }


def profile_name(profile: Profile) -> str:
    """The profile's name as a title shows it: its file's name without the folder and .yaml."""
    return os.path.splitext(os.path.basename(profile.source))[0]


def steps_of(spans: list[dict[str, Any]], phase: str) -> int:
    """How many steps of `phase` the spans hold."""
    return len({s.get("step", 0) for s in spans if s.get("phase") == phase})


def phase_lines(figures: dict[str, Any], spans: list[dict[str, Any]]) -> list[str]:
    """One line per phase: its time (the slowest rank's) and its communication figures (from `totals`)."""
    decode_steps = steps_of(spans, "decode")
    times = {
        "prefill": f"one forward, {figures['prefill_seconds'] * 1e3:.2f} ms",
        "decode": f"{decode_steps} steps, median step {figures['step_seconds'] * 1e3:.2f} ms",
    }
    return [
        f"  {phase}: {times[phase]}; comm {figures[f'{phase}_comm_seconds'] * 1e3:.2f} ms, exposed "
        f"{figures[f'{phase}_exposed_comm_seconds'] * 1e3:.2f} ms, hidden {figures[f'{phase}_hidden_share']:.1%} "
        f"(over the phase, mean of the ranks)"
        for phase in PHASES
    ]


def layer_table(spans: list[dict[str, Any]], whose: str) -> list[str]:
    """The per-layer table of one rank's spans, a row per phase and layer; decode rows are per step (mean)."""
    lines = [f"  per layer, {whose} (decode: per step, mean of {steps_of(spans, 'decode')} steps):",
             "  phase    layer  compute ms  comm ms  exposed ms  hidden"]
    for phase in PHASES:
        steps = max(1, steps_of(spans, phase))
        for layer, row in sorted(per_layer(spans, phase).items()):
            lines.append(
                f"  {phase:<7}  {layer:>5}  {row['compute'] * 1e3 / steps:>10.2f}  {row['comm'] * 1e3 / steps:>7.2f}  "
                f"{row['exposed'] * 1e3 / steps:>10.2f}  {row['hidden_share']:>6.1%}"
            )
    return lines


def print_run_report(profile: Profile, results: list[dict[str, Any]], as_json: bool = False, trace_dir: str | None = None) -> None:
    """Print the run's summary once per job: where the results are (rank 0 when an outside launcher started the ranks).

    Prints nothing for no results (the other ranks of a torchrun / mpiexec job).
    """
    env = detect_rank_env()
    if not results or (env.launcher in ("torchrun", "mpiexec") and env.rank != 0):
        return
    figures = totals(profile, results)
    print(
        f"moeport run: {profile.world_size} ranks, backend {profile.backend}, schedule {profile.schedule}: "
        f"decode {figures['tokens_per_s']:.1f} tokens/s, prefill {figures['prefill_tokens_per_s']:.1f} tokens/s, "
        f"step {figures['step_seconds'] * 1e3:.2f} ms"
    )
    for r in results:
        counts = r["expert_counts"]
        n = r["n_routed_experts"]
        slots = sum(counts) or 1
        ffn = counts[:n]
        print(
            f"  rank {r['rank']}: zero-expert share {sum(counts[n:]) / slots:.1%}, FFN expert load "
            f"min {min(ffn)} / mean {sum(ffn) / len(ffn):.1f} / max {max(ffn)} slots"
        )
    for line in phase_lines(figures, results[0]["spans"]):
        print(line)
    for line in layer_table(results[0]["spans"], f"rank {results[0]['rank']}"):
        print(line)
    if trace_dir:
        for path in write_traces(trace_dir, results, f"moeport run: profile {profile_name(profile)}, schedule "
                                 f"{profile.schedule}, {profile.world_size} ranks"):
            print(f"  wrote {path}")
    if as_json:
        print(json.dumps(figures))
