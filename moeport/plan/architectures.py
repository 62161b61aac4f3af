"""The shapes the planner costs: any LongCat-Flash config, and DeepSeek-V3 (planner only).

An `Architecture` is what the planner needs of a model. Two layer layouts:

- "scmoe" (LongCat-Flash): each layer two MLA sublayers, two dense SwiGLU FFNs and one
  shortcut MoE whose input is FFN0's (so its communication can overlap the dense path);
  built from any LongcatConfig (the runtime's presets, or a checkpoint's config.json);
- "moe" (DeepSeek-V3): `dense_layers` layers of MLA + a dense FFN, then layers of MLA + an
  MoE with shared experts and no zero experts. `deepseek-v3` exists for the planner only:
  moeport cannot run it.
"""

from __future__ import annotations

import dataclasses
import os

from moeport.base.errors import UserError
from moeport.model.config import PRESETS, LongcatConfig


@dataclasses.dataclass(frozen=True)
class Architecture:
    """The shape of an MoE transformer, as the planner costs it (names after the HF configs)."""

    name: str
    layout: str  # "scmoe" (LongCat-Flash) or "moe" (DeepSeek-V3)
    hidden: int
    moe_layers: int  # layers with an MoE
    dense_layers: int  # layers of attention + a dense FFN only (DeepSeek-V3's first 3)
    heads: int
    q_lora: int
    kv_lora: int
    nope: int
    rope: int
    v: int
    dense_ffn: int  # the dense FFNs' intermediate width
    experts: int  # FFN (routed) experts
    zero_experts: int
    top_k: int
    expert_ffn: int  # each expert's intermediate width
    shared_experts: int  # experts every token goes through (DeepSeek-V3: 1)
    vocab: int

    def default_ffn_experts_per_token(self) -> float:
        """FFN experts per token when the plan does not say: top-k times the FFN experts' share of all
        experts, the zero experts taking their proportional share of the slots (12 x 512 / 768 = 8 for
        LongCat-Flash; the report's average is ~8 of the 12; top-k for a model without zero experts)."""
        return self.top_k * self.experts / (self.experts + self.zero_experts)

    def describe(self) -> dict[str, int | str]:
        """The shape as a JSON-ready mapping."""
        return dataclasses.asdict(self)


def from_longcat(config: LongcatConfig, name: str) -> Architecture:
    """A LongCat-Flash config (preset or checkpoint) as the planner sees it."""
    c = config
    return Architecture(
        name=name, layout="scmoe", hidden=c.hidden_size, moe_layers=c.num_layers, dense_layers=0,
        heads=c.num_attention_heads, q_lora=c.q_lora_rank, kv_lora=c.kv_lora_rank, nope=c.qk_nope_head_dim,
        rope=c.qk_rope_head_dim, v=c.v_head_dim, dense_ffn=c.ffn_hidden_size, experts=c.n_routed_experts,
        zero_experts=c.zero_expert_num, top_k=c.moe_topk, expert_ffn=c.expert_ffn_hidden_size, shared_experts=0,
        vocab=c.vocab_size,
    )


# DeepSeek-V3 as published: the config.json of deepseek-ai/DeepSeek-V3 on Hugging Face (hidden_size 7168,
# num_hidden_layers 61, first_k_dense_replace 3, num_attention_heads 128, q_lora_rank 1536, kv_lora_rank 512,
# qk_nope_head_dim 128, qk_rope_head_dim 64, v_head_dim 128, intermediate_size 18432, n_routed_experts 256,
# num_experts_per_tok 8, n_shared_experts 1, moe_intermediate_size 2048, vocab_size 129280).
DEEPSEEK_V3 = Architecture(
    name="deepseek-v3", layout="moe", hidden=7168, moe_layers=61 - 3, dense_layers=3, heads=128, q_lora=1536,
    kv_lora=512, nope=128, rope=64, v=128, dense_ffn=18432, experts=256, zero_experts=0, top_k=8, expert_ffn=2048,
    shared_experts=1, vocab=129280,
)

#: Planner-only shapes, beside the runtime's presets (tiny, small, longcat-flash).
PLANNER_ONLY = {"deepseek-v3": DEEPSEEK_V3}


def planner_models() -> list[str]:
    """Every name `moeport plan --model` takes."""
    return [*PRESETS, *PLANNER_ONLY]


def architecture(model: str | None = None, checkpoint: str | None = None) -> Architecture:
    """The shape named by `--model` (a runtime preset or a planner-only one) or read from `--checkpoint`."""
    if checkpoint is not None:
        if not os.path.isdir(checkpoint):
            raise UserError(f"--checkpoint {checkpoint}: no such directory")
        return from_longcat(LongcatConfig.from_file(checkpoint), f"checkpoint {checkpoint}")
    if model in PLANNER_ONLY:
        return PLANNER_ONLY[model]
    if model in PRESETS:
        return from_longcat(PRESETS[model], model)
    raise UserError(f"--model {model}: unknown model; expected one of {', '.join(planner_models())}")


__all__ = ["DEEPSEEK_V3", "Architecture", "architecture", "from_longcat", "planner_models"]
