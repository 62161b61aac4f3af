"""Multi-head latent attention (MLA) with LongCat's variance-alignment scales.

q = q_b(RMSNorm(q_a(x))); latent, k_rope = split(kv_a_proj_with_mqa(x)); latent = RMSNorm(latent);
k_nope, v = split(kv_b(latent)); q is scaled by sqrt(hidden / q_lora_rank) and the normed latent
by sqrt(hidden / kv_lora_rank); interleaved rotary embedding on the rope parts. The KV cache
holds the compressed latent and the rotated rope key, not expanded heads.

The forward pass is split in two so a schedule can place them apart: `project` (the q/kv
projections) and `attend` (cache update, core attention, output projection).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from moeport.model.config import LongcatConfig
from moeport.model.norm import RMSNorm


def rope_inverse_frequencies(config: LongcatConfig) -> torch.Tensor:
    """Rotary frequencies for the rope part of each head (float32)."""
    dim = config.qk_rope_head_dim
    return 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [B, 1, T, rope/2] (broadcast over heads) for positions [B, T], cast to `dtype`
    as the reference does."""
    freqs = positions[:, None, :, None].to(torch.float32) * inv_freq.to(positions.device)
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def apply_interleaved_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... of the last dim; output de-interleaved halves.

    x: [B, H, T, rope]; cos, sin: [B, 1, T, rope/2].
    """
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


@dataclasses.dataclass
class LatentCache:
    """Per-block decoding cache: scaled normed latent [B, S, kv_lora_rank] and rotated rope key [B, S, rope]."""

    latent: torch.Tensor
    k_rope: torch.Tensor
    length: int = 0

    @classmethod
    def empty(cls, batch: int, capacity: int, config: LongcatConfig, dtype: torch.dtype, device: torch.device) -> "LatentCache":
        """A cache with room for `capacity` positions."""
        return cls(
            torch.empty(batch, capacity, config.kv_lora_rank, dtype=dtype, device=device),
            torch.empty(batch, capacity, config.qk_rope_head_dim, dtype=dtype, device=device),
        )

    def append(self, latent: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new positions; returns the whole cached latent and rope key so far."""
        end = self.length + latent.shape[1]
        if end > self.latent.shape[1]:
            raise ValueError(f"KV cache holds {self.latent.shape[1]} positions; {end} needed")
        self.latent[:, self.length:end] = latent
        self.k_rope[:, self.length:end] = k_rope
        self.length = end
        return self.latent[:, :end], self.k_rope[:, :end]


@dataclasses.dataclass
class Projected:
    """What `project` hands to `attend`: rotated queries and this step's latent and rope key."""

    q: torch.Tensor  # [B, H, T, qk_head_dim], rope part rotated
    latent: torch.Tensor  # [B, T, kv_lora_rank], normed and scaled
    k_rope: torch.Tensor  # [B, T, rope], rotated


class MLA(nn.Module):
    """One LongCat-Flash attention sublayer."""

    def __init__(self, config: LongcatConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        self.heads = c.num_attention_heads
        self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=False)
        self.q_a_layernorm = RMSNorm(c.q_lora_rank)
        self.q_b_proj = nn.Linear(c.q_lora_rank, c.num_attention_heads * c.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim), bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * c.v_head_dim, c.hidden_size, bias=False)
        self.q_scale = math.sqrt(c.hidden_size / c.q_lora_rank) if c.mla_scale_q_lora else 1.0
        self.kv_scale = math.sqrt(c.hidden_size / c.kv_lora_rank) if c.mla_scale_kv_lora else 1.0
        self.softmax_scale = c.qk_head_dim ** -0.5

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> Projected:
        """The q and kv projections of x [B, T, hidden], with rope applied."""
        c = self.config
        b, t, _ = x.shape
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))).view(b, t, self.heads, c.qk_head_dim).transpose(1, 2)
        if self.q_scale != 1.0:
            q = q * self.q_scale
        q_nope, q_rope = torch.split(q, [c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)
        latent, k_rope = torch.split(self.kv_a_proj_with_mqa(x), [c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent) * self.kv_scale
        # the rope key rides along as one more head: one rotation for q and k
        rotated = apply_interleaved_rope(torch.cat([q_rope, k_rope.unsqueeze(1)], dim=1), cos, sin)
        return Projected(torch.cat([q_nope, rotated[:, : self.heads]], dim=-1), latent, rotated[:, self.heads])

    def attend(self, p: Projected, cache: LatentCache | None = None) -> torch.Tensor:
        """Core attention over the cached and new positions, then the output projection: [B, T, hidden]."""
        c = self.config
        latent, k_rope = (p.latent, p.k_rope) if cache is None else cache.append(p.latent, p.k_rope)
        b, s, _ = latent.shape
        t = p.q.shape[2]
        kv = self.kv_b_proj(latent).view(b, s, self.heads, c.qk_nope_head_dim + c.v_head_dim).transpose(1, 2)
        k_nope, v = torch.split(kv, [c.qk_nope_head_dim, c.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_rope.unsqueeze(1).expand(b, self.heads, s, c.qk_rope_head_dim)], dim=-1)
        # Fused attention kernels want one head size for q, k and v. Widen v to it by taking
        # the columns before it in the kv projection (the tail of k_nope): each output column
        # depends on its own v column only, so the extra leading columns are dropped and the
        # rest is exact, with no copy. Where k_nope is too narrow for that, zero-pad v.
        pad = c.qk_head_dim - c.v_head_dim
        if 0 < pad <= c.qk_nope_head_dim:
            v = kv[..., c.qk_nope_head_dim - pad:]
        elif pad > 0:
            v = F.pad(v, (pad, 0))
        past = s - t
        if past == 0:
            out = F.scaled_dot_product_attention(p.q, k, v, is_causal=t > 1, scale=self.softmax_scale)
        else:
            mask = None
            if t > 1:  # new positions see everything cached plus the new ones up to themselves
                mask = torch.ones(t, s, dtype=torch.bool, device=p.q.device).tril(diagonal=past)
            out = F.scaled_dot_product_attention(p.q, k, v, attn_mask=mask, scale=self.softmax_scale)
        out = out[..., pad:] if pad > 0 else out
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.heads * c.v_head_dim))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LatentCache | None = None) -> torch.Tensor:
        """Projection then attention, for callers that do not split them."""
        return self.attend(self.project(x, cos, sin), cache)
