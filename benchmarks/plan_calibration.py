"""The planner's prediction against `moeport run`, on this machine, calibrated here.

    python benchmarks/plan_calibration.py [--profile emulated-link] [--repeats 3] [--batch 8]
        [--prompt-length 128] [--iterations 16] [--keep FILE.yaml]

Each repeat calibrates this machine on the profile's ranks (`moeport plan --calibrate`: matmul
rate, memory bandwidth and operator overhead, measured on the ranks at once, and the profile's
emulated link), asks the planner for the profile's model (the `small` preset on emulated-link:
batch per rank, ep = world size, float32 weights and exchanges) and then runs
`moeport run --json` under both schedules (sequential and overlap, the planner's `sbo`); the
repeats interleave, so calibration and runs see the same machine load. The prefill is one
forward of batch x prompt-length tokens per rank (prompts of prompt-length), the decode step the
median of `--iterations` steps (the planner's context: the prompt plus half the steps).

Prints each repeat's load average, calibration and predicted / measured times; then per phase and
schedule the median predicted and measured times, the median of the repeats' ratios (each
prediction against the runs beside it, so that both met the same machine load), whether it is
within 25%, and whether the planner ranks the two schedules as the measurement does; the best of
the repeats beside them. Target: every row within 25%, rankings the same.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moeport.plan.architectures import architecture  # noqa: E402
from moeport.plan.calibrate import calibrate, hardware_yaml  # noqa: E402
from moeport.plan.planner import make_plan, schedule_figures  # noqa: E402
from moeport.plan.workload import PlanSection  # noqa: E402
from moeport.profile import load_profile  # noqa: E402

TARGET = 0.25
#: the runtime's schedule for each planner schedule measured here
MEASURED = {"sequential": "sequential", "sbo": "overlap"}


def predict(hardware, profile, batch: int, prompt: int, iterations: int) -> dict[tuple[str, str], float]:
    """(phase, schedule) -> predicted seconds: the prefill forward, and one decoding step."""
    kind, name = profile.model_source()
    model = architecture(checkpoint=name) if kind == "checkpoint" else architecture(name)
    out = {}
    for phase, context in (("prefill", prompt), ("decode", prompt + iterations // 2)):
        section = PlanSection(batch_per_device=batch, context_length=context, ep=profile.ep,
                              weight_dtype=profile.dtype, dispatch_dtype=profile.dtype, combine_dtype=profile.dtype,
                              prefill_tokens=batch * prompt)
        plan = make_plan(model, hardware, section, phase, profile.source)
        for schedule in MEASURED:
            out[(phase, schedule)] = schedule_figures(plan, schedule)["step_ms"] / 1e3
    return out


def measure(profile_spec: str, schedule: str, batch: int, prompt: int, iterations: int) -> dict[str, float]:
    """One `moeport run --json` under `schedule`: its prefill_seconds and step_seconds."""
    command = [sys.executable, "-m", "moeport", "run", "--profile", profile_spec, "--batch", str(batch),
               "--prompt-length", str(prompt), "--iterations", str(iterations), "--json", "--schedule", schedule]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    totals = json.loads(done.stdout.strip().splitlines()[-1])
    return {"prefill": totals["prefill_seconds"], "decode": totals["step_seconds"]}


def main() -> int:
    """Calibrate, predict and measure `--repeats` times, interleaved; print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="emulated-link")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=16)
    parser.add_argument("--keep", metavar="FILE.yaml", help="write the last calibration here")
    args = parser.parse_args()
    profile = load_profile(args.profile)
    predicted: dict[tuple[str, str], list[float]] = {}
    measured: dict[tuple[str, str], list[float]] = {}
    hardware = how = None
    for repeat in range(args.repeats):
        load = os.getloadavg()[0]
        hardware, how = calibrate(profile)
        print(f"repeat {repeat + 1} (load average {load:.2f}): matmul {hardware.matmul_tflops.float32 * 1e3:.1f} "
              f"GFLOP/s, memory {hardware.memory_bandwidth_gbps:.2f} GB/s x {hardware.efficiency.memory:.2f}, "
              f"{hardware.op_overhead_us:.2f} us per operator", flush=True)
        for key, seconds in predict(hardware, profile, args.batch, args.prompt_length, args.iterations).items():
            predicted.setdefault(key, []).append(seconds)
        for schedule, runtime_schedule in MEASURED.items():
            times = measure(args.profile, runtime_schedule, args.batch, args.prompt_length, args.iterations)
            for phase, seconds in times.items():
                measured.setdefault((phase, schedule), []).append(seconds)
        print("  " + ", ".join(f"{phase} {schedule} {predicted[(phase, schedule)][-1] * 1e3:.1f} / "
                               f"{measured[(phase, schedule)][-1] * 1e3:.1f} ms" for phase, schedule in predicted),
              flush=True)
    if args.keep and hardware is not None:
        with open(args.keep, "w") as f:
            f.write(hardware_yaml(hardware, how))
    print(f"\nprofile {profile.source}: {profile.world_size} ranks, batch {args.batch} per rank, prompt "
          f"{args.prompt_length}, {args.iterations} decode steps; medians of {args.repeats} repeats")
    print(f"{'phase':8} {'schedule':10} {'predicted ms':>12} {'measured ms':>12} {'pred/meas':>9}  within 25%"
          f"   (best of the repeats: predicted, measured, ratio)")
    met = True
    for (phase, schedule) in sorted(predicted, key=lambda k: (k[0] != "prefill", k[1])):
        p, m = statistics.median(predicted[(phase, schedule)]), statistics.median(measured[(phase, schedule)])
        # each repeat's prediction against the runs beside it, then the median of those ratios
        ratio = statistics.median(a / b for a, b in zip(predicted[(phase, schedule)], measured[(phase, schedule)]))
        ok = abs(ratio - 1) <= TARGET
        met &= ok
        best = [min(predicted[(phase, schedule)]), min(measured[(phase, schedule)])]
        print(f"{phase:8} {schedule:10} {p * 1e3:12.2f} {m * 1e3:12.2f} {ratio:9.2f}  {'yes' if ok else 'NO ':10}"
              f"   ({best[0] * 1e3:.2f}, {best[1] * 1e3:.2f}, {best[0] / best[1]:.2f})")
    for phase in ("prefill", "decode"):
        p = [statistics.median(predicted[(phase, s)]) for s in MEASURED]
        m = [statistics.median(measured[(phase, s)]) for s in MEASURED]
        same = (p[0] > p[1]) == (m[0] > m[1])
        met &= same
        print(f"{phase}: sbo/sequential predicted {p[1] / p[0]:.2f}, measured (overlap/sequential) "
              f"{m[1] / m[0]:.2f}; ranking {'the same' if same else 'DIFFERENT'}")
    print(f"target (every row within 25%, same ranking): {'met' if met else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
