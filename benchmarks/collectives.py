"""Each Communicator operation against the raw torch.distributed call; then the emulated link's own overhead.

    python benchmarks/collectives.py [--world-size 2] [--repeats 40] [--link-repeats 15]

Runs on spawned CPU ranks over gloo. For each operation and size (4 KiB, 4 MiB) the
moeport call and the raw call alternate (interleaved repeats, barrier before each),
and the medians are compared: ratio moeport/raw, and the per-call overhead in
microseconds. Then the expert-parallel dispatch's bytes against a naive dispatch that
sends one copy of the hidden state per top-k slot. Prints one line per measurement.

Then, on ranks of the emulated-link profile (gloo behind EmulatedLink), the same sizes
for all_to_all (equal and uneven splits), all_reduce and all_to_all_with_counts (the
dispatch's normal path: counts, then rows), to show that the link measures the schedule,
not itself. Repeats are interleaved over every (size, op), with a barrier before each
call; the table gives medians (rank 0), one row per (size, op):

    modelled us   link time the link models for the op on this rank (latency + bytes /
                  bandwidth, bytes by the link's rule; with counts: the counts exchange,
                  one int64 per peer, then the rows, as EmulatedLink.counts_then_rows_seconds)
    sync us       wall time of the synchronous call
    overhead us   sync - modelled: how late past its modelled time the op completes
    issue us      time for the call with async_op=True to return (then it is waited for)
    CPU share     process CPU time / wall time over the synchronous call, counting every
                  thread of the rank's process; near 0 when the wait sleeps rather than spins
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
LINK_PROFILE = "emulated-link"
LINK_WARMUPS = 2


def _rows(nbytes: int, w: int) -> int:
    """Rows of 64 float32 that make about `nbytes`, a multiple of the world size."""
    return nbytes // 4 // 64 // w * w


def _shifted_splits(rank: int, w: int, rows: int) -> tuple[list[int], list[int]]:
    """Uneven all_to_all splits: the same total, shifted by one row between peers (equal totals on every rank)."""
    base = rows // w
    ins = [base + (1 if p == (rank + 1) % w else 0) - (1 if p == rank else 0) for p in range(w)]
    outs = [base + (1 if rank == (p + 1) % w else 0) - (1 if p == rank else 0) for p in range(w)]
    return ins, outs


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
        rows = _rows(nbytes, w)
        x = torch.ones(rows, 64)
        out_gather = torch.empty(rows * w, 64)
        out_scatter = torch.empty(rows // w, 64)
        out_a2a = torch.empty(rows, 64)
        splits = _shifted_splits(comm.rank, w, rows)
        raw = _raw_ops(dist, comm, x, out_gather, out_scatter, out_a2a, splits)
        ours = _moeport_ops(comm, x, out_gather, out_scatter, out_a2a, splits)
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


def _all_to_all_seconds(link, ins: list[int], outs: list[int], row_bytes: int) -> float:
    """The link's all_to_all rule: the larger of the rows sent to and received from other ranks."""
    sent = sum(n for peer, n in enumerate(ins) if peer != link.rank)
    received = sum(n for peer, n in enumerate(outs) if peer != link.rank)
    return link.link_seconds(max(sent, received) * row_bytes)


