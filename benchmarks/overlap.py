"""The overlap schedule against the sequential one, side by side in one run.

    python benchmarks/overlap.py [--profile emulated-link] [--repeats 7] [--batch 8] [--length 128]

On spawned ranks of the profile (default: emulated-link, then plain cpu-gloo), the
same model alternates between the two schedules (interleaved repeats, barrier before
each), for a prefill forward of batch x length tokens per rank (as served: next-token
logits only) and for decode steps (8 timed together per repeat).
Prints the median step times, the ratio overlap/sequential, and the hidden share of
the communication under the overlap schedule (targets with the emulated link:
ratio <= 0.7, hidden share >= 80%; on plain gloo: ratio <= 1).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moeport.jobs import build_model, run_on_ranks  # noqa: E402
from moeport.model.timeline import Timeline, summarize  # noqa: E402
from moeport.profile import load_profile  # noqa: E402

#: decode steps timed together per repeat (one step alone is too short to time reliably)
DECODE_STEPS = 8


def _timed(rt, model, run, steps: int = 1) -> tuple[float, dict]:
    """Seconds per step of `steps` calls of `run`, and the timeline figures per step."""
    model.timeline = Timeline.for_backend(rt.backend)
    rt.comm.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        run()
    rt.backend.synchronize()
    elapsed = time.perf_counter() - start
    figures = {name: value if name == "hidden_share" else value / steps
               for name, value in summarize(model.timeline.spans()).items()}
    model.timeline = None
    return elapsed / steps, figures


def measure(rt, batch: int, length: int, repeats: int) -> dict:
    """On one rank: per (phase, schedule) the step times and timeline figures of every repeat."""
    model = build_model(rt)
    gen = torch.Generator().manual_seed(rt.rank)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=gen)
    results: dict = {}
    with torch.no_grad():
        model(ids)  # warm-up
        for i in range(repeats):
            order = ("overlap", "sequential") if i % 2 else ("sequential", "overlap")
            for schedule in order:
                model.schedule = schedule
                results.setdefault(("prefill", schedule), []).append(
                    _timed(rt, model, lambda: model(ids, logits_to_keep=1)))
                caches = model.new_caches(batch, length + DECODE_STEPS)
                model.schedule = "sequential"
                model(ids, caches)
                model.schedule = schedule
                step = ids[:, -1:]
                results.setdefault(("decode", schedule), []).append(
                    _timed(rt, model, lambda: model(step, caches, logits_to_keep=1), DECODE_STEPS))
    return results


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", action="append", help="profiles to compare on (default: emulated-link, cpu-gloo)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    args = parser.parse_args()
    for name in args.profile or ["emulated-link", "cpu-gloo"]:
        profile = load_profile(name)
        if name == "cpu-gloo":
            profile = profile.replace(model={"preset": "small"})
        results = run_on_ranks(measure, (args.batch, args.length, args.repeats), profile, timeout_s=1800)
        report(name, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
