"""`moeport train`: training steps on every rank, a progress bar, checkpoints, and an exact resume.

Every `--save-every` steps (and after the last) each rank writes into
`--checkpoint-dir/step-NNNNNN/` its share of the model in the Hugging Face format
(`load_pretrained` and transformers read it; the routers' expert biases carry the
compute-budget controller's state) and `trainer-rank{R}.pt` (its optimizer state and
the step count); rank 0 marks the folder complete after every rank has written. The data
position is the step number (moeport.train_data). `--resume` continues from the last
complete folder up to `--steps` in all, so the losses are those of an uninterrupted run.
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
    p.add_argument("--json", action="store_true", help="end with one JSON line of figures")
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


def train_job(rt: Any, settings: Any, steps: int, data: list[str] | None, seq_len: int, rows: int,
              checkpoint_dir: str | None, save_every: int, resume_from: str | None) -> dict[str, Any]:
    """On one rank: train to `steps` steps in all (from `resume_from` where given); returns the figures."""
    from moeport.jobs import build_model, my_rows
    from moeport.model import load_pretrained
    from moeport.model.training import Trainer
    from moeport.train_data import read_stream, step_batch

    model = load_pretrained(resume_from, rt) if resume_from else build_model(rt)
    trainer = Trainer(model, dataclasses.replace(settings, total_steps=steps))
    if resume_from:
        trainer.load_state_dict(torch.load(os.path.join(resume_from, f"trainer-rank{rt.rank}.pt"),
                                           weights_only=False))
    stream, _ = read_stream(data, model.config.vocab_size)
    mine = my_rows(rows, rt.rank, rt.world_size)
    bar = _progress(rt, trainer.steps_done, steps)
    history, started, batch = [], time.perf_counter(), None
    while trainer.steps_done < steps:
        batch = step_batch(stream, trainer.steps_done, rows, seq_len)[mine]
        stats = trainer.step(batch)
        history.append(dataclasses.asdict(stats))
        if bar is not None:  # each step: loss, tokens/s so far, FFN experts per token, zero-expert share
            rate = len(history) * rows * seq_len / max(time.perf_counter() - started, 1e-9)
            bar.set_postfix(loss=f"{stats.loss:.3f}", tokens_per_s=f"{rate:.0f}",
                            ffn_per_token=f"{stats.ffn_experts_per_token:.2f}", zero=f"{stats.zero_expert_share:.1%}")
            bar.update(1)
        if checkpoint_dir and (trainer.steps_done == steps or (save_every and trainer.steps_done % save_every == 0)):
            _save(rt, model, trainer, os.path.join(checkpoint_dir, f"step-{trainer.steps_done:06d}"))
    elapsed = time.perf_counter() - started
    if bar is not None:
        bar.close()
    ratio = trainer.router_grad_ratio(batch) if batch is not None else None
    return {"history": history, "seconds": elapsed, "tokens": len(history) * rows * seq_len,
            "router_grad_ratio": ratio, "rank": rt.rank}


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
    from moeport.train_profile import rows_per_step, train_settings

    if args.steps < 1:
        raise UserError(f"--steps: expected a positive integer, got {args.steps}")
    if args.save_every < 0:
        raise UserError(f"--save-every: expected 0 or more, got {args.save_every}")
    if args.resume and not args.checkpoint_dir:
        raise UserError("--resume: needs --checkpoint-dir, where the checkpoints are")
    profile = load_profile(args.profile, args.world_size)
    config, _ = model_config_of(profile)
    settings = train_settings(profile, config)
    seq_len, rows = profile.train.seq_len, rows_per_step(profile)
    resume_from = last_checkpoint(args.checkpoint_dir) if args.resume else None
    if args.resume and resume_from is None:
        raise UserError(f"--resume: no complete checkpoint in {args.checkpoint_dir}")
    results = run_on_ranks(train_job, (settings, args.steps, args.data, seq_len, rows, args.checkpoint_dir,
                                       args.save_every, resume_from), profile, args.world_size)
    if not results:
        return 0
    return report(profile, settings, results, args.json)


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
    }
    print(f"moeport train: steps {history[0]['step'] + 1}-{last['step'] + 1}, loss {figures['loss_first']:.4f} -> "
          f"{figures['loss_last']:.4f}, {figures['tokens_per_s']:.0f} tokens/s, FFN experts per token "
          f"{last['ffn_experts_per_token']:.2f} (target {settings.ffn_experts_per_token:g}), zero-expert share "
          f"{last['zero_expert_share']:.1%}, router gradient ratio {figures['router_grad_ratio']:.3f}")
    if as_json:
        print(json.dumps(figures))
    return 0
