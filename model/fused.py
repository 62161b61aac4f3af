"""Weights stored side by side for one matmul, saved and loaded under the checkpoint's own names.

The checkpoint keeps, say, a dense FFN's gate_proj and up_proj as two tensors; the model
holds them as one parameter [gate rows + up rows, in] so that one matmul computes both
(while decoding, each extra matmul of a small input costs about as much as the
arithmetic). `save_as_parts` makes the module's state dict show and accept the parts
under their checkpoint names, as views into the one parameter.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def fused_linear_weight(in_features: int, out_features: list[int]) -> nn.Parameter:
    """One [sum(out_features), in_features] weight, initialised as nn.Linear initialises each part."""
    weight = nn.Parameter(torch.empty(sum(out_features), in_features))
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # each part has the same fan-in, hence the same bound
    return weight


def save_as_parts(module: nn.Module, attr: str, parts: list[tuple[str, int]]) -> None:
    """In `module`'s state dict, replace the parameter `attr` by its consecutive row blocks
    `parts` ((checkpoint name relative to the module, rows), in order), and accept them back."""
    bounds, start = [], 0
    for name, rows in parts:
        bounds.append((name, start, start + rows))
        start += rows

    def split(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
        weight = state_dict.pop(prefix + attr)
        for name, begin, end in bounds:
            state_dict[prefix + name] = weight[begin:end]

    def join(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
        names = [prefix + name for name, _, _ in bounds]
        if all(name in state_dict for name in names):
            state_dict[prefix + attr] = torch.cat([state_dict.pop(name) for name in names])

    module.register_state_dict_post_hook(split)
    module.register_load_state_dict_pre_hook(join)
