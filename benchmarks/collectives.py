"""Each Communicator operation against the raw torch.distributed call on the same tensors.

    python benchmarks/collectives.py [--world-size 2] [--repeats 40]

Runs on spawned CPU ranks over gloo. For each operation and size (4 KiB, 4 MiB) the
moeport call and the raw call alternate (interleaved repeats, barrier before each),
and the medians are compared: ratio moeport/raw, and the per-call overhead in
microseconds. Then the expert-parallel dispatch's bytes against a naive dispatch that
sends one copy of the hidden state per top-k slot. Prints one line per measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moeport.profile import load_profile  # noqa: E402
from moeport.testing import run_ranks  # noqa: E402

SIZES = {"4KiB": 4 * 1024, "4MiB": 4 * 1024 * 1024}


def _raw_ops(dist, comm, x, out_gather, out_scatter, out_a2a, splits):
    group = comm.group
    return {
        "all_reduce": lambda: dist.all_reduce(x, group=group),
        "all_gather": lambda: dist.all_gather_single(out_gather, x, group=group),
        "reduce_scatter": lambda: dist.reduce_scatter_single(out_scatter, x, group=group),
        "all_to_all": lambda: dist.all_to_all_single(out_a2a, x, group=group),
        "all_to_all_uneven": lambda: dist.all_to_all_single(
            out_a2a, x, output_split_sizes=splits[1], input_split_sizes=splits[0], group=group
        ),
        "broadcast": lambda: dist.broadcast(x, src=0, group=group),
    }


def _moeport_ops(comm, x, out_gather, out_scatter, out_a2a, splits):
    return {
        "all_reduce": lambda: comm.all_reduce(x),
        "all_gather": lambda: comm.all_gather(x, out_gather),
        "reduce_scatter": lambda: comm.reduce_scatter(x, out_scatter),
        "all_to_all": lambda: comm.all_to_all(x, out_a2a),
        "all_to_all_uneven": lambda: comm.all_to_all(x, out_a2a, splits[0], splits[1]),
        "broadcast": lambda: comm.broadcast(x, src=0),
    }


def measure(rt, repeats: int) -> dict:
    """On one rank: median seconds per (size, op, implementation)."""
    import torch.distributed as dist

    comm = rt.comm
    w = comm.world_size
    results = {}
    for label, nbytes in SIZES.items():
        rows = nbytes // 4 // 64 // w * w
        x = torch.ones(rows, 64)
        out_gather = torch.empty(rows * w, 64)
        out_scatter = torch.empty(rows // w, 64)
        out_a2a = torch.empty(rows, 64)
        # uneven: the same total, shifted by one row between peers (equal totals on every rank)
        base = rows // w
        ins = [base + (1 if p == (comm.rank + 1) % w else 0) - (1 if p == comm.rank else 0) for p in range(w)]
        outs = [base + (1 if comm.rank == (p + 1) % w else 0) - (1 if p == comm.rank else 0) for p in range(w)]
        raw = _raw_ops(dist, comm, x, out_gather, out_scatter, out_a2a, (ins, outs))
        ours = _moeport_ops(comm, x, out_gather, out_scatter, out_a2a, (ins, outs))
        for op in raw:
            times = {"raw": [], "moeport": []}
            for i in range(repeats + 3):
                for impl, fn in (("raw", raw[op]), ("moeport", ours[op])) if i % 2 else (("moeport", ours[op]), ("raw", raw[op])):
                    dist.barrier()
                    t0 = time.perf_counter()
                    fn()
                    elapsed = time.perf_counter() - t0
                    if i >= 3:  # warm-up
                        times[impl].append(elapsed)
            results[(label, op)] = {k: statistics.median(v) for k, v in times.items()}
    return results


def dispatch_bytes(rt) -> dict:
    """Bytes the expert-parallel dispatch sends for the small model's routing, against a naive dispatch."""
    from moeport.collectives.expert_parallel import ExpertParallelDispatcher
    from moeport.model.config import PRESETS

    c = PRESETS["small"]
    gen = torch.Generator().manual_seed(rt.rank)
    tokens = 512
    hidden = torch.randn(tokens, c.hidden_size, generator=gen)
    scores = torch.rand(tokens, c.num_experts_total, generator=gen)
    ids = torch.topk(scores, c.moe_topk, dim=-1).indices
    weights = torch.rand(tokens, c.moe_topk, generator=gen)
    dispatcher = ExpertParallelDispatcher(rt.groups.ep, c.n_routed_experts)
    dispatcher.dispatch(hidden, ids, weights)
    return dataclasses.asdict(dispatcher.last_stats)


def job(rt, repeats: int) -> dict:
    """Everything one rank measures."""
    return {"ops": measure(rt, repeats), "dispatch": dispatch_bytes(rt)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args()
    profile = load_profile("cpu-gloo", world_size=args.world_size)
    results = run_ranks(job, args.world_size, profile, args=(args.repeats,), timeout_s=900)
    print(f"moeport vs raw torch.distributed, gloo, {args.world_size} ranks, median of {args.repeats} interleaved repeats (rank 0)")
    print(f"{'size':<6} {'op':<18} {'raw us':>10} {'moeport us':>11} {'ratio':>7} {'overhead us':>12}")
    for (label, op), t in results[0]["ops"].items():
        raw, ours = t["raw"] * 1e6, t["moeport"] * 1e6
        print(f"{label:<6} {op:<18} {raw:>10.1f} {ours:>11.1f} {ours / raw:>7.3f} {ours - raw:>12.1f}")
    for rank, r in enumerate(results):
        d = r["dispatch"]
        print(
            f"dispatch rank {rank}: {d['bytes_sent']} bytes sent vs naive {d['naive_bytes']} "
            f"({d['bytes_sent'] / d['naive_bytes']:.3f} of naive)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
