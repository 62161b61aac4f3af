"""Rules for buffers kept and reused from call to call."""

from __future__ import annotations

import torch


def cannot_write_here(buffer: torch.Tensor) -> bool:
    """Whether `buffer` was made in torch's inference mode and we are outside it now, where writing
    it (or saving it for backward) is an error: a kept buffer in that state is replaced, not reused."""
    return buffer.is_inference() and not torch.is_inference_mode_enabled()
