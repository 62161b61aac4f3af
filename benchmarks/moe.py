"""moeport's LongCat-Flash against transformers' LongcatFlashForCausalLM, same process, same weights.

    python benchmarks/moe.py [--repeats 5] [--threads 2]

On the `small` config (hidden 512, 64 FFN + 32 zero experts, top-8), interleaved
repeats, medians:
- prefill: one forward pass of 2 x 256 tokens;
- decoding: greedy decoding of 64 new tokens after the same 2 x 256 prompt (tokens/s, the prefill
  taken out by timing a 1-token generate too); also after a 2 x 16 prompt;
- the FFN experts' achieved FLOP rate against one dense matmul of the same FLOPs, and that of
  two batched matmuls alone with the slots spread exactly evenly (the ceiling of the batched
  layout torch's operators use; the line above it names the device kernels the experts use);
- MoE time with 0%, 25% and 50% of the slots on zero experts.
Prints one line per figure with the ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

from moeport.model import PRESETS, load_pretrained  # noqa: E402
from moeport.model.router import Routing, ffn_slots, zero_expert_output  # noqa: E402
from reference import load_reference, save_reference_checkpoint  # noqa: E402


def interleaved(fns: dict, repeats: int) -> dict:
    """Median seconds of each function, run in alternating order after one warm-up each."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    names = list(fns)
    for i in range(repeats):
        for name in names if i % 2 == 0 else reversed(names):
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def routing_with_zero_share(tokens: int, config, share: float, generator: torch.Generator) -> Routing:
    """Top-k routings where `share` of the slots go to zero experts, the rest spread over the FFN experts."""
    k, n = config.moe_topk, config.n_routed_experts
    zero_slots = round(k * share)
    ids = []
    for _ in range(tokens):
        ffn = torch.randperm(n, generator=generator)[: k - zero_slots]
        zero = n + torch.randperm(config.zero_expert_num, generator=generator)[:zero_slots]
        ids.append(torch.cat([ffn, zero]))
    return Routing(torch.stack(ids), torch.rand(tokens, k, generator=generator))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = PRESETS["small"]
    with tempfile.TemporaryDirectory() as tmp:
        path = save_reference_checkpoint(os.path.join(tmp, "small"), config, seed=0, std=0.05)
        ref, ours = load_reference(path), load_pretrained(path)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, config.vocab_size, (2, 256), generator=gen)
    print(f"small config: hidden {config.hidden_size}, {config.n_routed_experts} FFN + {config.zero_expert_num} zero experts, "
          f"top-{config.moe_topk}; {args.threads} threads; medians of {args.repeats} interleaved repeats")
    kernels = [f"{kind} {name}" for kind, name in ours.context.expert_kernels.in_use(ours.device, torch.float32).items()
               if name]
    print(f"expert kernels: {', '.join(kernels) or 'none (torch operators)'}")

    with torch.no_grad():
        assert (ref(prompt[:, :32]).logits - ours(prompt[:, :32])).abs().max() <= 1e-4
        t = interleaved({"reference": lambda: ref(prompt), "moeport": lambda: ours(prompt)}, args.repeats)
    print(f"prefill 2x256: reference {t['reference'] * 1e3:.1f} ms, moeport {t['moeport'] * 1e3:.1f} ms, "
          f"speed-up {t['reference'] / t['moeport']:.2f}x (target >= 1.2x)")

    new = 64
    # The target is decoding after the prefill measured above; the short prompt is printed for comparison.
    for label, start, target in (("the 2x256 prompt", prompt, "target >= 2x"),
                                 ("a 2x16 prompt", prompt[:, :16], "for comparison, no target")):
        # Decoding time is generate(1 + new) minus generate(1): the same prefill and first token, then `new` steps.
        # eos_token_id=None: the reference would otherwise stop at, or (with min_new_tokens) forbid, its EOS id.
        def ref_gen(n, start=start):
            return ref.generate(start, attention_mask=torch.ones_like(start), max_new_tokens=n, do_sample=False,
                                pad_token_id=0, eos_token_id=None)

        def our_gen(n, start=start):
            return ours.generate(start, max_new_tokens=n)

        assert torch.equal(ref_gen(1 + new), our_gen(1 + new))
        t = interleaved({(name, n): (lambda gen=gen, n=n: gen(n)) for name, gen in (("reference", ref_gen), ("moeport", our_gen))
                         for n in (1, 1 + new)}, args.repeats)
        rate = {name: start.shape[0] * new / (t[(name, 1 + new)] - t[(name, 1)]) for name in ("reference", "moeport")}
        print(f"decode 2x{new} tokens after {label}: reference {rate['reference']:.1f} tokens/s, moeport {rate['moeport']:.1f} "
              f"tokens/s, speed-up {rate['moeport'] / rate['reference']:.2f}x ({target})")

    experts = ours.model.layers[0].mlp.experts
    tokens = torch.randn(512, config.hidden_size, generator=gen)
    routing = routing_with_zero_share(512, config, 0.0, gen)
    slots = ffn_slots(routing, config.n_routed_experts)
    n_slots = int((slots >= 0).sum())
    flops = n_slots * 6 * config.hidden_size * config.expert_ffn_hidden_size
    x = torch.randn(n_slots, config.hidden_size, generator=gen)
    w = torch.randn(config.hidden_size, 3 * config.expert_ffn_hidden_size, generator=gen)
    product = torch.empty(n_slots, w.shape[1])  # kept: a fresh output each time would time page faults, not arithmetic
    # The same expert matmuls with every expert given exactly its share of the slots: two batched
    # matmuls and nothing else, the most a batched layout of the experts can reach here.
    rows = n_slots // experts.count
    balanced_in = torch.randn(experts.count, rows, config.hidden_size, generator=gen)
    balanced_act = torch.randn(experts.count, rows, config.expert_ffn_hidden_size, generator=gen)
    balanced_out = (torch.empty(experts.count, rows, experts.gate_up.shape[-1]), torch.empty(experts.count, rows, config.hidden_size))
    with torch.no_grad():
        t = interleaved({"experts": lambda: experts(tokens, slots, routing.weights),
                         "dense": lambda: torch.matmul(x, w, out=product),
                         "balanced": lambda: (torch.bmm(balanced_in, experts.gate_up, out=balanced_out[0]),
                                              torch.bmm(balanced_act, experts.down, out=balanced_out[1]))}, args.repeats * 3)
    print(f"experts: {flops / t['experts'] / 1e9:.1f} GFLOP/s over {n_slots} slots; one dense matmul of the same FLOPs "
          f"{flops / t['dense'] / 1e9:.1f} GFLOP/s; {t['dense'] / t['experts']:.0%} of the dense rate (target >= 60%); "
          f"the two batched matmuls alone with {rows} slots per expert: {t['dense'] / t['balanced']:.0%}")

    timings = {}
    with torch.no_grad():
        routings = {share: routing_with_zero_share(512, config, share, gen) for share in (0.0, 0.25, 0.5)}

        def moe(r):
            return lambda: experts(tokens, ffn_slots(r, config.n_routed_experts), r.weights) + zero_expert_output(
                tokens, r, config.n_routed_experts)

        timings = interleaved({share: moe(r) for share, r in routings.items()}, args.repeats * 3)
    base = timings[0.0]
    print("MoE time by zero-expert share: " + ", ".join(
        f"{share:.0%}: {s * 1e3:.2f} ms ({s / base:.2f} of 0%)" for share, s in timings.items()) + " (ideal 1.00, 0.75, 0.50)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
