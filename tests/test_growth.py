"""Model growth (`moeport grow`, moeport.model.growth): the stacking order, the grown model's forward against the
old layers run by hand, transformers reading the grown checkpoint, the command and its user mistakes."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from conftest import assert_user_error, run_cli
from moeport.cli import main
from moeport.model import PRESETS, LongcatForCausalLM, load_pretrained, save_pretrained
from moeport.model.checkpoint import checkpoint_tensors
from moeport.model.growth import grow_model, grow_tensors, grown_config, source_layer
from moeport.model.init import init_weights
from moeport.model.mla import rope_cos_sin

# The tiny preset, drawn wider than the usual init so that logits are far from uniform and every tensor matters.
CONFIG = dataclasses.replace(PRESETS["tiny"], initializer_range=0.1)


def token_ids(batch=2, length=9, seed=3):
    return torch.randint(0, CONFIG.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny 2-layer checkpoint (random weights, a distinct router bias per layer) and its model."""
    model = init_weights(LongcatForCausalLM(CONFIG), seed=7)
    with torch.no_grad():
        for index, layer in enumerate(model.model.layers):
            layer.mlp.router.e_score_correction_bias.copy_(torch.linspace(-0.1, 0.1, CONFIG.num_experts_total) + index)
    path = str(tmp_path_factory.mktemp("growth") / "source")
    save_pretrained(model, path, zero_expert_slots=True)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [5, 6], "pad_token_id": 0}, f)
    return path, load_pretrained(path)


@pytest.fixture(scope="module")
def grown(source, tmp_path_factory):
    """The source grown 2x by the command, in process; its directory."""
    out = str(tmp_path_factory.mktemp("growth") / "grown")
    assert main(["grow", "--checkpoint", source[0], "--out", out]) == 0
    return out


@pytest.mark.parametrize("factor", [1, 2, 3])
def test_new_layer_i_is_old_layer_i_mod_L_tensor_by_tensor(source, factor):
    model = source[1]
    tensors = checkpoint_tensors(model, zero_expert_slots=True)  # Hugging Face names, every expert, zero slots
    new, config = grow_tensors(tensors, model.config, factor)
    layers = model.config.num_layers
    assert config == dataclasses.replace(model.config, num_layers=factor * layers) == grown_config(model.config, factor)
    per_layer = [name for name in tensors if name.startswith("model.layers.0.")]
    outside = [name for name in tensors if not name.startswith("model.layers.")]
    assert "model.layers.0.mlp.router.e_score_correction_bias" in per_layer
    assert "model.layers.0.mlp.experts.7.down_proj.weight" in per_layer
    assert len(new) == len(outside) + factor * layers * len(per_layer)
    for name in outside:  # embedding, final norm, lm_head: unchanged
        assert torch.equal(new[name], tensors[name]), name
    for index in range(factor * layers):
        old = source_layer(index, layers)
        assert old == index % layers
        for name in per_layer:
            rest = name.removeprefix("model.layers.0.")
            assert torch.equal(new[f"model.layers.{index}.{rest}"], tensors[f"model.layers.{old}.{rest}"]), (index, rest)
    biases = [new[f"model.layers.{i}.mlp.router.e_score_correction_bias"][0].item() for i in range(factor * layers)]
    assert biases == pytest.approx([-0.1 + i % layers for i in range(factor * layers)])  # 0, 1, 0, 1, ...


def test_bad_factors_and_layers_are_refused(source):
    model = source[1]
    tensors = checkpoint_tensors(model)
    for factor in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="factor"):
            grow_tensors(tensors, model.config, factor)
    with pytest.raises(ValueError, match="layer 2"):
        grow_tensors({**tensors, "model.layers.2.mlps.0.up_proj.weight": torch.ones(1)}, model.config)
    with pytest.raises(ValueError, match="no tensors for layer 1"):
        grow_tensors({k: v for k, v in tensors.items() if not k.startswith("model.layers.1.")}, model.config)


