"""The `moeport plan` command: its arguments and what it does with them.

    moeport plan [--profile P] [--hardware NAME|FILE] [--model PRESET | --checkpoint DIR]
                 [--phase decode|prefill] [--set KEY=VALUE ...] [--json] [--plot FILE.png]
    moeport plan --calibrate --out FILE.yaml [--profile P] [--world-size N]
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import yaml
from pydantic import ValidationError

from moeport.base.errors import UserError, format_validation_error
from moeport.plan.architectures import Architecture, architecture, planner_models
from moeport.plan.hardware import (
    HardwareSpec,
    load_hardware,
    parse_hardware,
    shipped_hardware,
)
from moeport.plan.planner import PHASES, make_plan, plan_json
from moeport.plan.workload import PlanSection

#: Sizes of `--calibrate`'s measurements (matmul n, copy MB, repeats, tiny decoding steps).
CALIBRATION_SIZES = {"matmul_n": 1024, "memory_mb": 256, "repeats": 5, "op_steps": 32}


def add_parser(subparsers: Any) -> None:
    """Add `plan` to the moeport command line's subparsers."""
    p = subparsers.add_parser("plan", help="time per output token of an MoE model on any hardware, per schedule")
    p.add_argument("--profile", help="shipped profile name or path to a YAML file (default: cpu-gloo); its "
                   "hardware: and plan: sections, and its model unless --model / --checkpoint")
    p.add_argument("--world-size", type=int, help="ranks to calibrate on (overrides parallel.world_size)")
    p.add_argument("--hardware", metavar="NAME|FILE", help="a hardware file, or a shipped one: "
                   + ", ".join(shipped_hardware()))
    model = p.add_mutually_exclusive_group()
    model.add_argument("--model", metavar="PRESET", help="one of " + ", ".join(planner_models()))
    model.add_argument("--checkpoint", metavar="DIR", help="a LongCat-Flash checkpoint directory (its config.json)")
    p.add_argument("--phase", choices=PHASES, default="decode", help="a decoding step (default) or a prefill chunk")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one plan.* or hardware.* value, e.g. plan.batch_per_device=32")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", metavar="FILE.png", help="draw one layer under each schedule")
    p.add_argument("--calibrate", action="store_true", help="measure this machine on the profile's ranks and "
                   "write a hardware file (--out)")
    p.add_argument("--out", metavar="FILE.yaml", help="where --calibrate writes the hardware file")
    p.set_defaults(func=run_plan)


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """`--set` items as {"plan": {dotted key: value}, "hardware": {...}}, values read as YAML scalars."""
    out: dict[str, dict[str, Any]] = {"plan": {}, "hardware": {}}
    for item in items:
        key, sep, text = item.partition("=")
        section, dot, rest = key.partition(".")
        if not sep or not dot or not rest or section not in out:
            raise UserError(f"--set {item}: expected plan.KEY=VALUE or hardware.KEY=VALUE")
        try:
            out[section][rest] = yaml.safe_load(text) if text.strip() else text
        except yaml.YAMLError:
            out[section][rest] = text
    return out


def _with(data: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`data` with dotted-path `changes` applied (nested mappings made where missing)."""
    data = json.loads(json.dumps(data))
    for key, value in changes.items():
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.get(part)
            node = node.setdefault(part, {}) if not isinstance(child, dict) else child
        node[leaf] = value
    return data


def resolve_hardware(args: argparse.Namespace, profile: Any, changes: dict[str, Any]) -> HardwareSpec:
    """`--hardware`, else the profile's `hardware:`, with the `--set hardware.*` changes."""
    if args.hardware:
        hardware = load_hardware(args.hardware)
    elif profile.hardware is not None:
        hardware = profile.hardware
    else:
        raise UserError(f"{profile.source}: hardware: none given; give --hardware NAME|FILE (shipped: "
                        f"{', '.join(shipped_hardware())}) or a hardware: section in the profile")
    if not changes:
        return hardware
    return parse_hardware(_with(hardware.model_dump(), changes), "--set", prefix="hardware")


def resolve_section(profile: Any, changes: dict[str, Any]) -> PlanSection:
    """The profile's `plan:` section with the `--set plan.*` changes."""
    if not changes:
        return profile.plan
    try:
        return PlanSection.model_validate(_with(profile.plan.model_dump(), changes))
    except ValidationError as exc:
        raise UserError(format_validation_error("--set", exc.errors()[0], prefix="plan")) from None


def resolve_model(args: argparse.Namespace, profile: Any) -> Architecture:
    """`--model`, `--checkpoint`, else the profile's model."""
    if args.model or args.checkpoint:
        return architecture(args.model, os.path.abspath(args.checkpoint) if args.checkpoint else None)
    kind, value = profile.model_source()
    return architecture(checkpoint=value) if kind == "checkpoint" else architecture(value)


def _calibrate(args: argparse.Namespace, profile: Any) -> int:
    from moeport.base.atomic import write_text
    from moeport.plan.calibrate import calibrate, hardware_yaml

    if not args.out:
        raise UserError("--calibrate: give --out FILE.yaml, the hardware file to write")
    hardware, how = calibrate(profile, **CALIBRATION_SIZES)
    write_text(args.out, hardware_yaml(hardware, how))
    print(f"calibrated on {profile.world_size} rank(s) of {profile.source}: matmul "
          f"{hardware.matmul_tflops.float32 * 1e3:.1f} GFLOP/s float32, memory {hardware.memory_bandwidth_gbps:.2f} "
          f"GB/s, {hardware.op_overhead_us:.2f} us per operator, link {hardware.link_latency_us:g} us + "
          f"{hardware.link_bandwidth_gbps:g} GB/s; wrote {args.out}")
    return 0


def run_plan(args: argparse.Namespace) -> int:
    """The `moeport plan` command."""
    from moeport.profile import load_profile

    profile = load_profile(args.profile, args.world_size)
    if args.calibrate:
        return _calibrate(args, profile)
    if args.out:
        raise UserError("--out: only with --calibrate (the hardware file it writes)")
    changes = parse_overrides(args.overrides)
    hardware = resolve_hardware(args, profile, changes["hardware"])
    section = resolve_section(profile, changes["plan"])
    checked = {"ep", "ffn_experts_per_token"}  # checked against the model: name where they came from
    source = "--set" if checked & set(changes["plan"]) else profile.source
    plan = make_plan(resolve_model(args, profile), hardware, section, args.phase, source)
    if args.json:
        print(json.dumps(plan_json(plan)))
    else:
        from moeport.plan.report import format_plan

        print(format_plan(plan))
    if args.plot:
        from moeport.plan.plot import draw_plan

        draw_plan(plan, args.plot)
        if not args.json:
            print(f"wrote {args.plot}")
    return 0


__all__ = ["CALIBRATION_SIZES", "add_parser", "parse_overrides", "run_plan"]
