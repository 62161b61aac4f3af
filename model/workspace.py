"""Scratch buffers that inference reuses from call to call.

A large temporary tensor freshly allocated on every call costs, on some devices,
more than the arithmetic that fills it (on CPU each one is new memory from the
operating system, touched page by page). Kernels that take an output buffer write
into a Workspace's instead; it grows to the largest size asked for and is shared
by every layer of a model, so it holds the peak of one layer, not the sum.
"""

from __future__ import annotations

import torch

from moeport.base.buffers import cannot_write_here


class Workspace:
    """Named flat buffers for inference (no autograd: a reused buffer would corrupt saved activations).

    `take(name, shape, like)` returns a tensor of `shape` with `like`'s dtype and
    device, backed by the buffer `name`. Its contents are undefined, and it is only
    valid until the next `take` of the same name.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A tensor of `shape` (dtype and device of `like`) to write into; see the class docstring."""
        numel = 1
        for size in shape:
            numel *= size
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < numel or buffer.dtype != like.dtype or buffer.device != like.device \
                or cannot_write_here(buffer):
            buffer = self._buffers[name] = like.new_empty(max(numel, 0 if buffer is None else buffer.numel()))
        return buffer[:numel].view(shape)
