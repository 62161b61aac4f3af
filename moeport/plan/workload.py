"""The workload a plan is made for: the profile's `plan:` section.

Its defaults are LongCat-Flash's serving setup as the report describes it (expert
parallelism over up to 128 devices, float8 dispatch and bfloat16 combine, as DeepEP
sends them); `moeport plan --set plan.KEY=VALUE` overrides one key.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from moeport.plan.hardware import PLAN_DTYPES, PlanSectionBase

_DTYPE = Literal[tuple(PLAN_DTYPES)]  # type: ignore[valid-type]


class PlanSection(PlanSectionBase):
    """What one device serves: its batch, the context, the expert-parallel degree, the dtypes.

    - batch_per_device: sequences each device decodes together (one new position each per step);
    - context_length: positions each sequence attends to (decode), or each prompt's length (prefill);
    - ep: devices the FFN experts are spread over (default: the largest divisor of the model's
      FFN experts up to 128);
    - ffn_experts_per_token: FFN experts a token's top-k slots reach on average (default: top-k
      times the share of FFN experts among all experts, i.e. the zero experts taking their
      proportional share: 12 x 512 / 768 = 8 for LongCat-Flash, the report's ~8 of 12);
    - weight_dtype: the weights' (and the matmuls') dtype; activations and the KV cache are in it
      too, or in bfloat16 when it is float8;
    - dispatch_dtype / combine_dtype: the travelling hidden rows' element types;
    - tokens_per_step: output tokens a decoding step yields per sequence (> 1 with speculative
      decoding: accepted tokens per step; the draft head and verification are not costed);
    - prefill_tokens: tokens per device in one prefill chunk (`--phase prefill`).
    """

    batch_per_device: int = Field(default=96, ge=1)
    context_length: int = Field(default=4096, ge=1)
    ep: int | None = Field(default=None, ge=1)
    ffn_experts_per_token: float | None = Field(default=None, ge=0)
    weight_dtype: _DTYPE = "bfloat16"
    dispatch_dtype: _DTYPE = "float8"
    combine_dtype: _DTYPE = "bfloat16"
    tokens_per_step: float = Field(default=1.0, ge=1.0)
    prefill_tokens: int = Field(default=4096, ge=1)


__all__ = ["PlanSection"]
