"""The `moeport` command line.

Exit codes for every command: 0 success, 1 a run failed, 2 the user's input
was wrong (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

import torch

import moeport
from moeport.errors import UserError
from moeport.launch import RankFailure

# Commands whose names are reserved for the issues that bring them.
RESERVED = {
    "run": "the main job (prefill + decode on N ranks)",
    "forward": "logits for token ids from a checkpoint",
    "generate": "greedy or sampled decoding from a checkpoint",
    "conformance": "the vendor conformance suite",
    "train": "training steps",
    "export-onnx": "ONNX export",
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
    for name, text in RESERVED.items():
        p = sub.add_parser(name, help=f"{text} (not yet available)")
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=_reserved)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one moeport command; returns its exit code."""
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except UserError as exc:
        print(f"moeport: error: {exc}", file=sys.stderr)
        return 2
    except RankFailure as failure:
        print(f"moeport: error: {failure}", file=sys.stderr)
        return 2 if failure.user_error else 1
    except KeyboardInterrupt:
        print("moeport: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
