"""Random initialisation that every rank agrees on, whatever the expert-parallel layout.

Every weight matrix (attention, dense FFNs, the router's classifier, the FFN experts, the
embedding and lm_head) is drawn from normal(0, config.initializer_range); the norms' weights
are 1 and the routers' expert biases 0. `std_multipliers` scale the std group by group
(moeport.model.training.PARAMETER_GROUPS), as a width transfer asks (model/transfer.py).

Each tensor draws from its own generator, seeded by the run's seed and the tensor's
checkpoint name (each expert by its global id), so a rank creates exactly its own
experts and the same shared weights as every other rank, and a model split over N
ranks holds the same weights as one built in a single process. A multiplier scales the
draw, not the seed: the same seed gives the same directions at every scale.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping

import torch

from moeport.model.lm import LongcatForCausalLM
from moeport.model.training import group_multipliers, parameter_group


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


def _normal(shape: tuple[int, ...], std: float, seed: int, name: str) -> torch.Tensor:
    return torch.randn(shape, generator=_generator(seed, name)) * std


@torch.no_grad()
def init_weights(model: LongcatForCausalLM, seed: int = 0,
                 std_multipliers: Mapping[str, float] | None = None) -> LongcatForCausalLM:
    """Fill `model` (on the CPU, before `place`): normal(0, initializer_range x its group's multiplier) weights,
    unit norms, zero router biases. `std_multipliers` maps PARAMETER_GROUPS names to multipliers (default 1);
    call it once when training from scratch, with the multipliers of a width transfer if the profile asks."""
    std = {group: model.config.initializer_range * multiplier
           for group, multiplier in group_multipliers(std_multipliers, "std_multipliers").items()}
    for name, tensor in model.state_dict().items():  # checkpoint names; the tensors share the parameters' storage
        if ".mlp.experts." in name:
            continue
        if name.endswith("norm.weight") or "layernorm" in name:
            tensor.fill_(1.0)
        else:
            tensor.copy_(_normal(tuple(tensor.shape), std[parameter_group(name)], seed, name))
    for index, layer in enumerate(model.model.layers):
        layer.mlp.router.e_score_correction_bias.zero_()
        experts = layer.mlp.experts
        for local, expert in enumerate(experts.global_ids):
            prefix = f"model.layers.{index}.mlp.experts.{expert}"
            experts.gate_up[local].copy_(_normal(tuple(experts.gate_up.shape[1:]), std["experts"], seed,
                                                 f"{prefix}.gate_up"))
            experts.down[local].copy_(_normal(tuple(experts.down.shape[1:]), std["experts"], seed, f"{prefix}.down"))
    return model
