"""Serving a mixed workload: continuous batching against static batches and against transformers' padded generate.

    python benchmarks/serve.py [--requests 48] [--max-batch 8] [--seed 0] [--preset small] [--threads N]

The workload is seeded: prompt lengths uniform in [8, 96] tokens, output lengths
(each request's max_new_tokens) log-uniform in [4, 128] (most short, a few long, as
chat traffic is), greedy decoding, no stop token, every request queued at time 0 in the
same order for each system. Three systems serve it on the same weights (a random
checkpoint of the preset, written by transformers), one process:

- engine: moeport's continuous batching (`moeport.model.Engine`, `--max-batch` slots):
  a request leaves when done and the next one takes its slot;
- static: moeport's `generate` on batches of `--max-batch` requests in queue order,
  left-padded, each batch decoding as many steps as its longest request asks for
  (tokens past a request's own max_new_tokens are wasted and not counted); a request
  is done when its batch is;
- transformers: `LongcatFlashForCausalLM.generate` on the same batches (left-padded,
  with the attention mask).

Prints, per system: tokens/s (the tokens the requests asked for, over the wall time),
per-request latency percentiles (p50 / p90 / p99 from time 0 to the request's end),
and the ratios of the engine's tokens/s to the others'; for the engine, its decode
batch (live sequences per step) over the run, in ten equal slices of its steps; and
whether every system gave every request the same tokens. Target: the engine at least
1.5x static batching, and ahead of transformers.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

from moeport.model import PRESETS, Engine, load_pretrained  # noqa: E402
from moeport.model.generation import left_pad  # noqa: E402
from reference import load_reference, save_reference_checkpoint  # noqa: E402


def workload(count: int, vocab: int, seed: int) -> list[tuple[list[int], int]]:
    """`count` requests (prompt ids, max_new_tokens): prompts 8..96 tokens, outputs log-uniform in 4..128."""
    g = torch.Generator().manual_seed(seed)
    requests = []
    for _ in range(count):
        length = int(torch.randint(8, 97, (1,), generator=g))
        new = int(round(math.exp(math.log(4) + float(torch.rand(1, generator=g)) * (math.log(128) - math.log(4)))))
        requests.append((torch.randint(3, vocab, (length,), generator=g).tolist(), new))
    return requests


def serve_engine(model, requests, max_batch: int) -> dict:
    """The workload through the engine: per request its tokens and finish time; the live count per step."""
    engine = Engine(model, max_batch, max_length=max(len(p) + n for p, n in requests))
    ids = [engine.add(prompt, new, eos_token_id=[]) for prompt, new in requests]
    tokens, done_at, live = {}, {}, []
    start = time.perf_counter()
    while engine.has_work():
        finished = engine.step()
        live.append(len(engine.live) + len(finished))
        for request in finished:
            tokens[request.id], done_at[request.id] = request.tokens, time.perf_counter() - start
    wall = time.perf_counter() - start
    return {"tokens": [tokens[i] for i in ids], "latency": [done_at[i] for i in ids], "wall": wall, "live": live}


def serve_static(generate, requests, max_batch: int) -> dict:
    """The workload in static batches of `max_batch` through `generate(ids, mask, steps)` -> ids [B, T + steps]."""
    tokens, latency = [], []
    start = time.perf_counter()
    for first in range(0, len(requests), max_batch):
        batch = requests[first:first + max_batch]
        ids, mask = left_pad([prompt for prompt, _ in batch], pad_id=0)
        mask = torch.ones_like(ids) if mask is None else mask
        out = generate(ids, mask, max(n for _, n in batch))
        ended = time.perf_counter() - start
        for row, (_, new) in enumerate(batch):
            tokens.append(out[row, ids.shape[1]:ids.shape[1] + new].tolist())
            latency.append(ended)
    return {"tokens": tokens, "latency": latency, "wall": time.perf_counter() - start}


def percentile(values: list[float], share: float) -> float:
    """The `share` quantile of `values` (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(share * len(ordered)) - 1))]


def report(results: dict, requests) -> None:
    """One line per system, the engine's ratios, its decode batch over time, and whether the tokens agree."""
    asked = sum(n for _, n in requests)
    rates = {name: asked / r["wall"] for name, r in results.items()}
    for name, r in results.items():
        lat = r["latency"]
        print(f"  {name:<12} {rates[name]:8.1f} tokens/s  wall {r['wall']:7.2f} s  latency p50 {percentile(lat, 0.5):6.2f}"
              f" s  p90 {percentile(lat, 0.9):6.2f} s  p99 {percentile(lat, 0.99):6.2f} s")
    for other in (name for name in results if name != "engine"):
        print(f"  engine / {other}: {rates['engine'] / rates[other]:.2f}x tokens/s")
    live = results["engine"]["live"]
    slices = [live[len(live) * i // 10: len(live) * (i + 1) // 10] for i in range(10)]
    print(f"  engine decode batch over {len(live)} steps (mean live sequences per tenth): "
          + " ".join(f"{statistics.mean(s):.1f}" for s in slices if s))
    same = {name: r["tokens"] == results["engine"]["tokens"] for name, r in results.items() if name != "engine"}
    print("  same tokens as the engine for every request: " + ", ".join(f"{k} {'yes' if v else 'NO'}"
                                                                         for k, v in same.items()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = PRESETS[args.preset]
    with tempfile.TemporaryDirectory() as tmp:
        path = save_reference_checkpoint(os.path.join(tmp, args.preset), config, seed=0, std=0.05)
        ours, reference = load_pretrained(path), load_reference(path)
    requests = workload(args.requests, config.vocab_size, args.seed)
    news = [n for _, n in requests]
    print(f"{args.requests} requests, prompts {min(len(p) for p, _ in requests)}-{max(len(p) for p, _ in requests)} "
          f"tokens, outputs {min(news)}-{max(news)} (mean {statistics.mean(news):.1f}); {args.preset} preset, "
          f"max batch {args.max_batch}, {args.threads} threads, one process, greedy")

    def ours_static(ids, mask, steps):
        return ours.generate(ids, attention_mask=mask, max_new_tokens=steps, eos_token_id=[])

    def reference_static(ids, mask, steps):
        with torch.inference_mode():
            return reference.generate(ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                                      do_sample=False, eos_token_id=None, pad_token_id=0)

    serve_engine(ours, requests[: args.max_batch], args.max_batch)  # warm-up: kernels built, buffers sized
    results = {
        "engine": serve_engine(ours, requests, args.max_batch),
        "static": serve_static(ours_static, requests, args.max_batch),
        "transformers": serve_static(reference_static, requests, args.max_batch),
    }
    report(results, requests)
    return 0


if __name__ == "__main__":
    sys.exit(main())
