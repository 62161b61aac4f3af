"""`moeport export-onnx`: the model, and each block kind, as ONNX graphs for vendor compilers, checked in onnxruntime.

The graphs are those of moeport.model.export (the FFN experts batched over every expert,
static shapes); torch's exporter (`torch.onnx.export(..., dynamo=True)`, onnxscript)
writes them with the batch and sequence (or token) dimensions dynamic. Verification runs
each file in onnxruntime's CPU provider on inputs of another batch and length than the
export's, against the eager model, and fails above a per-dtype bound.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import tempfile
from typing import Any, Callable

import torch

from moeport.base.errors import UserError, WriteError

#: The largest |ONNX - eager| a graph may show, per dtype (bfloat16: onnxruntime's CPU provider has no bfloat16
#: matmul, so those files are checked by onnx.checker only). float16 carries about 3 significant digits.
BOUNDS = {"float32": 1e-4, "float16": 5e-2}
#: Weights above this many bytes go to ONNX external data (a protobuf file holds at most 2 GiB).
EXTERNAL_DATA_BYTES = 1 << 30
#: Where the example inputs the exporter traces with and the verification inputs differ: (batch, length) each.
EXPORT_SHAPE, VERIFY_SHAPE = (2, 8), (3, 13)
BLOCKS = ("attention", "dense_ffn", "router", "experts", "scmoe_layer")


@dataclasses.dataclass
class Graph:
    """One graph to export: its module, example inputs, their dynamic dimensions, the verification inputs, and
    how to compare onnxruntime's outputs with the eager model's on them (returns the max |difference|)."""

    name: str
    module: torch.nn.Module
    example: tuple[torch.Tensor, ...]
    dynamic: dict[str, dict[int, Any]]
    verify_inputs: tuple[torch.Tensor, ...]
    difference: Callable[[list[Any]], float]


def require_onnx() -> tuple[Any, Any]:
    """(onnx, onnxruntime), or a UserError naming the extra to install."""
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  (torch's exporter needs it)
    except ImportError as exc:
        raise UserError(f"moeport export-onnx needs the onnx extra ({exc.name} is missing): "
                        "pip install 'moeport[onnx]'") from None
    return onnx, onnxruntime


def add_parser(sub: Any) -> None:
    """The `export-onnx` subcommand on the CLI's subparsers; its handler is `run`."""
    p = sub.add_parser("export-onnx", help="export the model (and each block) to ONNX, checked in onnxruntime")
    p.add_argument("--profile", default="cpu-gloo", help="profile whose model is exported by default")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="HF checkpoint directory to export")
    source.add_argument("--model", metavar="PRESET", help="a preset with seeded random weights")
    p.add_argument("--out", required=True, help="FILE.onnx for the whole model's prefill forward")
    p.add_argument("--blocks", metavar="DIR", help="also write each block kind's graph into DIR")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    p.add_argument("--no-verify", action="store_true", help="skip onnx.checker and onnxruntime")
    p.set_defaults(func=run)


def _model(args: argparse.Namespace) -> Any:
    """The model to export, in one process (every expert local), in --dtype, in eval mode."""
    from moeport.model import LongcatForCausalLM, load_pretrained
    from moeport.model.init import init_weights
    from moeport.profile import load_profile, model_config_of, preset

    profile = load_profile(args.profile)
    if args.checkpoint:
        if not os.path.isdir(args.checkpoint):
            raise UserError(f"--checkpoint {args.checkpoint}: no such directory")
        profile = profile.replace(model={"checkpoint": os.path.abspath(args.checkpoint)})
    elif args.model:
        preset(args.model, "--model")  # a UserError naming the presets, where it is none
        profile = profile.replace(model={"preset": args.model})
    kind, value = profile.model_source()
    if kind == "checkpoint":
        model = load_pretrained(value)
    else:
        model = init_weights(LongcatForCausalLM(model_config_of(profile)[0]), profile.seed)
    dtype = getattr(torch, args.dtype)
    return model.place("cpu", dtype).eval(), f"{kind} {value}"