def _link_ops(link, nbytes: int) -> dict:
    """Per op at about `nbytes`: (call taking async_op, link seconds modelled for it on this rank)."""
    w = link.world_size
    rows = _rows(nbytes, w)
    x = torch.zeros(rows, 64)  # zeros: repeated in-place all_reduce never overflows
    out = torch.empty(rows, 64)
    row_bytes = x[:1].numel() * x.element_size()
    equal = [rows // w] * w
    ins, outs = _shifted_splits(link.rank, w, rows)
    return {
        "all_to_all": (
            lambda a: link.all_to_all(x, out, async_op=a), _all_to_all_seconds(link, equal, equal, row_bytes)
        ),
        "all_to_all_uneven": (
            lambda a: link.all_to_all(x, out, ins, outs, async_op=a), _all_to_all_seconds(link, ins, outs, row_bytes)
        ),
        "all_reduce": (
            lambda a: link.all_reduce(x, async_op=a), link.link_seconds(2 * (w - 1) / w * rows * row_bytes)
        ),
        "all_to_all_with_counts": (
            lambda a: link.all_to_all_with_counts(x, ins, out, async_op=a),
            link.counts_then_rows_seconds(ins, outs, row_bytes),
        ),
    }


def _time_sync(call) -> tuple[float, float]:
    """Wall seconds of the synchronous call, and the process's CPU time over it as a share of that."""
    wall0, cpu0 = time.perf_counter(), time.process_time()
    call(False)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return wall, cpu / wall


def _time_issue(call, timeout_s: float) -> float:
    """Seconds for the call with async_op=True to return; then waits for its handle."""
    t0 = time.perf_counter()
    handle = call(True)
    issued = time.perf_counter() - t0
    handle.wait(timeout_s)
    return issued


def measure_link(rt, repeats: int) -> dict:
    """On one rank of an emulated-link profile: per (size, op), modelled seconds and the medians of
    the synchronous call's seconds and CPU share and of the asynchronous issue's seconds."""
    import torch.distributed as dist

    link = rt.comm
    ops = {(label, op): entry for label, nbytes in SIZES.items() for op, entry in _link_ops(link, nbytes).items()}
    samples = {key: {"sync": [], "cpu": [], "issue": []} for key in ops}
    for i in range(repeats + LINK_WARMUPS):
        for key, (call, _) in ops.items():
            for kind in ("sync", "issue") if i % 2 else ("issue", "sync"):
                dist.barrier()
                if kind == "sync":
                    wall, share = _time_sync(call)
                    measured = {"sync": wall, "cpu": share}
                else:
                    measured = {"issue": _time_issue(call, link.timeout_s)}
                if i >= LINK_WARMUPS:
                    for name, value in measured.items():
                        samples[key][name].append(value)
    return {
        key: {"modelled": ops[key][1], **{name: statistics.median(v) for name, v in samples[key].items()}}
        for key in ops
    }


def print_comparison(results: list, world_size: int, repeats: int) -> None:
    """The moeport-vs-raw table and the dispatch's bytes, from every rank's `job` result."""
    print(f"moeport vs raw torch.distributed, gloo, {world_size} ranks, median of {repeats} interleaved repeats (rank 0)")
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


def print_link(results: dict, profile, repeats: int) -> None:
    """The emulated link's overhead table, from rank 0's `measure_link` result."""
    link = profile.emulated_link
    print(
        f"\nemulated link overhead, profile {LINK_PROFILE}: latency {link.latency_us:g} us, "
        f"{link.bandwidth_gbps:g} GB/s, {profile.world_size} ranks, median of {repeats} interleaved repeats (rank 0); "
        "CPU share = process CPU time (all threads) / wall time of the sync call"
    )
    print(f"{'size':<6} {'op':<24} {'modelled us':>12} {'sync us':>10} {'overhead us':>12} {'issue us':>9} {'CPU share':>10}")
    for (label, op), t in results.items():
        modelled, sync = t["modelled"] * 1e6, t["sync"] * 1e6
        print(
            f"{label:<6} {op:<24} {modelled:>12.1f} {sync:>10.1f} {sync - modelled:>12.1f} "
            f"{t['issue'] * 1e6:>9.1f} {t['cpu']:>10.3f}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--link-repeats", type=int, default=15, help="repeats on the emulated link (its ops are slow)")
    args = parser.parse_args()
    profile = load_profile("cpu-gloo", world_size=args.world_size)
    results = run_ranks(job, args.world_size, profile, args=(args.repeats,), timeout_s=900)
    print_comparison(results, args.world_size, args.repeats)
    link_profile = load_profile(LINK_PROFILE, world_size=args.world_size)
    link_results = run_ranks(measure_link, args.world_size, link_profile, args=(args.link_repeats,), timeout_s=900)
    print_link(link_results[0], link_profile, args.link_repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
