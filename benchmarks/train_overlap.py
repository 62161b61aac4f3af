"""Training steps under the overlap schedule against the sequential one, side by side on the emulated link.

    python benchmarks/train_overlap.py [--profile emulated-link] [--steps 6] [--warmup 1] [--batch 4] [--seq 64]

On the profile's spawned ranks (default: emulated-link, 2 ranks, the small preset), one
Trainer takes full training steps (forward, the objective, backward, the replicated
gradients' sums, AdamW, the controller) on this rank's batch x seq tokens, alternating
the two schedules step by step (the order reversed every other round, a barrier before
each). Every step is timed on its own Timeline: the time the compute thread waited for
the MoE's dispatch and combine, forward and backward (issuing them and waiting for
them), and for the replicated gradients' all_reduce buckets.

Prints per schedule the medians (over timed steps and ranks) of the step time, the MoE
exchanges' exposed share of it (`moe_comm_exposed_share`), the gradients' exposed share
(`grad_sync_exposed_share`), and the ratio of the MoE shares, overlap over sequential
(target: at most 0.5; the LongCat-Flash report measured 25.3% falling to 8.4%).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moeport.jobs import build_model, my_rows, run_on_ranks  # noqa: E402
from moeport.model.timeline import Timeline  # noqa: E402
from moeport.model.training import Trainer, TrainSettings  # noqa: E402
from moeport.profile import load_profile  # noqa: E402

SCHEDULES = ("sequential", "overlap")


def measure(rt, batch: int, seq: int, steps: int, warmup: int) -> dict[str, list[dict[str, float]]]:
    """On one rank: per schedule, each timed step's seconds and exposed seconds (MoE exchanges, gradient sums)."""
    model = build_model(rt).train()
    config = model.config
    k_e = config.moe_topk * config.n_routed_experts / (config.n_routed_experts + config.zero_expert_num)
    trainer = Trainer(model, TrainSettings(lr=1e-4, ffn_experts_per_token=k_e),
                      new_timeline=lambda: Timeline.for_backend(rt.backend))
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, config.vocab_size, (batch * rt.world_size, seq + 1), generator=gen)
    mine = ids[my_rows(batch * rt.world_size, rt.rank, rt.world_size)]
    out: dict[str, list[dict[str, float]]] = {s: [] for s in SCHEDULES}
    for round_ in range(warmup + steps):
        for schedule in SCHEDULES if round_ % 2 == 0 else reversed(SCHEDULES):
            model.schedule = schedule
            rt.comm.barrier()
            stats = trainer.step(mine)
            if round_ >= warmup:
                out[schedule].append({"seconds": stats.seconds, "moe": stats.moe_comm_exposed_seconds,
                                      "grad_sync": stats.grad_sync_exposed_seconds})
    trainer.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="emulated-link")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per schedule")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per schedule first")
    parser.add_argument("--batch", type=int, default=4, help="sequences per rank")
    parser.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    args = parser.parse_args()
    profile = load_profile(args.profile)
    results = run_on_ranks(measure, (args.batch, args.seq, args.steps, args.warmup), profile, timeout_s=1800)
    print(f"training steps on {profile.source}: {profile.world_size} ranks, {args.batch} x {args.seq} tokens per "
          f"rank, {args.steps} timed steps per schedule (medians over steps and ranks)")
    shares = {}
    for schedule in SCHEDULES:
        steps = [s for r in results for s in r[schedule]]
        seconds = statistics.median(s["seconds"] for s in steps)
        moe = statistics.median(s["moe"] / s["seconds"] for s in steps)
        sync = statistics.median(s["grad_sync"] / s["seconds"] for s in steps)
        shares[schedule] = moe
        print(f"  {schedule:<10}  step {seconds * 1e3:8.1f} ms   moe_comm_exposed_share {moe:6.1%}   "
              f"grad_sync_exposed_share {sync:6.1%}")
    ratio = shares["overlap"] / shares["sequential"] if shares["sequential"] > 0 else float("nan")
    print(f"  MoE exposed share, overlap / sequential: {ratio:.2f} (target <= 0.5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
