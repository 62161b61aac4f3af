"""What `moeport run` prints: throughput, routing, per-layer overlap figures, traces."""

from __future__ import annotations

import json
import os
from typing import Any

from moeport.base.atomic import atomic_path, make_folder, write_text
from moeport.launch import detect_rank_env
from moeport.profile import Profile


def per_layer(spans: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """Seconds of compute, comm and exposed comm per layer, with the hidden share."""
    out: dict[int, dict[str, float]] = {}
    for s in spans:
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
            "args": {"layer": s["layer"], "exposed_ms": s["exposed_ms"]},
        })
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_traces(trace_dir: str, results: list[dict[str, Any]], title: str) -> list[str]:
    """One Chrome trace JSON per rank and, with matplotlib installed, a PNG of all ranks; returns the paths."""
    make_folder(trace_dir)
    written = []
    for r in results:
        path = os.path.join(trace_dir, f"trace-rank{r['rank']}.json")
        write_text(path, json.dumps(chrome_trace(r["rank"], r["spans"])))
        written.append(path)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    colours = {"compute": "#4c72b0", "comm": "#dd8452"}
    fig, ax = plt.subplots(figsize=(12, 1.0 + 0.8 * len(results)))
    labels = []
    for i, r in enumerate(results):
        for j, track in enumerate(("compute", "comm")):
            y = i * 2 + j
            bars = [(s["start_ms"], s["end_ms"] - s["start_ms"]) for s in r["spans"] if s["track"] == track]
            ax.broken_barh(bars, (y - 0.4, 0.8), facecolors=colours[track], edgecolors="white", linewidth=0.3)
            labels.append(f"rank {r['rank']} {track}")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("ms")
    ax.set_title(title)
    ax.invert_yaxis()
    fig.tight_layout()
    path = os.path.join(trace_dir, "timeline.png")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    written.append(path)
    return written


def totals(profile: Profile, results: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures of a run, over every rank's result in `results` (all the job's ranks, from `run_on_ranks`)."""
    decode = max(r["decode_seconds"] for r in results)
    generated = sum(r["generated_tokens"] for r in results)
    timeline = [r["timeline"] for r in results]
    comm = sum(t["comm_seconds"] for t in timeline) / len(timeline)
    exposed = sum(t["exposed_comm_seconds"] for t in timeline) / len(timeline)
    return {
        "tokens_per_s": generated / decode if decode > 0 else 0.0,
        "prefill_tokens_per_s": sum(r["tokens"] - r["generated_tokens"] for r in results) / max(r["prefill_seconds"] for r in results),
        "step_seconds": max(r["step_seconds"] for r in results),
        "comm_seconds": comm,
        "exposed_comm_seconds": exposed,
        "hidden_share": 1.0 - exposed / comm if comm > 0 else 1.0,
        "schedule": profile.schedule,
        "world_size": profile.world_size,
        "backend": profile.backend,
        "collectives": profile.collectives.backend or profile.collectives.library,
        "ranks_reporting": len(results),
    }


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
    print("  layer  compute ms  comm ms  exposed ms  hidden")
    for layer, row in sorted(per_layer(results[0]["spans"]).items()):
        print(
            f"  {layer:>5}  {row['compute'] * 1e3:>10.2f}  {row['comm'] * 1e3:>7.2f}  {row['exposed'] * 1e3:>10.2f}  "
            f"{row['hidden_share']:>6.1%}"
        )
    if trace_dir:
        for path in write_traces(trace_dir, results, f"moeport run: {profile.schedule}, {profile.world_size} ranks"):
            print(f"  wrote {path}")
    if as_json:
        print(json.dumps(figures))
