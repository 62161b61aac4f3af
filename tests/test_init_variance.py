"""Variance alignment at initialisation, measured on moeport's own modules (LongCat-Flash's two corrections).

For one normed input, the output variance of a layer's attention sublayer (`self_attn[0]`), its dense FFN
(`mlps[0]`) and its MoE (the router, the FFN experts weighted by the routed scores, the zero experts' share:
`Router`, `ExpertFFNs`, `zero_expert_output`, as the layer forms them), on a narrow and a wide config derived
from the tiny and small presets. Like the presets, the wide one grows its low-rank dims slower than its width
(hidden / kv_lora_rank 4 -> 8, hidden / q_lora_rank 2 -> 4); both split the dense FFN's width into m = 6 experts
(ffn_hidden_size / expert_ffn_hidden_size = 6 = routed_scaling_factor, the released model's proportion).

What each correction keeps in line, and what it is measured against:

- MLA's scales (sqrt(hidden / q_lora_rank) on q, sqrt(hidden / kv_lora_rank) on the normed kv latent) make
  the low-rank attention's variances those of the same attention without the compression (q_lora_rank =
  kv_lora_rank = hidden, where both scales are 1). Without them its output variance falls by
  kv_lora_rank / hidden (the values come from the latent), which shrinks as the width outgrows the ranks.
- routed_scaling_factor = m makes the fine-grained FFN experts' output variance that of the coarse-grained MoE
  they split (m times fewer experts, m times wider, top-k / m, no scaling); without it they fall by 1 / m^2.

The dense FFN is not the reference: at a fixed initializer_range its output variance is a different power of
the std than the attention's (SwiGLU is quadratic in its input near 0: ~std^6 against ~std^4), so their ratio
moves with the init and the width whatever the scales; and the MoE's output at init is mostly the zero experts'
identity share (the reference scales it by routed_scaling_factor too), which does not depend on the std at all.
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from moeport.model import PRESETS, LongcatConfig, LongcatForCausalLM
from moeport.model.init import init_weights
from moeport.model.mla import rope_cos_sin, rope_inverse_frequencies
from moeport.model.router import ffn_slots, zero_expert_output
from moeport.model.transfer import width_transfer

pytestmark = pytest.mark.timeout(120)

M = 6  # experts per dense FFN width: LongCat-Flash-Chat config.json 12288 / 2048, its routed_scaling_factor 6.0


def _derived(name: str, n_routed_experts: int, zero_expert_num: int, moe_topk: int) -> LongcatConfig:
    """A one-layer preset with a small vocabulary, its dense FFN m expert widths, experts divisible by m."""
    preset = PRESETS[name]
    return dataclasses.replace(preset, num_layers=1, vocab_size=64, ffn_hidden_size=M * preset.expert_ffn_hidden_size,
                               n_routed_experts=n_routed_experts, zero_expert_num=zero_expert_num, moe_topk=moe_topk,
                               routed_scaling_factor=float(M))


NARROW = _derived("tiny", 24, 12, 6)  # hidden 64, q_lora 32, kv_lora 16, experts 32 wide
WIDE = _derived("small", 48, 24, 12)  # hidden 512, q_lora 128, kv_lora 64, experts 128 wide
WIDTHS = {"narrow": NARROW, "wide": WIDE}


def without_scales(config: LongcatConfig) -> LongcatConfig:
    """The same shape without the corrections: no MLA scales, routed_scaling_factor 1."""
    return dataclasses.replace(config, mla_scale_q_lora=False, mla_scale_kv_lora=False, routed_scaling_factor=1.0)


def full_rank(config: LongcatConfig) -> LongcatConfig:
    """The same attention without its low-rank compression (both scales are then 1)."""
    return dataclasses.replace(config, q_lora_rank=config.hidden_size, kv_lora_rank=config.hidden_size)


def coarse(config: LongcatConfig) -> LongcatConfig:
    """The MoE the fine-grained one splits: M times fewer, M times wider experts, top-k / M, no scaling."""
    return dataclasses.replace(config, n_routed_experts=config.n_routed_experts // M,
                               zero_expert_num=config.zero_expert_num // M, moe_topk=config.moe_topk // M,
                               expert_ffn_hidden_size=config.expert_ffn_hidden_size * M, routed_scaling_factor=1.0)


@functools.cache
def variances(config: LongcatConfig, seed: int = 0, proxy_hidden_size: int | None = None, batch: int = 4,
              seq: int = 32) -> dict[str, float]:
    """Output variances at init of layer 0's attention, dense FFN, FFN experts, zero experts and whole MoE, for
    the normed input of a random x [batch, seq, hidden] (the same x for every config of one width); initialised
    as the width transfer from a `proxy_hidden_size` proxy asks, if given."""
    stds = None
    if proxy_hidden_size is not None:
        stds = width_transfer(proxy_hidden_size, config.hidden_size).init_std_multipliers
    layer = init_weights(LongcatForCausalLM(config), seed, stds).model.layers[0]
    x = torch.randn(batch, seq, config.hidden_size, generator=torch.Generator().manual_seed(1000 + seed))
    cos, sin = rope_cos_sin(rope_inverse_frequencies(config), torch.arange(seq).expand(batch, seq), x.dtype)
    with torch.no_grad():
        attention = layer.self_attn[0](layer.input_layernorm[0](x), cos, sin)
        u = layer.post_attention_layernorm[0](x).reshape(-1, config.hidden_size)  # FFN0's and the MoE's input
        ffn = layer.mlps[0](u)
        routing = layer.mlp.router(u)
        experts = layer.mlp.experts(u, ffn_slots(routing, config.n_routed_experts), routing.weights)
        zero = zero_expert_output(u, routing, config.n_routed_experts)
    outputs = {"attention": attention, "ffn": ffn, "experts": experts, "zero": zero, "moe": experts + zero}
    return {name: float(value.var()) for name, value in outputs.items()}


def attention_ratio(config: LongcatConfig, base: LongcatConfig) -> float:
    """Attention output variance of `config` over that of `base`'s full-rank counterpart."""
    return variances(config)["attention"] / variances(full_rank(base))["attention"]


