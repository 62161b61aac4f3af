"""Small random LongCat-Flash checkpoints written by the reference implementation (transformers)."""

from __future__ import annotations

import os
import shutil
from typing import Callable

import torch

from moeport.model.config import PRESETS, LongcatConfig


def reference_config(config: LongcatConfig):
    """transformers' LongcatFlashConfig for a moeport config."""
    from transformers import LongcatFlashConfig

    data = config.to_hf_dict()
    data["head_dim"] = config.qk_rope_head_dim
    for key in ("model_type", "architectures"):
        data.pop(key)
    return LongcatFlashConfig(**data)


def save_reference_checkpoint(path: str, config: LongcatConfig | None = None, seed: int = 0, std: float = 0.15) -> str:
    """Write a random checkpoint with transformers' save_pretrained; returns `path`.

    Weights are drawn wider than the usual init (and norms and the correction bias
    are randomised) so that logits are far from uniform and every tensor matters.
    """
    from transformers import LongcatFlashForCausalLM

    config = config or PRESETS["tiny"]
    torch.manual_seed(seed)
    model = LongcatFlashForCausalLM(reference_config(config))
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if "norm" in name:
                tensor.uniform_(0.5, 1.5)
            else:
                tensor.normal_(0.0, std)
        for layer in model.model.layers:
            layer.mlp.router.e_score_correction_bias.normal_(0.0, 0.05)
    model.save_pretrained(path)
    assert os.path.isfile(os.path.join(path, "model.safetensors"))
    return path


def load_reference(path: str):
    """The reference model for a checkpoint directory, in eval mode."""
    from transformers import LongcatFlashForCausalLM

    return LongcatFlashForCausalLM.from_pretrained(path).eval()


def edit_checkpoint(src: str, dst, edit: Callable[[dict], object]) -> str:
    """A copy of checkpoint `src` at `dst` whose tensors `edit` has changed (a dict of name -> tensor)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(os.path.join(dst, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    return str(dst)
