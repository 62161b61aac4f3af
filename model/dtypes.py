"""Casting on the hot path."""

from __future__ import annotations

import torch


def in_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` in `dtype`: `t` itself when it already is (even a cast to the same dtype costs a call, and
    the decoding step makes many small ones)."""
    return t if t.dtype == dtype else t.to(dtype)