def experts_ratio(config: LongcatConfig, base: LongcatConfig) -> float:
    """FFN experts' output variance of `config` over that of `base`'s coarse-grained counterpart."""
    return variances(config)["experts"] / variances(coarse(base))["experts"]


@pytest.mark.parametrize("width", WIDTHS)
def test_with_the_mla_scales_attention_keeps_the_full_rank_variance(width):
    assert 0.5 < attention_ratio(WIDTHS[width], WIDTHS[width]) < 2


def test_without_them_attention_drifts_down_as_the_width_outgrows_the_ranks():
    narrow, wide = (attention_ratio(without_scales(c), c) for c in (NARROW, WIDE))
    for ratio, config in ((narrow, NARROW), (wide, WIDE)):  # the values' variance: kv_lora_rank / hidden of it
        assert ratio == pytest.approx(config.kv_lora_rank / config.hidden_size, rel=0.5)
    assert wide < narrow / 1.5 and wide < 0.5  # further from 1 on the wide config, out of the factor-2 band


@pytest.mark.parametrize("width", WIDTHS)
def test_with_routed_scaling_the_experts_keep_the_coarse_grained_variance(width):
    assert 0.5 < experts_ratio(WIDTHS[width], WIDTHS[width]) < 2


@pytest.mark.parametrize("width", WIDTHS)
def test_without_it_the_fine_grained_experts_lose_a_factor_m_squared(width):
    ratio = experts_ratio(without_scales(WIDTHS[width]), WIDTHS[width])
    assert ratio == pytest.approx(1 / M**2, rel=0.5) and ratio < 0.5


def test_the_scales_move_only_what_they_correct():
    """The dense FFN does not see them; the zero experts' share is scaled with the FFN experts' (as the reference
    does), by routed_scaling_factor^2 in variance."""
    for config in (NARROW, WIDE):
        on, off = variances(config), variances(without_scales(config))
        assert on["ffn"] == off["ffn"]
        assert on["zero"] / off["zero"] == pytest.approx(config.routed_scaling_factor**2, rel=1e-4)


def test_under_the_width_transfer_attention_keeps_its_ratio_to_the_dense_ffn_only_with_the_scales():
    """Initialised as LongCat-Flash transfers (init variance / s from the narrow proxy, s = 8 here), attention's
    variance over the dense FFN's stays put from the narrow to the wide config with the MLA scales (both
    configs have heads x v_head_dim = ffn_hidden_size / 3) and falls with kv_lora_rank / hidden without them.
    It is not near 1 (about 6 here): that offset is set by the init std, not by the scales."""
    def change(config: LongcatConfig) -> float:
        narrow = [variances(config(NARROW), seed) for seed in range(4)]  # the narrow draw is noisy: 4 seeds
        wide = variances(config(WIDE), 0, NARROW.hidden_size)
        return (wide["attention"] / wide["ffn"]) / (sum(v["attention"] / v["ffn"] for v in narrow) / len(narrow))
    with_scales, without = change(lambda c: c), change(without_scales)
    assert 1 / 1.5 < with_scales < 1.5
    expected = (WIDE.kv_lora_rank / WIDE.hidden_size) / (NARROW.kv_lora_rank / NARROW.hidden_size)  # 1/2
    assert without / with_scales == pytest.approx(expected, rel=0.25) and without < 1 / 1.5
