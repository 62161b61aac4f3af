"""`moeport train`: training steps on every rank, a progress bar, checkpoints, and an exact resume.

Every `--save-every` steps (and after the last) each rank writes into
`--checkpoint-dir/step-NNNNNN/` its share of the model in the Hugging Face format
(`load_pretrained` and transformers read it; the routers' expert biases carry the
compute-budget controller's state) and `trainer-rank{R}.pt` (its optimizer state and
the step count); rank 0 marks the folder complete after every rank has written. The data
position is the step number (moeport.train_data). `--resume` continues from the last
complete folder up to `--steps` in all, so the losses are those of an uninterrupted run.

Silent data corruption (moeport.model.integrity): every `--check-replicas` steps the ranks
compare checksums of their replicated weights, and every `--check-recompute` steps one step
runs twice and must give the same bits; `--inject-sdc RANK:STEP` flips one bit to test them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import time
from typing import Any

import torch

from moeport.base.atomic import atomic_path, make_folder, write_text
from moeport.base.errors import UserError

COMPLETE = "complete"  # the marker file of a finished checkpoint folder
STEP_FOLDER = re.compile(r"^step-(\d{6})$")
#: Steps between replica checks by default: their cost stays under 2% of a step (README.md has the figure).
CHECK_REPLICAS_EVERY = 10
INJECTION = re.compile(r"^(\d+):(\d+)$")


def add_parser(sub: Any) -> None:
    """The `train` subcommand on the CLI's subparsers; its handler is `run`."""
    p = sub.add_parser("train", help="train the profile's model (expert-parallel on every rank)")
    p.add_argument("--profile", default="cpu-gloo")
    p.add_argument("--world-size", type=int)
    p.add_argument("--steps", type=int, default=20, help="total steps (a resumed run stops there too)")
    p.add_argument("--data", nargs="+", metavar="PATH", help="text files or .npy token ids (default: the bytes of "
                   "the Python standard library's sources)")
    p.add_argument("--checkpoint-dir", metavar="DIR")
    p.add_argument("--save-every", type=int, default=0, metavar="N", help="checkpoint every N steps (0: at the end)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --checkpoint-dir")
    p.add_argument("--init", metavar="DIR", help="start from the weights of the checkpoint in DIR (one `moeport "
                   "grow` wrote, say), with its routers' biases (the controller's state) and a new optimizer")
    p.add_argument("--json", action="store_true", help="end with one JSON line of figures")
    p.add_argument("--check-replicas", type=int, default=CHECK_REPLICAS_EVERY, metavar="N",
                   help="compare the ranks' replicated weights every N steps (0: never; default %(default)s)")
    p.add_argument("--check-recompute", type=int, default=0, metavar="N",
                   help="run every N-th step twice and compare the results bit for bit (0: never, the default)")
    p.add_argument("--inject-sdc", metavar="RANK:STEP", help="for testing the checks: flip one bit of the first "
                   "replicated weight on RANK right after STEP steps")
    p.set_defaults(func=run)


def last_checkpoint(folder: str) -> str | None:
    """The last complete step-NNNNNN folder in `folder`, or None."""
    if not os.path.isdir(folder):
        return None
    steps = sorted(name for name in os.listdir(folder)
                   if STEP_FOLDER.match(name) and os.path.exists(os.path.join(folder, name, COMPLETE)))
    return os.path.join(folder, steps[-1]) if steps else None


def _save(rt: Any, model: Any, trainer: Any, folder: str) -> None:
    """This rank's checkpoint into `folder`; rank 0 marks it complete once every rank has written."""
    from moeport.model import save_pretrained

    make_folder(folder)
    save_pretrained(model, folder, rank=rt.rank, world_size=rt.world_size, zero_expert_slots=True)
    with atomic_path(os.path.join(folder, f"trainer-rank{rt.rank}.pt")) as tmp:
        torch.save(trainer.state_dict(), tmp)
    rt.comm.barrier()
    if rt.rank == 0:
        write_text(os.path.join(folder, COMPLETE), f"{trainer.steps_done}\n")
    rt.comm.barrier()


@dataclasses.dataclass(frozen=True)
class SdcChecks:
    """What `moeport train` checks for silent data corruption: replicas every `replicas` steps, a recompute every
    `recompute` steps (0: never), and the fault to inject for testing them (`inject`: (rank, step) or None)."""

    replicas: int = CHECK_REPLICAS_EVERY
    recompute: int = 0
    inject: tuple[int, int] | None = None


