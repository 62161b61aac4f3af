"""The `moeport` command line.

Exit codes for every command: 0 success, 1 a run failed, 2 the user's input
was wrong (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

import torch

import moeport
from moeport import onnx_export, train_job
from moeport.base.dtypes import torch_dtype
from moeport.base.errors import UserError, WriteError
from moeport.launch import RankFailure
from moeport.model.schedule import SCHEDULES
from moeport.token_files import emit_sequences, read_prompts, read_tokens, save_npy, stop_ids_option

# Commands whose names are reserved for the work that brings them.
RESERVED = {
    "bench": "benchmarks",
}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{self.prog}: {message}")


def _add_profile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", help="shipped profile name or path to a YAML file (default: cpu-gloo)")
    p.add_argument("--world-size", type=int, help="number of ranks (overrides parallel.world_size)")


def _info(args: argparse.Namespace) -> int:
    from moeport.backends import registry
    from moeport.profile import load_profile, model_config_of
    from moeport.runtime import select_backend

    profile = load_profile(args.profile, args.world_size)
    config, model_desc = model_config_of(profile)
    selection = select_backend(profile)
    backend = selection.backend
    others: dict[str, str] = dict(selection.rejected)
    for name in registry.available_names():
        if name in others or name == backend.name:
            continue
        try:
            candidate = registry.instantiate(registry.resolve_class(name))
            reason = candidate.unavailable_reason()
        except UserError as exc:
            reason = str(exc)
        others[name] = reason or f"available, but not chosen ({selection.reason})"
    library = profile.collectives.library
    collectives = "mpi4py" if library == "mpi" else f"torch.distributed / {profile.collectives.backend or backend.collectives_label}"
    info: dict[str, Any] = {
        "moeport": moeport.__version__,
        "torch": torch.__version__,
        "profile": profile.source,
        **backend.describe(),
        "chosen_because": selection.reason,
        "not_chosen": others,
        "collectives": {"library": library, "name": collectives, "timeout_s": profile.collectives.timeout_s},
        "parallel": {"world_size": profile.world_size, "ep": profile.ep, "dp": profile.dp, "tp": 1},
        "dtype": profile.dtype,
        "schedule": profile.schedule,
        "model": model_desc,
        "experts": {"ffn": config.n_routed_experts, "zero": config.zero_expert_num, "top_k": config.moe_topk},
        "expert_kernels": (backend.offered_expert_kernels.in_use(backend.device(0), torch_dtype(profile.dtype))
                           if backend.is_available() else {}),
        "emulated_link": profile.emulated_link.model_dump() if profile.emulated_link else None,
    }
    if args.json:
        print(json.dumps(info))
        return 0
    rows = [
        ("moeport", f"{moeport.__version__} (torch {torch.__version__})"),
        ("profile", profile.source),
        ("backend", f"{backend.name} ({info['class']}): {selection.reason}"),
        ("device", f"{info['device']} ({info['device_count']} visible; {backend.visible_devices_env or 'no visibility variable'})"),
        ("collectives", f"{collectives}, timeout {profile.collectives.timeout_s:g} s"),
        ("parallel", f"world_size {profile.world_size}, ep {profile.ep}, dp {profile.dp}, tp 1"),
        ("dtype", profile.dtype),
        ("schedule", profile.schedule),
        ("model", f"{model_desc}: {config.n_routed_experts} FFN + {config.zero_expert_num} zero experts, top-{config.moe_topk}"),
    ]
    kernels = ", ".join(f"{kind} {name}" for kind, name in info["expert_kernels"].items() if name)
    rows.append(("expert kernels", kernels or "none: the experts run on torch's operators"))
    if profile.emulated_link is not None:
        link = profile.emulated_link
        rows.append(("emulated link", f"{link.latency_us:g} us latency, {link.bandwidth_gbps:g} GB/s"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print("capabilities:")
    caps = backend.capabilities.rows()
    cwidth = max(len(k) for k, _ in caps)
    for key, value in caps:
        print(f"  {key:<{cwidth}}  {value}")
    if others:
        print("other backends:")
        owidth = max(len(k) for k in others)
        for name, reason in others.items():
            print(f"  {name:<{owidth}}  {reason}")
    return 0


def _load(args: argparse.Namespace):
    from moeport.profile import load_profile, model_config_of

    profile = load_profile(args.profile, args.world_size)
    if getattr(args, "schedule", None):
        profile = profile.replace(schedule=args.schedule)
    if getattr(args, "checkpoint", None):
        if not os.path.isdir(args.checkpoint):
            raise UserError(f"--checkpoint {args.checkpoint}: no such directory")
        profile = profile.replace(model={"checkpoint": os.path.abspath(args.checkpoint)})
    config, _ = model_config_of(profile)
    return profile, config


def _ranks(profile) -> int:
    """How many ranks the job runs on: the launcher's under torchrun / mpiexec, else the profile's."""
    from moeport.jobs import launched_profile

    return launched_profile(profile).world_size


def _rows_per_rank(rows: int, world_size: int) -> int:
    """The most rows of a batch one rank takes under data-parallel attention."""
    return -(-rows // world_size)


def _rank0(results: list) -> Any:
    """Rank 0's result of `run_on_ranks`, or None in a process that holds no results (the other ranks of a
    torchrun / mpiexec job), which then prints and writes nothing."""
    return results[0] if results else None


def _forward(args: argparse.Namespace) -> int:
    from moeport.jobs import forward_job, run_on_ranks

    profile, config = _load(args)
    tokens = read_tokens(args.tokens, config.vocab_size)
    rows = _rows_per_rank(tokens.shape[0], _ranks(profile))
    profile.check_dispatch_room(rows, rows * tokens.shape[1], f"{rows} sequences of {tokens.shape[1]} per rank")
    logits = _rank0(run_on_ranks(forward_job, (tokens,), profile, args.world_size))
    if logits is not None:
        save_npy(args.out, logits)
        print(f"wrote logits {list(logits.shape)} float32 to {args.out}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from moeport.jobs import generate_job, my_rows, run_on_ranks
    from moeport.model.generation import GenerationDefaults, stop_and_pad

    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens: expected a positive integer, got {args.max_new_tokens}")
    if not args.temperature > 0:
        raise UserError(f"--temperature: expected a number above 0, got {args.temperature}")
    if args.top_k < 0:
        raise UserError(f"--top-k: expected 0 (every token) or a positive integer, got {args.top_k}")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p: expected a number above 0 and at most 1, got {args.top_p}")
    profile, config = _load(args)
    eos = stop_ids_option(args.eos_id, config.vocab_size)
    if args.pad_id is not None and not 0 <= args.pad_id < config.vocab_size:
        raise UserError(f"--pad-id {args.pad_id}: outside the vocabulary [0, {config.vocab_size})")
    checkpoint = profile.model_source()[1]
    stops, pad = stop_and_pad(GenerationDefaults.read(checkpoint), eos, args.pad_id)
    if not 0 <= pad < config.vocab_size:  # the checkpoint's own pad id: its generation_config.json or config.json
        raise UserError(f"{checkpoint}: pad_token_id {pad} is outside the vocabulary [0, {config.vocab_size}); "
                        f"give --pad-id")
    jsonl = args.tokens.endswith(".jsonl")
    prompts = read_prompts(args.tokens, config.vocab_size) if jsonl else read_tokens(args.tokens, config.vocab_size)
    if len(prompts) == 0 or len(prompts[0]) == 0:
        raise UserError(f"--tokens {args.tokens}: no prompt tokens (shape {list(prompts.shape)}); expected at least "
                        f"one prompt of at least one token id")
    world = _ranks(profile)  # a rank with no prompts of its own still serves its experts
    shares = [prompts[my_rows(len(prompts), r, world)] for r in range(world)]
    rows = max(len(share) for share in shares)
    real = max(sum(len(p) for p in share) for share in shares)
    profile.check_dispatch_room(rows, real, f"{rows} sequences, {real} prompt tokens per rank")
    sampling = {"do_sample": args.sample, "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed}
    results = run_on_ranks(generate_job, (prompts, args.max_new_tokens, sampling, stops, pad), profile, args.world_size)
    if not results:  # another rank of a torchrun / mpiexec job: rank 0 writes for the job
        return 0
    generated = [part for rank_parts in results for part in rank_parts]
    sequences = [[int(t) for t in prompt] + part for prompt, part in zip(prompts, generated)]
    emit_sequences(args.out, sequences, pad, as_lists=jsonl)
    return 0


def _run(args: argparse.Namespace) -> int:
    from moeport.jobs import launched_profile, run_job, run_on_ranks
    from moeport.report import print_run_report

    if args.iterations < 1:
        raise UserError(f"--iterations: expected a positive integer, got {args.iterations}")
    profile, config = _load(args)
    profile.check_dispatch_room(args.batch, args.batch * args.prompt_length,
                                f"--batch {args.batch}, --prompt-length {args.prompt_length}")
    results = run_on_ranks(run_job, (args.iterations, args.batch, args.prompt_length), profile, args.world_size)
    print_run_report(launched_profile(profile), results, as_json=args.json, trace_dir=args.trace)
    return 0


def _conformance(args: argparse.Namespace) -> int:
    from moeport.conformance import (
        failed,
        format_matrix,
        merge,
        report,
        run_suite,
        to_json,
    )
    from moeport.jobs import launched_profile, run_on_ranks
    from moeport.profile import load_profile

    profile = load_profile(args.profile, args.world_size)
    per_rank = run_on_ranks(run_suite, (), profile, args.world_size)
    if not per_rank:  # another rank of a torchrun / mpiexec job: rank 0 reports for the job
        return 0
    profile = launched_profile(profile)
    matrix = merge(per_rank)
    print(f"conformance: profile {profile.source}, {profile.world_size} ranks, backend {profile.backend}")
    print(format_matrix(matrix))
    if args.json:
        from moeport.base.atomic import write_text

        info = {"profile": profile.source, "world_size": profile.world_size, "backend": profile.backend,
                "collectives": profile.collectives.model_dump(), "ranks_reporting": len(per_rank)}
        write_text(args.json, to_json(report(info, matrix)))
        print(f"wrote {args.json}")
    if failed(matrix):
        print("conformance: FAILED", file=sys.stderr)
        return 1
    print("conformance: passed")
    return 0


def _reserved(args: argparse.Namespace) -> int:
    raise UserError(f"moeport {args.command}: not available in moeport {moeport.__version__} yet ({RESERVED[args.command]})")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every moeport command."""
    parser = _Parser(prog="moeport", description="LongCat-Flash MoE with the ScMoE overlap schedule on any accelerator.")
    parser.add_argument("--version", action="version", version=f"moeport {moeport.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    info = sub.add_parser("info", help="backend, device, collectives and capabilities for a profile")
    _add_profile_args(info)
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=_info)
    run = sub.add_parser("run", help="the main job: prefill and decode on N ranks, with timings")
    _add_profile_args(run)
    run.add_argument("--checkpoint", help="HF checkpoint directory (default: the profile's model)")
    run.add_argument("--iterations", type=int, default=16, help="decode steps (default 16)")
    run.add_argument("--batch", type=int, default=2, help="sequences per rank (default 2)")
    run.add_argument("--prompt-length", type=int, default=32, help="prompt tokens (default 32)")
    run.add_argument("--schedule", choices=SCHEDULES, help="override the profile's schedule")
    run.add_argument("--trace", metavar="DIR", help="write Chrome traces per rank and a timeline PNG to DIR")
    run.add_argument("--json", action="store_true", help="end with one JSON line of totals")
    run.set_defaults(func=_run)
    forward = sub.add_parser("forward", help="logits for token ids from a checkpoint")
    _add_profile_args(forward)
    forward.add_argument("--checkpoint", required=True)
    forward.add_argument("--tokens", required=True, help=".npy file of int64 token ids [B, T]")
    forward.add_argument("--out", required=True, help=".npy file for float32 logits [B, T, V]")
    forward.set_defaults(func=_forward)
    generate = sub.add_parser("generate", help="greedy (or sampled) decoding from a checkpoint")
    _add_profile_args(generate)
    generate.add_argument("--checkpoint", required=True)
    generate.add_argument("--tokens", required=True, help=".npy file of int64 token ids [B, T], or a .jsonl file "
                          "of prompts (one JSON list of ids a line)")
    generate.add_argument("--max-new-tokens", type=int, required=True)
    generate.add_argument("--eos-id", action="append", metavar="ID",
                          help="stop token id, repeat for more; none: never stop (default: the checkpoint's)")
    generate.add_argument("--pad-id", type=int, metavar="ID",
                          help="fill after a sequence's end (default: the checkpoint's, else the first stop id, else 0)")
    generate.add_argument("--out", help="OUT.npy: token ids [B, W] padded with the pad id, and OUT.lengths.npy; "
                          "OUT.jsonl: one JSON list a line (default: print them)")
    generate.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    generate.add_argument("--temperature", type=float, default=1.0)
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--seed", type=int, default=0)
    generate.set_defaults(func=_generate)
    conformance = sub.add_parser("conformance", help="check every backend and collective operation")
    _add_profile_args(conformance)
    conformance.add_argument("--json", metavar="PATH", help="write the matrix as JSON")
    conformance.set_defaults(func=_conformance)
    onnx_export.add_parser(sub)
    train_job.add_parser(sub)
    from moeport import grow_command  # `moeport grow`: its parser and handler live in moeport/grow_command.py

    grow_command.add_parser(sub)
    from moeport.plan import command as plan_command  # `moeport plan`: its parser and handler live in moeport/plan

    plan_command.add_parser(sub)
    for name, text in RESERVED.items():
        p = sub.add_parser(name, help=f"{text} (not yet available)")
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=_reserved)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one moeport command; returns its exit code (0 done, 1 the run or a write failed, 2 the input was wrong)."""
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except UserError as exc:
        print(f"moeport: error: {exc}", file=sys.stderr)
        return 2
    except WriteError as exc:
        print(f"moeport: error: {exc}", file=sys.stderr)
        return 1
    except RankFailure as failure:
        print(f"moeport: error: {failure}", file=sys.stderr)
        return 2 if failure.user_error else 1
    except KeyboardInterrupt:
        print("moeport: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