def _nbytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _write(graph: Graph, path: str, opset: int) -> list[str]:
    """Export `graph` to `path` (and its external data beside it where the weights are large), written under a
    temporary folder and moved into place; returns the files written."""
    folder = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(folder):
        raise UserError(f"{path}: no such folder {folder}")
    staging = tempfile.mkdtemp(prefix=".moeport-onnx-", dir=folder)
    try:
        staged = os.path.join(staging, os.path.basename(path))
        with torch.no_grad(), warnings_quiet():
            torch.onnx.export(
                graph.module, graph.example, staged, dynamo=True, opset_version=opset,
                input_names=list(graph.module.INPUTS), output_names=list(graph.module.OUTPUTS),
                dynamic_shapes=graph.dynamic, external_data=_nbytes(graph.module) > EXTERNAL_DATA_BYTES,
                verbose=False,
            )
        written = []
        for name in sorted(os.listdir(staging)):
            os.replace(os.path.join(staging, name), os.path.join(folder, name))
            written.append(os.path.join(folder, name))
        return written
    except OSError as exc:
        raise WriteError(f"{path}: cannot write it ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def warnings_quiet() -> Any:
    """Silence the exporter's progress lines, warnings and log lines (the command prints its own)."""
    import contextlib
    import io
    import logging
    import warnings

    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    stack.callback(logger.setLevel, level)
    return stack


def _verify(graph: Graph, path: str, dtype: str) -> tuple[str, float | None]:
    """onnx.checker, then (float32 / float16) onnxruntime on the verification inputs: (what was checked, the max
    |difference| or None)."""
    onnx, ort = require_onnx()
    onnx.checker.check_model(path, full_check=True)
    if dtype not in BOUNDS:
        return "onnx.checker only (onnxruntime's CPU provider has no bfloat16 matmul)", None
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feeds = {name: t.numpy() if t.dtype != torch.bfloat16 else t for name, t in zip(graph.module.INPUTS,
                                                                                     graph.verify_inputs)}
    return f"onnxruntime at {describe(graph.verify_inputs)}", graph.difference(session.run(None, feeds))


def describe(inputs: tuple[torch.Tensor, ...]) -> str:
    """The shapes of some inputs, for the report."""
    return ", ".join(str(list(t.shape)) for t in inputs)


def run(args: argparse.Namespace) -> int:
    """`moeport export-onnx`: export, verify (unless --no-verify), print one line per graph; 1 if any is off."""
    from moeport.model.export import dense_experts
    from moeport.onnx_graphs import block_graphs, model_graph

    require_onnx()
    if args.opset < 18:
        raise UserError(f"--opset {args.opset}: torch's exporter writes opset 18 or later")
    if not args.out.endswith(".onnx"):
        raise UserError(f"--out {args.out}: expected a file name ending in .onnx")
    model, what = _model(args)
    if args.blocks:
        os.makedirs(args.blocks, exist_ok=True)
    jobs = [(model_graph(model), args.out)]
    if args.blocks:
        jobs += [(graph, os.path.join(args.blocks, f"{graph.name}.onnx")) for graph in block_graphs(model)]
    print(f"moeport export-onnx: {what}, {args.dtype}, opset {args.opset}")
    worst = 0.0
    with dense_experts(model):
        for graph, path in jobs:
            written = _write(graph, path, args.opset)
            line = f"  {graph.name:<12} {path} ({sum(os.path.getsize(f) for f in written) / 1e6:.1f} MB"
            line += f", {len(written)} files)" if len(written) > 1 else ")"
            if not args.no_verify:
                checked, difference = _verify(graph, path, args.dtype)
                line += f"; {checked}"
                if difference is not None:
                    line += f": max |difference| {difference:.2e}"
                    worst = max(worst, difference / BOUNDS[args.dtype])
            print(line)
    if args.no_verify:
        print("  not verified (--no-verify)")
        return 0
    if worst > 1.0:
        print(f"FAIL: a graph differs from the eager model by more than {BOUNDS[args.dtype]:g} ({args.dtype})")
        return 1
    return 0
