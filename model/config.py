"""The LongCat-Flash configuration: HF `config.json` keys, presets, parameter counts."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from moeport.base.errors import UserError


@dataclasses.dataclass(frozen=True)
class LongcatConfig:
    """The shape of a LongCat-Flash model, named as in its HF config.json (model_type longcat_flash).

    Each of the `num_layers` layers holds two attention sublayers, two dense FFNs and one MoE.
    """

    vocab_size: int = 131072
    hidden_size: int = 6144
    num_layers: int = 28
    num_attention_heads: int = 64
    ffn_hidden_size: int = 12288
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    moe_topk: int = 12
    n_routed_experts: int = 512
    zero_expert_num: int = 256
    zero_expert_type: str = "identity"
    expert_ffn_hidden_size: int = 2048
    routed_scaling_factor: float = 6.0
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e7
    max_position_embeddings: int = 131072
    mla_scale_q_lora: bool = True
    mla_scale_kv_lora: bool = True
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02

    @property
    def qk_head_dim(self) -> int:
        """Per-head query/key width: the non-rotary plus the rotary part."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_experts_total(self) -> int:
        """FFN experts plus zero-computation experts: the router's output width."""
        return self.n_routed_experts + self.zero_expert_num

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], source: str = "config.json") -> "LongcatConfig":
        """Read the keys of an HF longcat_flash config; unknown keys are ignored, wrong types rejected."""
        model_type = data.get("model_type", "longcat_flash")
        if model_type != "longcat_flash":
            raise UserError(f"{source}: model_type: expected 'longcat_flash', got {model_type!r}")
        values: dict[str, Any] = {}
        rope = data.get("rope_parameters") or data.get("rope_scaling") or {}
        if "rope_theta" in data:
            values["rope_theta"] = data["rope_theta"]
        elif isinstance(rope, dict) and "rope_theta" in rope:
            values["rope_theta"] = rope["rope_theta"]
        if isinstance(rope, dict) and rope.get("rope_type", "default") not in ("default", None):
            raise UserError(f"{source}: rope_parameters.rope_type: only 'default' rotary embedding is supported, got {rope.get('rope_type')!r}")
        if "num_layers" not in data and "num_hidden_layers" in data:
            values["num_layers"] = int(data["num_hidden_layers"]) // 2
        for field in dataclasses.fields(cls):
            if field.name in data and field.name not in values:
                values[field.name] = data[field.name]
        for field in dataclasses.fields(cls):
            if field.name not in values:
                continue
            expected = type(getattr(cls(), field.name))
            value = values[field.name]
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                values[field.name] = float(value)
            elif not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                raise UserError(f"{source}: {field.name}: expected {expected.__name__}, got {value!r}")
        config = cls(**values)
        config.validate(source)
        return config

    @classmethod
    def from_file(cls, path: str) -> "LongcatConfig":
        """Read a config.json file (or the config.json inside a directory)."""
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise UserError(f"{path}: no such config file") from None
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise UserError(f"{path}: expected a JSON object")
        return cls.from_hf_dict(data, source=path)

    def validate(self, source: str = "config") -> None:
        """Reject shapes no model can have, naming the key."""
        positive = [
            "vocab_size", "hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size",
            "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "v_head_dim", "moe_topk",
            "n_routed_experts", "expert_ffn_hidden_size",
        ]
        for key in positive:
            if getattr(self, key) <= 0:
                raise UserError(f"{source}: {key}: expected a positive number, got {getattr(self, key)}")
        if self.qk_rope_head_dim <= 0 or self.qk_rope_head_dim % 2:
            raise UserError(f"{source}: qk_rope_head_dim: expected a positive even number, got {self.qk_rope_head_dim}")
        if self.zero_expert_num < 0:
            raise UserError(f"{source}: zero_expert_num: expected >= 0, got {self.zero_expert_num}")
        if self.zero_expert_type != "identity":
            raise UserError(f"{source}: zero_expert_type: expected 'identity', got {self.zero_expert_type!r}")
        if self.moe_topk > self.num_experts_total:
            raise UserError(
                f"{source}: moe_topk: expected at most n_routed_experts + zero_expert_num = "
                f"{self.num_experts_total}, got {self.moe_topk}"
            )

    def to_hf_dict(self) -> dict[str, Any]:
        """The config as HF config.json keys, loadable by transformers' LongcatFlashConfig."""
        data = dataclasses.asdict(self)
        theta = data.pop("rope_theta")
        data.update(
            model_type="longcat_flash",
            architectures=["LongcatFlashForCausalLM"],
            num_hidden_layers=2 * self.num_layers,
            num_key_value_heads=self.num_attention_heads,
            rope_parameters={"rope_type": "default", "rope_theta": theta},
            hidden_act="silu",
        )
        return data


