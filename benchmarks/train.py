"""Training tokens/s of moeport's LongCat-Flash against transformers' LongcatFlashForCausalLM, same weights.

    python benchmarks/train.py [--preset small] [--batch 4] [--seq 256] [--steps 5] [--warmup 2] [--threads N]
                               [--data bytes|random] [--lr 1e-3] [--no-memory]

What it measures: full training steps (forward, loss, backward, gradient clipping at
1.0, AdamW with betas (0.9, 0.95) and eps 1e-16 at the same lr) on the same random
checkpoint (written once by transformers' save_pretrained, loaded by both) and the same
seeded batches [batch, seq + 1] (inputs, and shifted by one, targets): windows of this
repository's own text as byte tokens by default, so that the loss can fall (on random ids
it cannot), or random token ids.

Three sides:
- transformers: a plain loop; the loss is the mean next-token cross entropy (LM only);
- moeport, LM only: Trainer with balance_coef = z_loss_coef = bias_update_rate = 0,
  the same objective as transformers' (apples to apples);
- moeport, full objective: Trainer with the LongCat-Flash objective (LM + device-level
  balance loss + hidden z-loss) and the compute-budget controller moving the router
  biases, K_e = top-k * N / (N + Z) target FFN experts per token.

How: the three sides live in this process and take their steps interleaved (one step of
each per round, the order reversed every other round) after `--warmup` steps each;
medians over `--steps` timed steps, tokens/s = batch * seq / step time, and the ratio of
each moeport side to transformers. Peak memory: each side again in its own child process
(this script with --child), which loads its model, resets the peak RSS (Linux
/proc/self/clear_refs), then takes warm-up + 2 steps; it reports the peak RSS (VmHWM;
getrusage's ru_maxrss would count the parent's RSS at fork/exec) less the RSS once the
model was loaded and the batches made, i.e. what training adds (gradients, optimizer
state, activations), and that peak itself. The first and last loss of each side are
printed (the full objective's include its extra terms).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import transformers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

from moeport.model import PRESETS, load_pretrained
from moeport.model.training import Trainer, TrainSettings
from reference import load_reference, save_reference_checkpoint

SIDES = {"transformers": "transformers (LM loss only)",
         "moeport-lm": "moeport, LM only (balance 0, z 0, controller off)",
         "moeport-full": "moeport, full objective (LM + balance + z-loss + controller)"}
DATA = {"bytes": "byte tokens of the repo's text", "random": "random token ids"}
BETAS, EPS, CLIP = (0.9, 0.95), 1e-16, 1.0


def settings(side: str, config, args) -> TrainSettings:
    """Our Trainer's settings for a moeport side: LM only, or the full objective with K_e = K * N / (N + Z)."""
    common = {"lr": args.lr, "adam_eps": EPS, "adam_betas": BETAS, "grad_clip": CLIP, "weight_decay": 0.0}
    if side == "moeport-lm":
        return TrainSettings(**common, balance_coef=0.0, z_loss_coef=0.0, bias_update_rate=0.0)
    k_e = config.moe_topk * config.n_routed_experts / (config.n_routed_experts + config.zero_expert_num)
    return TrainSettings(**common, ffn_experts_per_token=k_e)  # default balance, z-loss and controller rates


def build(side: str, path: str, config, args):
    """A function taking one training step of `side` on ids [B, S + 1] and returning its loss."""
    if side == "transformers":
        ref = load_reference(path).train()
        params = [p for p in ref.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=args.lr, betas=BETAS, eps=EPS, weight_decay=0.0)

        def step(ids: torch.Tensor) -> float:
            logits = ref(input_ids=ids[:, :-1], use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                     ids[:, 1:].reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, CLIP)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()
        return step
    model = load_pretrained(path).train()
    trainer = Trainer(model, settings(side, config, args))
    return lambda ids: trainer.step(ids).loss


def batches(config, args, count: int) -> list[torch.Tensor]:
    """`count` seeded batches [batch, seq + 1], the same for every side: windows of this repository's own text
    (docs/*.md, model/*.py) as byte tokens (--data bytes), or uniformly random token ids (--data random)."""
    gen = torch.Generator().manual_seed(args.seed)
    shape = (args.batch, args.seq + 1)
    if args.data == "random":
        return [torch.randint(0, config.vocab_size, shape, generator=gen) for _ in range(count)]
    files = [os.path.join(REPO, d, n) for d in ("docs", "model") for n in sorted(os.listdir(os.path.join(REPO, d)))
             if n.endswith((".md", ".py"))]
    text = bytearray()
    for name in files:
        with open(name, "rb") as f:
            text += f.read()
    data = torch.frombuffer(text, dtype=torch.uint8).long() % config.vocab_size
    starts = [torch.randint(0, len(data) - shape[1], (args.batch,), generator=gen) for _ in range(count)]
    return [torch.stack([data[s: s + shape[1]] for s in row.tolist()]) for row in starts]


