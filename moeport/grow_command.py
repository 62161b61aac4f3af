"""`moeport grow`: a deeper checkpoint from a trained one, its whole layer stack stacked `--factor` times.

Reads a Hugging Face checkpoint directory (as `moeport train` and transformers'
`save_pretrained` write them; sharded or not), grows it with moeport.model.growth (new
layer i is old layer i mod L, routers' expert biases and every FFN expert included) and
writes the grown model to `--out` in the same format, which `load_pretrained`,
transformers' LongcatFlashForCausalLM and `moeport train --init` read. The weights are
written in the dtype they were stored in (the router's classifier in float32, as always);
generation_config.json and the tokenizer's
files are copied. `--out` appears whole or not at all: the directory is written beside
it under a temporary name and renamed onto it once complete.
"""

from __future__ import annotations

import argparse
import os
import shutil
from typing import Any

from moeport.base.atomic import atomic_folder
from moeport.base.errors import UserError, WriteError

#: Files besides the weights and config.json that a grown checkpoint keeps as they were.
CARRIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                 "special_tokens_map.json", "chat_template.jinja")


def add_parser(sub: Any) -> None:
    """The `grow` subcommand on the CLI's subparsers; its handler is `run`."""
    p = sub.add_parser("grow", help="a deeper checkpoint: the trained layer stack stacked --factor times")
    p.add_argument("--checkpoint", required=True, metavar="IN", help="HF checkpoint directory to grow")
    p.add_argument("--out", required=True, metavar="OUT", help="directory for the grown checkpoint (new or empty)")
    p.add_argument("--factor", type=_factor, default=2, metavar="N",
                   help="stack the layers N times: N x as deep (default 2)")
    p.set_defaults(func=run)


def _factor(text: str) -> int:
    """--factor's value: an integer of at least 1, else argparse's one-line error."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer of at least 1, got {text!r}")
    return value


def check_source(path: str) -> None:
    """A UserError unless `path` is a checkpoint directory (a training folder is named as such)."""
    if not os.path.isdir(path):
        raise UserError(f"--checkpoint {path}: no such directory")
    if os.path.isfile(os.path.join(path, "config.json")):
        return
    from moeport.train_job import last_checkpoint

    last = last_checkpoint(path)
    if last is not None:
        raise UserError(f"--checkpoint {path}: a training folder, not a checkpoint; pass one of its step folders, "
                        f"such as {last}")
    raise UserError(f"--checkpoint {path}: not a checkpoint directory (no config.json)")


def check_destination(path: str) -> None:
    """A UserError if `path` exists and is not an empty directory."""
    if not os.path.lexists(path):
        return
    if not os.path.isdir(path) or os.path.islink(path):
        raise UserError(f"--out {path}: exists and is not a directory; expected a new or empty directory")
    if os.listdir(path):
        raise UserError(f"--out {path}: exists and is not empty; expected a new or empty directory")


def _carry_files(source: str, folder: str) -> list[str]:
    """Copy CARRIED_FILES that `source` has into `folder`; returns their names."""
    carried = []
    for name in CARRIED_FILES:
        if os.path.isfile(os.path.join(source, name)):
            try:
                shutil.copyfile(os.path.join(source, name), os.path.join(folder, name))
            except OSError as exc:
                raise WriteError(os.path.join(folder, name), exc.strerror or str(exc), exc.errno) from exc
            carried.append(name)
    return carried


def run(args: argparse.Namespace) -> int:
    """`moeport grow`: check the arguments, grow the checkpoint, write it to --out, print one line."""
    from moeport.model import load_pretrained, parameter_counts, save_pretrained
    from moeport.model.checkpoint import stored_dtype
    from moeport.model.growth import grow_model

    factor = args.factor  # an integer of at least 1: the parser's `_factor` checked it
    check_source(args.checkpoint)
    check_destination(args.out)
    model = load_pretrained(args.checkpoint, dtype=stored_dtype(args.checkpoint))  # written back as it was stored
    layers = model.config.num_layers
    grown = grow_model(model, factor)
    del model
    with atomic_folder(args.out) as folder:
        save_pretrained(grown, folder, zero_expert_slots=True)
        _carry_files(args.checkpoint, folder)
    total = parameter_counts(grown.config)["total"]
    times = "once" if factor == 1 else f"{factor} times"
    print(f"moeport grow: wrote {args.out}: {grown.config.num_layers} layers, layers 0..{layers - 1} of "
          f"{args.checkpoint} stacked {times}, {total / 1e6:.2f}M parameters")
    return 0
