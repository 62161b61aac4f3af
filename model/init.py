"""Random initialisation that every rank agrees on, whatever the expert-parallel layout.

Each tensor draws from its own generator, seeded by the run's seed and the tensor's
checkpoint name (each expert by its global id), so a rank creates exactly its own
experts and the same shared weights as every other rank, and a model split over N
ranks holds the same weights as one built in a single process.
"""

from __future__ import annotations

import zlib

import torch

from moeport.model.lm import LongcatForCausalLM


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


def _normal(shape: tuple[int, ...], std: float, seed: int, name: str) -> torch.Tensor:
    return torch.randn(shape, generator=_generator(seed, name)) * std


@torch.no_grad()
def init_weights(model: LongcatForCausalLM, seed: int = 0) -> LongcatForCausalLM:
    """Fill `model` (on the CPU, before `place`): normal(0, initializer_range) weights, unit norms, zero biases."""
    std = model.config.initializer_range
    for name, tensor in model.state_dict().items():  # checkpoint names; the tensors share the parameters' storage
        if ".mlp.experts." in name:
            continue
        if name.endswith("norm.weight") or "layernorm" in name:
            tensor.fill_(1.0)
        else:
            tensor.copy_(_normal(tuple(tensor.shape), std, seed, name))
    for index, layer in enumerate(model.model.layers):
        layer.mlp.router.e_score_correction_bias.zero_()
        experts = layer.mlp.experts
        for local, expert in enumerate(experts.global_ids):
            prefix = f"model.layers.{index}.mlp.experts.{expert}"
            experts.gate_up[local].copy_(_normal(tuple(experts.gate_up.shape[1:]), std, seed, f"{prefix}.gate_up"))
            experts.down[local].copy_(_normal(tuple(experts.down.shape[1:]), std, seed, f"{prefix}.down"))
    return model