def test_the_grown_forward_is_the_old_stack_run_twice_by_hand(source, grown):
    old, ids = source[1], token_ids()
    new = load_pretrained(grown)
    assert new.config.num_layers == 2 * old.config.num_layers
    with torch.no_grad():
        got = new(ids)
        x = old.model.embed_tokens(ids)
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        cos, sin = rope_cos_sin(old.rope_inv_freq, positions, x.dtype)
        for index in [0, 1, 0, 1]:
            x = old.model.layers[index](x, cos, sin, schedule=old.schedule)
        want = old.lm_head(old.model.norm(x))
        assert want.abs().max() > 1.0  # far from uniform: the comparison means something
        assert torch.equal(got, want)
        assert not torch.equal(got, old(ids))  # the grown model is not the old one


def test_transformers_reads_the_grown_checkpoint_alike(grown):
    pytest.importorskip("transformers")
    from reference import load_reference

    reference, ours, ids = load_reference(grown), load_pretrained(grown), token_ids()
    assert len(reference.model.layers) == 4
    with torch.no_grad():
        torch.testing.assert_close(reference(ids).logits, ours(ids), rtol=0, atol=1e-4)


def test_grow_model_keeps_dtype_defaults_and_its_own_weights(source):
    old = source[1]
    new = grow_model(old, 3)
    assert len(new.model.layers) == 6 and not new.training
    assert new.generation_defaults == old.generation_defaults and old.generation_defaults.eos_token_ids == (5, 6)
    bias = new.model.layers[4].mlp.router.e_score_correction_bias
    assert bias.dtype == torch.float32 and torch.equal(bias, old.model.layers[0].mlp.router.e_score_correction_bias)
    with torch.no_grad():
        new.model.layers[0].mlp.experts.down.add_(1.0)  # copies, not views: neither the old model nor the twin moves
    assert torch.equal(new.model.layers[2].mlp.experts.down, old.model.layers[0].mlp.experts.down)


def test_the_command_writes_the_grown_checkpoint(source, tmp_path):
    (tmp_path / "empty").mkdir()  # an existing empty directory is taken
    out = str(tmp_path / "empty")
    result = run_cli("grow", "--checkpoint", source[0], "--out", out, "--factor", "3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and out in lines[0] and "6 layers" in lines[0], result.stdout
    config = json.loads((tmp_path / "empty" / "config.json").read_text())
    assert config["num_layers"] == 6 and config["num_hidden_layers"] == 12
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]
    again = load_pretrained(out)
    assert len(again.model.layers) == 6 and again.generation_defaults.eos_token_ids == (5, 6)


def test_the_command_keeps_the_stored_dtype(source, tmp_path):
    bf16 = str(tmp_path / "bf16")
    save_pretrained(load_pretrained(source[0], dtype=torch.bfloat16), bf16, zero_expert_slots=True)
    assert main(["grow", "--checkpoint", bf16, "--out", str(tmp_path / "out")]) == 0
    from safetensors import safe_open
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        dtypes = {name: f.get_tensor(name).dtype for name in f.keys()}
    assert dtypes["model.layers.3.mlp.experts.0.down_proj.weight"] == torch.bfloat16
    assert dtypes["lm_head.weight"] == torch.bfloat16 and len(dtypes) > 20


@pytest.mark.parametrize("args, needle", [
    (["--checkpoint", "{tmp}/nothing"], "no such directory"),
    (["--checkpoint", "{tmp}"], "no config.json"),
    (["--factor", "0"], "--factor"),
    (["--factor", "1.5"], "--factor"),
    (["--out", "{tmp}/full"], "not empty"),
])
def test_user_mistakes_exit_2_with_one_line(source, tmp_path, capsys, args, needle):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine\n")
    given = {"--checkpoint": source[0], "--out": str(tmp_path / "out")}
    given.update(dict(zip(args[::2], [a.format(tmp=tmp_path) for a in args[1::2]])))
    assert main(["grow", *[part for pair in given.items() for part in pair]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not os.path.exists(tmp_path / "out")
    assert os.listdir(tmp_path / "full") == ["keep.txt"]


def test_a_user_mistake_from_the_command_line(source, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine\n")
    assert_user_error(run_cli("grow", "--checkpoint", source[0], "--out", str(tmp_path / "full")), "not empty")