PRESETS: dict[str, LongcatConfig] = {
    # Tests: a few hundred thousand parameters, runs in milliseconds.
    "tiny": LongcatConfig(
        vocab_size=256, hidden_size=64, num_layers=2, num_attention_heads=4, ffn_hidden_size=128,
        q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        moe_topk=4, n_routed_experts=8, zero_expert_num=4, expert_ffn_hidden_size=32,
        routed_scaling_factor=6.0, max_position_embeddings=1024, rope_theta=10000.0,
    ),
    # Benchmarks on a 2-core machine: hidden 512, 64 FFN + 32 zero experts, top-8.
    "small": LongcatConfig(
        vocab_size=4096, hidden_size=512, num_layers=2, num_attention_heads=8, ffn_hidden_size=1024,
        q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        moe_topk=8, n_routed_experts=64, zero_expert_num=32, expert_ffn_hidden_size=128,
        routed_scaling_factor=6.0, max_position_embeddings=4096, rope_theta=10000.0,
    ),
    # The released LongCat-Flash-Chat shape: for parameter counts and the cost model only.
    "longcat-flash": LongcatConfig(),
}


def preset(name: str, source: str = "model.preset") -> LongcatConfig:
    """A named preset; an unknown name is a UserError listing the known ones."""
    if name not in PRESETS:
        raise UserError(f"{source}: unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    return PRESETS[name]


def _mla_params(c: LongcatConfig) -> int:
    heads = c.num_attention_heads
    return (
        c.hidden_size * c.q_lora_rank + c.q_lora_rank  # q_a_proj, q_a_layernorm
        + c.q_lora_rank * heads * c.qk_head_dim  # q_b_proj
        + c.hidden_size * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank  # kv_a_proj_with_mqa, norm
        + c.kv_lora_rank * heads * (c.qk_nope_head_dim + c.v_head_dim)  # kv_b_proj
        + heads * c.v_head_dim * c.hidden_size  # o_proj
    )


def parameter_counts(c: LongcatConfig, ffn_experts_per_token: float | None = None) -> dict[str, float]:
    """Total and activated parameters of a config.

    Activated counts what one token computes with: attention, dense FFNs, the
    router, the norms, `ffn_experts_per_token` FFN experts per layer (default:
    all top-k slots on FFN experts) and the output head, but not the embedding
    table, which is a lookup.
    """
    k = c.moe_topk if ffn_experts_per_token is None else ffn_experts_per_token
    expert = 3 * c.hidden_size * c.expert_ffn_hidden_size
    dense_ffn = 3 * c.hidden_size * c.ffn_hidden_size
    router = c.hidden_size * c.num_experts_total + c.num_experts_total  # classifier + correction bias
    norms = 4 * c.hidden_size
    per_layer_shared = 2 * _mla_params(c) + 2 * dense_ffn + router + norms
    embedding = c.vocab_size * c.hidden_size
    head = 0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size
    total = c.num_layers * (per_layer_shared + c.n_routed_experts * expert) + embedding + head + c.hidden_size
    active = c.num_layers * (per_layer_shared + k * expert) + (head or embedding) + c.hidden_size
    return {"total": total, "active": active, "ffn_experts_per_token": k, "expert": expert}


__all__ = ["LongcatConfig", "PRESETS", "preset", "parameter_counts"]
