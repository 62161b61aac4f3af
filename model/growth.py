"""Model growth: a deeper model made from a trained one by stacking its whole layer stack.

The LongCat-Flash report trained a half-depth model (14 layers) and grew it into the
28-layer model by "stacking it twice", keeping the training state, then continued
training: the loss rose briefly and ended below that of a model trained from random
initialisation. This module builds that construction. For `factor` f and a model of L
layers, the grown model has f * L layers and

    new layer i  =  old layer i mod L          (layers 0..L-1, then 0..L-1 again, ...)

each a complete copy of the old layer: both attention sublayers, both dense FFNs, the
four norms, the router (its classifier and its `e_score_correction_bias`, the
compute-budget controller's state, so the controller resumes where it stood) and every
FFN expert. The embedding, the final norm and lm_head are unchanged (tied or not, as
before). Its first forward is the old stack run f times over: embedding, layers
0..L-1, layers 0..L-1 again, ..., final norm, lm_head.

Why the whole stack and not each layer repeated in place (0, 0, 1, 1, ...): the report
says only that it stacked the model twice, which is this construction; and it keeps the
trained order: within each copy, layer i + 1 reads what layer i writes, as in training,
and only at the f - 1 seams does layer 0 read the last layer's output in place of the
embedding. Repeating each layer in place puts a seam at every one of the L layers: each
layer's second copy reads its own output, an input it never saw in training.

The optimizer state (`trainer-rank{R}.pt` beside a training checkpoint) is not grown: its
layout follows the expert-parallel split it was written with; training from the grown
weights starts a new optimizer.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import torch

from moeport.model.config import LongcatConfig
from moeport.model.lm import LongcatForCausalLM

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def grown_config(config: LongcatConfig, factor: int = 2) -> LongcatConfig:
    """`config` with `factor` times its layers (config.json's num_layers; num_hidden_layers, counting each
    layer's two attention sublayers, follows when it is written)."""
    _check_factor(factor)
    return dataclasses.replace(config, num_layers=factor * config.num_layers)


def source_layer(index: int, num_layers: int) -> int:
    """The old layer that layer `index` of a model grown from `num_layers` layers copies: index mod num_layers."""
    return index % num_layers


def grow_tensors(
    tensors: Mapping[str, torch.Tensor], config: LongcatConfig, factor: int = 2
) -> tuple[dict[str, torch.Tensor], LongcatConfig]:
    """The grown state dict and config: `factor` x the layers, new layer i holding old layer i mod L's tensors.

    `tensors` are a checkpoint's (or a model's state dict), named as in the Hugging Face
    checkpoint (`model.layers.N.<rest>`, `model.embed_tokens.weight`, `model.norm.weight`,
    `lm_head.weight`, ...); `config` is its config. Every tensor under `model.layers.N.`
    is carried to each of the new layers N, N + L, N + 2L, ... under the same <rest>,
    whatever it is (router bias, FFN experts in the per-expert or the stacked layout,
    zero-expert slots); every other tensor is carried unchanged. The grown dict holds
    the given tensors, not copies (new layers i and i + L share one tensor object):
    clone them before changing one in place. Returns (grown tensors, grown config).
    A factor below 1, or tensors naming a layer the config does not have, or leaving
    one out, is a ValueError.
    """
    new_config = grown_config(config, factor)
    layers = config.num_layers
    per_layer: dict[int, list[tuple[str, torch.Tensor]]] = {index: [] for index in range(layers)}
    grown: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        match = _LAYER.match(name)
        if match is None:
            grown[name] = tensor
            continue
        index = int(match.group(1))
        if index >= layers:
            raise ValueError(f"tensor {name}: layer {index}, but the config has {layers} layers")
        per_layer[index].append((match.group(2), tensor))
    empty = [index for index, held in per_layer.items() if not held]
    if empty:
        raise ValueError(f"no tensors for layer {empty[0]} of the {layers} the config has")
    for index in range(new_config.num_layers):
        for rest, tensor in per_layer[source_layer(index, layers)]:
            grown[f"model.layers.{index}.{rest}"] = tensor
    return grown, new_config


def grow_model(model: LongcatForCausalLM, factor: int = 2) -> LongcatForCausalLM:
    """A new model `factor` x as deep as `model` (one process holding every expert), built by `grow_tensors`.

    For a model built without a Runtime, as `load_pretrained(path)` gives it: the new one
    is on the CPU in the old one's dtype (its routers in float32, as always), has the old
    one's generation defaults, is in eval mode, and holds its own copies of the weights.
    """
    if len(model.experts_here) != model.config.n_routed_experts:
        raise ValueError(f"this rank holds {len(model.experts_here)} of the {model.config.n_routed_experts} FFN "
                         "experts; grow a model that holds them all (load_pretrained without a runtime)")
    tensors, config = grow_tensors(model.state_dict(), model.config, factor)
    grown = LongcatForCausalLM(config)
    grown.load_state_dict(tensors, strict=True)
    if config.tie_word_embeddings:
        grown.lm_head.weight = grown.model.embed_tokens.weight
    grown.place("cpu", model.model.embed_tokens.weight.dtype)
    grown.generation_defaults = model.generation_defaults
    return grown.eval()


def _check_factor(factor: int) -> None:
    """A ValueError unless `factor` is an integer of at least 1."""
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor: expected an integer of at least 1, got {factor!r}")
