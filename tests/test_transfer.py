"""Width transfer: the rule on the report's own example, the `train.width_transfer` option through a profile, its
mistakes as one line with exit 2, and init_weights scaling each group's std by its multiplier."""

from __future__ import annotations

import dataclasses
import math
import types

import pytest
import torch

from moeport.cli import main
from moeport.model import PRESETS, LongcatForCausalLM, ModelContext
from moeport.model.init import init_weights
from moeport.model.training import PARAMETER_GROUPS, parameter_group
from moeport.model.transfer import width_transfer
from moeport.profile import load_profile, model_config_of
from moeport.train_profile import init_std_multipliers, train_settings

pytestmark = pytest.mark.timeout(120)

SCALED = ("unembedding", "router", "experts", "hidden")


def test_the_reports_example_768_to_6144():
    """s = 8: the embedding (and the norms) as tuned; every other group's learning rate / 8, init std / sqrt(8)."""
    t = width_transfer(768, 6144)
    assert t.width_ratio == 8.0
    assert t.lr_multipliers == {"embedding": 1.0, "unembedding": 0.125, "router": 0.125, "experts": 0.125,
                                "norm": 1.0, "hidden": 0.125}
    third = 0.35355339059327373  # 1 / sqrt(8), written out: the variance / 8
    assert t.init_std_multipliers == pytest.approx({"embedding": 1.0, "unembedding": third, "router": third,
                                                    "experts": third, "norm": 1.0, "hidden": third}, rel=1e-12)
    for group in SCALED:  # the variance factor is the learning-rate factor
        assert t.init_std_multipliers[group] ** 2 == pytest.approx(t.lr_multipliers[group], rel=1e-12)


def test_the_proxys_own_multipliers_are_composed_group_by_group():
    t = width_transfer(768, 6144, {"hidden": 0.5, "embedding": 2.0, "norm": 3.0}, {"unembedding": 0.5, "router": 0.0})
    assert t.lr_multipliers == {"embedding": 2.0, "unembedding": 0.125, "router": 0.125, "experts": 0.125,
                                "norm": 3.0, "hidden": 0.0625}
    assert t.init_std_multipliers["unembedding"] == pytest.approx(0.5 / math.sqrt(8), rel=1e-12)
    assert t.init_std_multipliers["router"] == 0.0
    assert t.init_std_multipliers["embedding"] == 1.0
    assert width_transfer(64, 64).lr_multipliers == dict.fromkeys(PARAMETER_GROUPS, 1.0)  # s = 1: nothing moves


@pytest.mark.parametrize("args, message", [
    ((0, 64), "positive"),
    ((64, -1), "positive"),
    ((64, 512, {"attention": 1.0}), "unknown parameter group 'attention'"),
    ((64, 512, None, {"hidden": -1.0}), "0 or more"),
])
def test_the_rule_rejects_what_has_no_meaning(args, message):
    with pytest.raises(ValueError, match=message):
        width_transfer(*args)


def _profile(tmp_path, train_yaml: str, preset: str = "small"):
    path = tmp_path / "p.yaml"
    path.write_text(f"model: {{preset: {preset}}}\ntrain: {train_yaml}\n")
    profile = load_profile(str(path))
    return profile, model_config_of(profile)[0]


def test_the_train_option_fills_the_learning_rate_and_init_multipliers(tmp_path):
    # small is 512 wide: from a 64-wide proxy, s = 8
    profile, config = _profile(tmp_path, "{lr: 0.002, lr_multipliers: {hidden: 0.5, embedding: 2.0}, width_transfer: "
                                         "{proxy_hidden_size: 64, init_std_multipliers: {unembedding: 0.5}}}")
    settings = train_settings(profile, config)
    assert settings.lr == 0.002  # the proxy's base learning rate stays; the multipliers carry the rule
    assert settings.lr_multipliers == {"embedding": 2.0, "unembedding": 0.125, "router": 0.125, "experts": 0.125,
                                       "norm": 1.0, "hidden": 0.0625}
    stds = init_std_multipliers(profile, config)
    assert stds == pytest.approx({"embedding": 1.0, "unembedding": 0.5 / math.sqrt(8), "router": 1 / math.sqrt(8),
                                  "experts": 1 / math.sqrt(8), "norm": 1.0, "hidden": 1 / math.sqrt(8)}, rel=1e-12)


def test_without_the_option_nothing_changes(tmp_path):
    profile, config = _profile(tmp_path, "{lr_multipliers: {router: 0.1}}")
    assert train_settings(profile, config).lr_multipliers == {"router": 0.1}
    assert init_std_multipliers(profile, config) == {}


