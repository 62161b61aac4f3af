"""`moeport plan --calibrate`: measure this machine as the ranks of a profile see it, write a hardware file.

Measured on the profile's ranks, started as `moeport run` starts them (each on its share of the
cores, with that share of torch threads), every timing started on all of them together, so that
each sees what a run sees: the other ranks at work beside it. In float32 on the host CPU:

- matmul: a square matmul (2 n^3 FLOPs);
- memory: a large copy (its bytes read plus written): the bandwidth; and the fraction of it that
  decoding matmuls reach reading their weights: 8 rows through each of a pool of 8 MB weights
  (together larger than the caches, so each is read from memory, as a decoding step reads its
  layers' weights), the mean of the two layouts moeport holds weights in (torch's linear layers'
  [out, in], the experts' [in, out]): the memory efficiency. On a CPU it is well under 1 (the matmul
  library packs each weight as it reads it, more slowly in the [out, in] layout);
- operator overhead: a decoding step of the `tiny` preset (every operator tiny, so its time is
  launch cost) over the operators it launches, counted at torch's dispatcher as the planner's
  operator counts are;
- link: the profile's emulated link (latency and bandwidth, which it holds to exactly: efficiency 1).

Each figure is the median of its repeats (the machine as a run meets it), and of the ranks the
slowest one's (every exchange waits for it). The matmul rate and the link are achieved ones as they
stand: their efficiencies are 1.0.
"""

from __future__ import annotations

import datetime
import os
import platform
import time
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moeport.base.errors import UserError
from moeport.plan.hardware import HardwareSpec, parse_hardware


def rank_threads(world_size: int) -> int:
    """The torch threads one of `world_size` local ranks gets: its share of this process's cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, world_size))


def _median(seconds_of, repeats: int, barrier=None) -> float:
    """The median of `repeats` timings of `seconds_of()` (after one warm-up call): the machine as a run
    meets it, which spends seconds on what is measured here in milliseconds. With `barrier`, every rank
    starts each timing together, so that each sees the others at work beside it."""
    seconds_of()
    times = []
    for _ in range(repeats):
        if barrier is not None:
            barrier()
        times.append(seconds_of())
    return sorted(times)[len(times) // 2]


def measure_matmul_flops(n: int = 1024, repeats: int = 5, barrier=None) -> float:
    """Achieved float32 matmul FLOP/s: the median of `repeats` [n, n] @ [n, n]."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)

    def once() -> float:
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        return time.perf_counter() - start

    return 2.0 * n**3 / _median(once, repeats, barrier)


def measure_memory_bandwidth(megabytes: int = 256, repeats: int = 5, barrier=None) -> float:
    """Achieved memory bandwidth, bytes/s: the median of `repeats` copies of `megabytes` (read + write)."""
    count = megabytes * (1 << 20) // 4
    src, dst = torch.ones(count), torch.empty(count)

    def once() -> float:
        start = time.perf_counter()
        dst.copy_(src)
        return time.perf_counter() - start

    return 2.0 * count * 4 / _median(once, repeats, barrier)