def rss_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process from /proc/self/status, in KiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux >= 4.0); whether that worked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(args) -> int:
    """Memory run of one side in its own process: prints one JSON line {added_mib, peak_mib, how}."""
    torch.set_num_threads(args.threads)
    config = PRESETS[args.preset]
    step = build(args.child, args.checkpoint, config, args)
    data = batches(config, args, args.warmup + 2)
    # ru_maxrss also counts the parent's RSS at fork/exec, so the peak is the process's own VmHWM, reset here.
    if reset_peak():
        base, how = rss_kib("VmRSS"), "the peak RSS (VmHWM, reset after loading) less the RSS after loading"
    else:
        base, how = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss less ru_maxrss after loading"
    for ids in data:
        step(ids)
    peak = rss_kib("VmHWM") if how.startswith("the peak") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"added_mib": (peak - base) / 1024, "peak_mib": peak / 1024, "how": how}))
    return 0


def memory(side: str, path: str, args) -> dict:
    """Run `side`'s memory measurement in a child process (this script with --child); its JSON result."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", side, "--checkpoint", path, "--preset", args.preset,
           "--batch", str(args.batch), "--seq", str(args.seq), "--warmup", str(args.warmup), "--lr", str(args.lr),
           "--threads", str(args.threads), "--seed", str(args.seed), "--data", args.data]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def timed_steps(steps: dict, data: list[torch.Tensor], warmup: int) -> tuple[dict, dict]:
    """Each side's step times after `warmup` and its losses, the sides interleaved step by step (the order
    reversed every other round)."""
    names = list(steps)
    times = {name: [] for name in names}
    losses = {name: [] for name in names}
    for i, ids in enumerate(data):
        for name in names if i % 2 == 0 else reversed(names):
            start = time.perf_counter()
            losses[name].append(steps[name](ids))
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times, losses


def main() -> int:
    """Parse the options; time the three sides interleaved, measure each one's memory alone, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0, help="the batches' seed")
    parser.add_argument("--data", choices=list(DATA), default="bytes", help="byte tokens of the repo's text, "
                        "or random ids (on which no loss can fall)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--no-memory", action="store_true", help="skip the child processes measuring memory")
    parser.add_argument("--child", choices=list(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    config = PRESETS[args.preset]
    tokens = args.batch * args.seq
    with tempfile.TemporaryDirectory() as tmp:
        path = save_reference_checkpoint(os.path.join(tmp, args.preset), config, seed=0, std=0.05)
        steps = {side: build(side, path, config, args) for side in SIDES}
        print(f"{args.preset} config: hidden {config.hidden_size}, {config.num_layers} layers, "
              f"{config.n_routed_experts} FFN + "
              f"{config.zero_expert_num} zero experts, top-{config.moe_topk}; batch {args.batch} x seq {args.seq} = "
              f"{tokens} tokens/step ({DATA[args.data]}); lr {args.lr}, AdamW betas {BETAS} eps {EPS}, clip {CLIP}; "
              f"{args.threads} threads; "
              f"medians of {args.steps} steps after {args.warmup} warm-up, the sides interleaved step by step")
        times, losses = timed_steps(steps, batches(config, args, args.warmup + args.steps), args.warmup)
        mem = {} if args.no_memory else {side: memory(side, path, args) for side in SIDES}
    median = {side: statistics.median(t) for side, t in times.items()}
    for side, label in SIDES.items():
        line = (f"{label}: {median[side] * 1e3:.0f} ms/step, {tokens / median[side]:.0f} tokens/s, "
                f"loss {losses[side][0]:.4f} -> {losses[side][-1]:.4f}")
        if side != "transformers":
            line += f"; {median['transformers'] / median[side]:.2f}x transformers' tokens/s"
        if side in mem:
            line += f"; memory +{mem[side]['added_mib']:.0f} MiB (peak {mem[side]['peak_mib']:.0f} MiB)"
        print(line)
    if mem:
        print(f"memory: each side alone in a child process; +X is {next(iter(mem.values()))['how']} "
              f"(model and batches), after {args.warmup + 2} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
