"""Hyperparameter transfer by width: a narrow proxy's tuned learning rates and init scales, mapped to a wider model.

The rule (standard parameterisation, width ratio s = wide hidden_size / proxy hidden_size):
the embedding's init variance and learning rate stay as tuned on the proxy; every hidden
matrix's and the unembedding's init variance and learning rate are divided by s. In
multipliers: learning rate times 1/s, init std times 1/sqrt(s) (the std is the square root
of the variance).

Which parameter groups (moeport.model.training.PARAMETER_GROUPS) follow which part:

- embedding: unchanged (a lookup: each row is read alone, no sum over the width);
- unembedding, router, experts, hidden: divided by s. The router's classifier and the FFN
  experts are matrices whose fan-in is the width, like every other hidden matrix;
- norm: unchanged. The norms' weights are vectors (one gain per channel, no sum over the
  width) initialised to 1, not drawn: no variance to divide, and a gain's Adam update does
  not grow with the width, so its learning rate, like the embedding's, needs no correction.

The proxy's own per-group multipliers (what was tuned on it) are composed with the rule's:
wide multiplier = proxy multiplier x rule factor, group by group.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

from moeport.model.training import PARAMETER_GROUPS, group_multipliers

# The width-scaling rule: LongCat-Flash Technical Report (Meituan LongCat Team, arXiv 2509.01322), its
# hyperparameter transfer section. They tuned a width-768 proxy and transferred with s = 8 (to 6144).
#: Groups whose init variance and learning rate are divided by the width ratio s.
WIDTH_SCALED_GROUPS = ("unembedding", "router", "experts", "hidden")
#: Groups the rule leaves as tuned on the proxy (see the module docstring for the norms).
WIDTH_FREE_GROUPS = ("embedding", "norm")


@dataclasses.dataclass(frozen=True)
class WidthTransfer:
    """The wide model's per-group multipliers (every PARAMETER_GROUPS name): learning rate and init std."""

    width_ratio: float
    lr_multipliers: dict[str, float]
    init_std_multipliers: dict[str, float]


def width_factors(width_ratio: float) -> tuple[dict[str, float], dict[str, float]]:
    """The rule alone for a width ratio s: (learning-rate factors, init-std factors) per parameter group."""
    if not width_ratio > 0:
        raise ValueError(f"the width ratio must be positive, got {width_ratio}")
    lr = {group: 1.0 / width_ratio if group in WIDTH_SCALED_GROUPS else 1.0 for group in PARAMETER_GROUPS}
    std = {group: 1.0 / math.sqrt(width_ratio) if group in WIDTH_SCALED_GROUPS else 1.0 for group in PARAMETER_GROUPS}
    return lr, std


def width_transfer(proxy_hidden_size: int, hidden_size: int, proxy_lr_multipliers: Mapping[str, float] | None = None,
                   proxy_init_std_multipliers: Mapping[str, float] | None = None) -> WidthTransfer:
    """Map a proxy of width `proxy_hidden_size`, tuned with per-group multipliers (learning rate, init std; a
    missing group is 1), to a model of width `hidden_size`: each group's multiplier times the rule's factor.

    Use it when a proxy's learning rate and init were tuned and a wider model of the same shape is to be
    trained with them: the base learning rate and initializer_range stay the proxy's; only the multipliers
    change. A ValueError for a non-positive width or an unknown group.
    """
    if proxy_hidden_size <= 0 or hidden_size <= 0:
        raise ValueError(f"widths must be positive, got proxy {proxy_hidden_size} and model {hidden_size}")
    ratio = hidden_size / proxy_hidden_size
    lr_factor, std_factor = width_factors(ratio)
    lr = group_multipliers(proxy_lr_multipliers, "proxy learning-rate multipliers")
    std = group_multipliers(proxy_init_std_multipliers, "proxy init-std multipliers")
    return WidthTransfer(ratio, {g: lr[g] * lr_factor[g] for g in PARAMETER_GROUPS},
                         {g: std[g] * std_factor[g] for g in PARAMETER_GROUPS})


__all__ = ["WIDTH_FREE_GROUPS", "WIDTH_SCALED_GROUPS", "WidthTransfer", "width_factors", "width_transfer"]