def measure_weight_stream(megabytes: int = 256, rows: int = 8, repeats: int = 5, linear: bool = True,
                          barrier=None) -> float:
    """Bytes/s at which matmuls of `rows` rows read their weights from memory: one pass over a pool of 8 MB
    weights (`megabytes` in all), each in torch's linear layout ([out, in]) or else the experts'
    ([in, out]); the median of `repeats` passes."""
    width, each = 2048, min(8, megabytes) * (1 << 20) // (4 * 2048)
    shape = (each, width) if linear else (width, each)
    pool = [torch.full(shape, 0.01) for _ in range(max(1, megabytes // 8))]
    x = torch.randn(rows, width)

    def once() -> float:
        start = time.perf_counter()
        for weight in pool:
            torch.nn.functional.linear(x, weight) if linear else torch.mm(x, weight)
        return time.perf_counter() - start

    return sum(w.numel() for w in pool) * 4 / _median(once, repeats, barrier)


class CountOperators(TorchDispatchMode):
    """Counts the operators that reach torch's dispatcher while it is entered (a `with` block)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def measure_op_overhead(batch: int = 8, steps: int = 32, prompt: int = 16, barrier=None) -> tuple[float, int]:
    """(seconds per operator, operators per step): the median decoding step of the `tiny` preset (one
    process, every expert local) over the operators one step launches."""
    from moeport.model import LongcatForCausalLM
    from moeport.model.config import PRESETS
    from moeport.model.init import init_weights

    model = init_weights(LongcatForCausalLM(PRESETS["tiny"])).eval()
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        caches = model.new_caches(batch, prompt + steps + 3)
        logits = model(ids, caches, logits_to_keep=1)[:, -1]
        logits = model(logits.argmax(-1, keepdim=True), caches, logits_to_keep=1)[:, -1]  # warm-up step
        counter = CountOperators()
        with counter:
            logits = model(logits.argmax(-1, keepdim=True), caches, logits_to_keep=1)[:, -1]
        state = {"logits": logits}

        def once() -> float:
            start = time.perf_counter()
            state["logits"] = model(state["logits"].argmax(-1, keepdim=True), caches, logits_to_keep=1)[:, -1]
            return time.perf_counter() - start

        typical = _median(once, steps, barrier)
    return typical / counter.count, counter.count


def measure(matmul_n: int, memory_mb: int, repeats: int, op_steps: int, barrier=None) -> dict[str, float]:
    """This process's matmul FLOP/s, copy and weight-stream bytes/s, seconds per operator and operators per
    tiny step; with `barrier` (every rank's), the ranks start each timing together."""
    b = barrier
    overhead, ops = measure_op_overhead(steps=op_steps, barrier=b)
    return {
        "flops": measure_matmul_flops(matmul_n, repeats, b),
        "bandwidth": measure_memory_bandwidth(memory_mb, repeats, b),
        "stream": (measure_weight_stream(memory_mb, repeats=repeats, barrier=b)
                   + measure_weight_stream(memory_mb, repeats=repeats, linear=False, barrier=b)) / 2,
        "overhead": overhead,
        "ops": ops,
    }


def measure_on_rank(rt: Any, matmul_n: int, memory_mb: int, repeats: int, op_steps: int) -> dict[str, float]:
    """`measure` on one rank of a Runtime, every rank together."""
    return measure(matmul_n, memory_mb, repeats, op_steps, barrier=rt.comm.barrier)


def calibrate(profile: Any, matmul_n: int = 1024, memory_mb: int = 256, repeats: int = 5,
              op_steps: int = 32) -> tuple[HardwareSpec, dict[str, Any]]:
    """Measure this machine on the ranks of `profile` and read its emulated link: (the hardware, what was
    measured and how, for the file's comments)."""
    link = profile.emulated_link
    if link is None:
        raise UserError(f"{profile.source}: emulated_link: --calibrate reads the link from the profile's "
                        f"emulated_link section, and this profile has none (try --profile emulated-link)")
    sizes = (matmul_n, memory_mb, repeats, op_steps)
    if profile.world_size > 1:
        from moeport.jobs import start_ranks

        per_rank = start_ranks(measure_on_rank, sizes, profile)
    else:
        before = torch.get_num_threads()
        torch.set_num_threads(rank_threads(1))
        try:
            per_rank = [measure(*sizes)]
        finally:
            torch.set_num_threads(before)
    flops = min(r["flops"] for r in per_rank)
    bandwidth = min(r["bandwidth"] for r in per_rank)
    stream = min(r["stream"] for r in per_rank)
    overhead = max(r["overhead"] for r in per_rank)
    data = {
        "name": f"calibrated-{platform.node() or 'host'}",
        "matmul_tflops": {"float32": flops / 1e12},
        "memory_bandwidth_gbps": bandwidth / 1e9,
        "link_bandwidth_gbps": link.bandwidth_gbps,
        "link_latency_us": link.latency_us,
        "efficiency": {"matmul": 1.0, "memory": min(1.0, stream / bandwidth), "link": 1.0},
        "op_overhead_us": overhead * 1e6,
        "price_per_hour": None,
    }
    how = {
        "profile": profile.source, "threads": rank_threads(profile.world_size), "world_size": profile.world_size,
        "matmul_n": matmul_n, "memory_mb": memory_mb, "repeats": repeats, "tiny_step_ops": int(per_rank[0]["ops"]),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "date": datetime.date.today().isoformat(), "torch": torch.__version__,
    }
    return parse_hardware(data, "--calibrate"), how


def hardware_yaml(hardware: HardwareSpec, how: dict[str, Any]) -> str:
    """The hardware file `--calibrate --out` writes: every number with how it was measured."""
    d, e = hardware, hardware.efficiency
    return "\n".join([
        f"# Calibrated by `moeport plan --calibrate` on {how['date']} ({how['machine']}, torch {how['torch']}),",
        f"# on the {how['world_size']} rank(s) of {how['profile']} at once, {how['threads']} torch thread(s) each;",
        "# each figure the median of its repeats, the slowest rank's.",
        f"name: {d.name}",
        "matmul_tflops:",
        (f"  float32: {d.matmul_tflops.float32:.6g}   # median of {how['repeats']} float32 "
        f"[{how['matmul_n']}, {how['matmul_n']}] matmuls"),
        (f"memory_bandwidth_gbps: {d.memory_bandwidth_gbps:.6g}   # median of {how['repeats']} copies of "
        f"{how['memory_mb']} MB (read + write)"),
        f"link_bandwidth_gbps: {d.link_bandwidth_gbps:.6g}   # the profile's emulated_link.bandwidth_gbps",
        f"link_latency_us: {d.link_latency_us:.6g}   # the profile's emulated_link.latency_us",
        "efficiency:",
        "  matmul: 1.0   # the rate above is an achieved one",
        (f"  memory: {e.memory:.4g}   # 8-row matmuls read {how['memory_mb']} MB of 8 MB weights at "
         f"{d.memory_bandwidth_gbps * e.memory:.4g} GB/s (mean of both layouts), this fraction of the copy's"),
        "  link: 1.0     # the emulated link holds to its figures",
        (f"op_overhead_us: {d.op_overhead_us:.6g}   # median decoding step of the tiny preset over its "
        f"{how['tiny_step_ops']} operators"),
        "price_per_hour: null   # no price for this machine",
        "",
    ])


__all__ = [
    "calibrate",
    "hardware_yaml",
    "measure",
    "measure_matmul_flops",
    "measure_memory_bandwidth",
    "measure_on_rank",
    "measure_op_overhead",
    "measure_weight_stream",
    "rank_threads",
]