@pytest.mark.parametrize("train_yaml, where", [
    ("{width_transfer: {proxy_hidden_size: 0}}", "train.width_transfer.proxy_hidden_size"),
    ("{width_transfer: {proxy_hidden_size: -768}}", "train.width_transfer.proxy_hidden_size"),
    ("{width_transfer: {proxy_hidden_size: 32.0}}", "train.width_transfer.proxy_hidden_size"),
    ("{width_transfer: {proxy_hidden_size: 128}}", "train.width_transfer.proxy_hidden_size 128 exceeds"),
    ("{width_transfer: {}}", "train.width_transfer.proxy_hidden_size"),
    ("{width_transfer: {proxy_hidden_size: 32, s: 2}}", "train.width_transfer.s"),
    ("{width_transfer: {proxy_hidden_size: 32, init_std_multipliers: {attention: 1.0}}}",
     "train.width_transfer.init_std_multipliers"),
    ("{width_transfer: {proxy_hidden_size: 32, init_std_multipliers: {norm: 2.0}}}",
     "train.width_transfer.init_std_multipliers"),
    ("{width_transfer: 768}", "train.width_transfer"),
])
def test_a_bad_option_exits_2_with_one_line(tmp_path, capsys, train_yaml, where):
    path = tmp_path / "p.yaml"
    path.write_text(f"model: {{preset: tiny}}\ntrain: {train_yaml}\n")  # tiny is 64 wide
    assert main(["train", "--profile", str(path), "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and where in err[0] and str(path) in err[0], err


CONFIG = dataclasses.replace(PRESETS["tiny"], num_layers=1)
MULTIPLIERS = {"embedding": 1.5, "unembedding": 0.25, "router": 2.0, "experts": 0.5, "hidden": 0.125}


def _weights(std_multipliers=None) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in
            init_weights(LongcatForCausalLM(CONFIG), 3, std_multipliers).state_dict().items()}


def test_init_weights_scales_each_groups_std_by_its_multiplier():
    plain, scaled = _weights(), _weights(MULTIPLIERS)
    seen = set()
    for name, weight in plain.items():
        group = parameter_group(name)
        if name.endswith("e_score_correction_bias"):
            assert not scaled[name].any()
            continue
        if group == "norm":
            assert (scaled[name] == 1).all()
            continue
        seen.add(group)
        # the same draws (the seed names the tensor, not its scale), times the group's multiplier
        torch.testing.assert_close(scaled[name], weight * MULTIPLIERS[group], rtol=1e-6, atol=0)
        if weight.numel() >= 500:
            assert float(scaled[name].std()) == pytest.approx(CONFIG.initializer_range * MULTIPLIERS[group], rel=0.1)
    assert seen == set(MULTIPLIERS)


def test_by_default_every_drawn_weight_has_the_configs_std():
    """Experts and the router's classifier included; multipliers of 1 change no bit."""
    plain = _weights()
    for name, weight in plain.items():
        if parameter_group(name) == "norm" or name.endswith("e_score_correction_bias") or weight.numel() < 500:
            continue
        assert float(weight.std()) == pytest.approx(CONFIG.initializer_range, rel=0.1), name
        assert abs(float(weight.mean())) < 0.15 * CONFIG.initializer_range, name
    ones = _weights(dict.fromkeys(PARAMETER_GROUPS, 1.0))
    assert all(torch.equal(plain[name], ones[name]) for name in plain)
    assert {parameter_group(n) for n in plain} == set(PARAMETER_GROUPS)


def test_init_weights_rejects_an_unknown_group():
    with pytest.raises(ValueError, match="unknown parameter group 'attention'"):
        init_weights(LongcatForCausalLM(CONFIG), 0, {"attention": 1.0})


def test_every_rank_draws_its_share_of_the_same_scaled_weights():
    """Built as rank r of 2 (only the group's rank and size are read: nothing communicates while building), each
    rank holds exactly its experts and the shared weights of the one-process model, multipliers and all."""
    whole = _weights(MULTIPLIERS)
    for rank in range(2):
        context = ModelContext(types.SimpleNamespace(rank=rank, world_size=2))
        part = init_weights(LongcatForCausalLM(CONFIG, context), 3, MULTIPLIERS)
        here = list(part.experts_here)
        for name, tensor in part.state_dict().items():
            expected = whole[name][here] if name.endswith(("experts.gate_up", "experts.down")) else whole[name]
            assert torch.equal(tensor, expected), name
