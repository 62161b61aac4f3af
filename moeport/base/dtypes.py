"""The dtypes moeport knows by name, and casting on the hot path.

The one home of these names: a profile's `dtype:` takes one of MODEL_DTYPES, a backend
claims some of DEVICE_DTYPES in its capabilities, and the conformance suite checks the
collectives in each of those it claims.
"""

from __future__ import annotations

import torch

#: The dtypes a model runs in (a profile's `dtype:`), by name.
MODEL_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

#: The floating dtypes a device may claim: the model's, and the 8-bit float some devices have.
DEVICE_DTYPES: tuple[str, ...] = (*MODEL_DTYPES, "float8_e4m3fn")


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a name from MODEL_DTYPES (KeyError for any other name)."""
    return MODEL_DTYPES[name]


def in_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` in `dtype`: `t` itself when it already is (even a cast to the same dtype costs a call, and
    the decoding step makes many small ones)."""
    return t if t.dtype == dtype else t.to(dtype)