def train_job(rt: Any, settings: Any, steps: int, data: list[str] | None, seq_len: int, rows: int,
              checkpoint_dir: str | None, save_every: int, resume_from: str | None,
              checks: SdcChecks = SdcChecks(), init_from: str | None = None,
              init_std: dict[str, float] | None = None) -> dict[str, Any]:
    """On one rank: train to `steps` steps in all, under `checks`; returns the figures. The model comes from
    `resume_from` (a training checkpoint, with its optimizer state), else from `init_from` (any checkpoint, a
    new optimizer), else from the profile, a preset's random init taking the `init_std` multipliers per
    parameter group (the width transfer's)."""
    from moeport.jobs import build_model, my_rows
    from moeport.model import load_pretrained
    from moeport.model.integrity import FaultInjection, RecomputeChecker, ReplicaChecker
    from moeport.model.timeline import Timeline
    from moeport.model.training import Trainer
    from moeport.train_data import read_stream, step_batch

    start = resume_from or init_from
    model = load_pretrained(start, rt) if start else build_model(rt, init_std)
    trainer = Trainer(model, dataclasses.replace(settings, total_steps=steps),
                      new_timeline=lambda: Timeline.for_backend(rt.backend))
    if resume_from:
        trainer.load_state_dict(torch.load(os.path.join(resume_from, f"trainer-rank{rt.rank}.pt"),
                                           weights_only=False))
    stream, _ = read_stream(data, model.config.vocab_size)
    mine = my_rows(rows, rt.rank, rt.world_size)
    bar = _progress(rt, trainer.steps_done, steps)
    history, timings, started, batch = [], [], time.perf_counter(), None
    replicas, recompute = ReplicaChecker(trainer, checks.replicas), RecomputeChecker(trainer, checks.recompute)
    fault = FaultInjection(*checks.inject) if checks.inject else None
    try:
        while trainer.steps_done < steps:
            replicas.verify()
            batch = step_batch(stream, trainer.steps_done, rows, seq_len)[mine]
            stats = recompute.step(batch)
            replicas.record()
            if fault is not None:
                fault.after_step(trainer)
            figures = dataclasses.asdict(stats)
            timings.append({key: figures.pop(key) for key in stats.TIMED})  # this rank's; the rest alike on every rank
            history.append(figures)
            if bar is not None:  # each step: loss, tokens/s so far, FFN experts per token, zero-expert share
                rate = len(history) * rows * seq_len / max(time.perf_counter() - started, 1e-9)
                bar.set_postfix(loss=f"{stats.loss:.3f}", tokens_per_s=f"{rate:.0f}",
                                ffn_per_token=f"{stats.ffn_experts_per_token:.2f}",
                                zero=f"{stats.zero_expert_share:.1%}")
                bar.update(1)
            if checkpoint_dir and (trainer.steps_done == steps or (save_every and trainer.steps_done % save_every == 0)):
                replicas.verify(force=True)  # no checkpoint from differing replicas
                _save(rt, model, trainer, os.path.join(checkpoint_dir, f"step-{trainer.steps_done:06d}"))
        replicas.verify(force=True)  # the last steps too
    finally:
        if bar is not None:
            bar.close()
        trainer.close()
    elapsed = time.perf_counter() - started
    ratio = trainer.router_grad_ratio(batch) if batch is not None else None
    checked = replicas.seconds + recompute.seconds
    return {"history": history, "timings": timings, "seconds": elapsed, "tokens": len(history) * rows * seq_len,
            "router_grad_ratio": ratio, "rank": rt.rank, "sdc_check_seconds": checked}


def _progress(rt: Any, done: int, total: int) -> Any:
    """tqdm's bar on rank 0 (none elsewhere)."""
    if rt.rank != 0:
        return None
    import threading

    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())  # not tqdm's default multiprocessing lock: nothing left to clean up at exit
    return tqdm(total=total, initial=done, desc="moeport train", unit="step", dynamic_ncols=True)


def run(args: argparse.Namespace) -> int:
    """`moeport train`: check the arguments, train on the ranks, print the losses (and one JSON line)."""
    from moeport.jobs import run_on_ranks
    from moeport.profile import load_profile, model_config_of
    from moeport.train_profile import init_std_multipliers, rows_per_step, train_settings

    if args.steps < 1:
        raise UserError(f"--steps: expected a positive integer, got {args.steps}")
    if args.save_every < 0:
        raise UserError(f"--save-every: expected 0 or more, got {args.save_every}")
    if args.resume and not args.checkpoint_dir:
        raise UserError("--resume: needs --checkpoint-dir, where the checkpoints are")
    if args.resume and args.init:
        raise UserError("--init and --resume: give one (--resume continues a run, --init starts one from weights)")
    profile = load_profile(args.profile, args.world_size)
    checks = sdc_checks(args, profile.world_size)
    config = _init_config(args.init) if args.init else model_config_of(profile)[0]
    settings = train_settings(profile, config)
    init_std = init_std_multipliers(profile, config) if not args.init else None
    seq_len, rows = profile.train.seq_len, rows_per_step(profile)
    resume_from = last_checkpoint(args.checkpoint_dir) if args.resume else None
    if args.resume and resume_from is None:
        raise UserError(f"--resume: no complete checkpoint in {args.checkpoint_dir}")
    results = run_on_ranks(train_job, (settings, args.steps, args.data, seq_len, rows, args.checkpoint_dir,
                                       args.save_every, resume_from, checks, args.init, init_std), profile,
                           args.world_size)
    if not results:
        return 0
    return report(profile, settings, results, args.json)


