"""Token streams for `moeport train`, and the batch each rank takes at each step.

With no `--data`, the stream is byte-level tokens (ids 0..255) of the Python standard
library's own source files on this machine: nothing to download, nothing shipped, the
same bytes wherever the same Python runs. `--data` takes text files (their bytes, in the
order given) or .npy arrays of token ids. A step's global batch is `rows` windows of
seq_len + 1 tokens (inputs and, shifted by one, targets), laid end to end through the
stream from where the previous step stopped (wrapping around), so a step's batch depends
only on the step number: resuming needs no state beyond it.
"""

from __future__ import annotations

import glob
import os
import sysconfig

import numpy as np
import torch

from moeport.base.errors import UserError

#: Byte-level tokens: one id per byte value.
BYTE_VOCAB = 256


def stdlib_sources() -> list[str]:
    """The Python standard library's .py files on this machine, sorted (site-packages left out)."""
    root = sysconfig.get_paths()["stdlib"]
    files = glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
    return sorted(f for f in files if "site-packages" not in f.split(os.sep))


def read_stream(paths: list[str] | None, vocab_size: int) -> tuple[np.ndarray, str]:
    """The token stream (int64) and a line saying where it came from: `paths` (text files or .npy token ids), or
    the standard library's sources as bytes; a UserError where a file is missing or an id is outside the vocab."""
    if not paths:
        paths, what = stdlib_sources(), "bytes of the Python standard library's sources"
        if not paths:
            raise UserError("no --data given and no Python standard library sources found to train on")
    else:
        what = f"{len(paths)} file(s) given with --data"
    parts = []
    for path in paths:
        try:
            if path.endswith(".npy"):
                parts.append(np.asarray(np.load(path)).reshape(-1).astype(np.int64))
            else:
                with open(path, "rb") as f:
                    parts.append(np.frombuffer(f.read(), dtype=np.uint8).astype(np.int64))
        except FileNotFoundError:
            raise UserError(f"--data {path}: no such file") from None
        except (OSError, ValueError) as exc:
            raise UserError(f"--data {path}: cannot read it ({exc})") from None
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if stream.size and (stream.min() < 0 or stream.max() >= vocab_size):
        raise UserError(f"training data: token id {int(stream.max())} is outside the model's vocabulary "
                        f"[0, {vocab_size}) (byte-level text needs a vocabulary of at least {BYTE_VOCAB})")
    return stream, what


def step_batch(stream: np.ndarray, step: int, rows: int, seq_len: int) -> torch.Tensor:
    """The global batch of `step`: [rows, seq_len + 1] token ids, windows laid end to end from step 0's first."""
    window = seq_len + 1
    if stream.size < window:
        raise UserError(f"training data: {stream.size} tokens, fewer than one sequence of {window}")
    starts = (np.arange(rows, dtype=np.int64) + step * rows) * seq_len % (stream.size - window + 1)
    return torch.from_numpy(np.stack([stream[s: s + window] for s in starts]))