def _init_config(path: str) -> Any:
    """The model config of the checkpoint --init names (a UserError unless it is a checkpoint directory)."""
    from moeport.model.config import LongcatConfig

    if not os.path.isfile(os.path.join(path, "config.json")):
        last = last_checkpoint(path)
        hint = f"; pass one of its step folders, such as {last}" if last else ""
        raise UserError(f"--init {path}: not a checkpoint directory (no config.json){hint}")
    return LongcatConfig.from_file(path)


def sdc_checks(args: argparse.Namespace, world_size: int) -> SdcChecks:
    """The SDC options checked: intervals of 0 or more; --inject-sdc as RANK:STEP with a rank of the run and a step
    from 1 to --steps. A UserError (one line) otherwise."""
    for option, value in (("--check-replicas", args.check_replicas), ("--check-recompute", args.check_recompute)):
        if value < 0:
            raise UserError(f"{option}: expected 0 (off) or a number of steps, got {value}")
    inject = None
    if args.inject_sdc is not None:
        match = INJECTION.match(args.inject_sdc.strip())
        if match is None:
            raise UserError(f"--inject-sdc: expected RANK:STEP (two integers, such as 1:10), got {args.inject_sdc!r}")
        inject = (int(match.group(1)), int(match.group(2)))
        if inject[0] >= world_size:
            raise UserError(f"--inject-sdc: rank {inject[0]} is not a rank of this run (ranks 0 to {world_size - 1})")
        if not 1 <= inject[1] <= args.steps:
            raise UserError(f"--inject-sdc: step {inject[1]} is outside this run (steps 1 to {args.steps})")
    return SdcChecks(args.check_replicas, args.check_recompute, inject)


def report(profile: Any, settings: Any, results: list[dict[str, Any]], as_json: bool) -> int:
    """Print the run's losses and figures (rank 0's history: every rank's is the same)."""
    history = results[0]["history"]
    if not history:
        print("moeport train: nothing to do (the checkpoint is already at --steps)")
        return 0
    seconds = max(r["seconds"] for r in results)
    last = history[-1]
    figures = {
        "loss_first": history[0]["loss"], "loss_last": last["loss"], "steps": last["step"] + 1,
        "tokens_per_s": results[0]["tokens"] / seconds if seconds > 0 else 0.0,
        "ffn_experts_per_token": last["ffn_experts_per_token"],
        "ffn_experts_per_token_target": settings.ffn_experts_per_token,
        "zero_expert_fraction": last["zero_expert_share"], "router_grad_ratio": results[0]["router_grad_ratio"],
        "world_size": profile.world_size, "backend": profile.backend,
        "sdc_check_overhead": min(_overhead(r) for r in results),
        "moe_comm_exposed_share": _exposed_share(results, "moe_comm_exposed_seconds"),
        "grad_sync_exposed_share": _exposed_share(results, "grad_sync_exposed_seconds"),
    }
    print(f"moeport train: steps {history[0]['step'] + 1}-{last['step'] + 1}, loss {figures['loss_first']:.4f} -> "
          f"{figures['loss_last']:.4f}, {figures['tokens_per_s']:.0f} tokens/s, FFN experts per token "
          f"{last['ffn_experts_per_token']:.2f} (target {settings.ffn_experts_per_token:g}), zero-expert share "
          f"{last['zero_expert_share']:.1%}, router gradient ratio {figures['router_grad_ratio']:.3f}, exposed "
          f"communication {figures['moe_comm_exposed_share']:.1%} MoE exchanges and "
          f"{figures['grad_sync_exposed_share']:.1%} gradient sums of step time, SDC checks "
          f"{figures['sdc_check_overhead']:.2%} of training time")
    if as_json:
        print(json.dumps(figures))
    return 0


def _exposed_share(results: list[dict[str, Any]], key: str) -> float:
    """The share of step time the compute waited for one kind of communication (`key`, a StepStats field):
    each rank's exposed seconds over its step seconds, all its steps together, averaged over the ranks."""
    shares = []
    for r in results:
        seconds = sum(step["seconds"] for step in r["timings"])
        shares.append(sum(step[key] for step in r["timings"]) / seconds if seconds > 0 else 0.0)
    return sum(shares) / len(shares)


def _overhead(result: dict[str, Any]) -> float:
    """One rank's SDC checks' time over its training time without them (checksums recorded each step included).

    The report takes the least over the ranks: a rank's time in a comparison includes waiting for a slower rank,
    time the run would otherwise have spent waiting in the next step's first collective.
    """
    checked = result.get("sdc_check_seconds", 0.0)
    training = result["seconds"] - checked
    return checked / training if training > 0 else 0.0
