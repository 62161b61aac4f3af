"""Multi-head latent attention (MLA) with LongCat's variance-alignment scales.

q = q_b(RMSNorm(q_a(x))); latent, k_rope = split(kv_a_proj_with_mqa(x)); latent = RMSNorm(latent);
k_nope, v = split(kv_b(latent)); q is scaled by sqrt(hidden / q_lora_rank) and the normed latent
by sqrt(hidden / kv_lora_rank); interleaved rotary embedding on the rope parts. The KV cache
holds the compressed latent and the rotated rope key, not expanded heads; decoding one
position attends in the latent space (kv_b_proj folded into the query and the output).

The forward pass is split in two so a schedule can place them apart: `project` (the q/kv
projections) and `attend` (cache update, core attention, output projection).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from moeport.model.cache import LatentCache
from moeport.model.config import LongcatConfig
from moeport.model.fused import fused_linear_weight, save_as_parts
from moeport.model.norm import RMSNorm
from moeport.model.token_layout import TokenLayout


def rope_inverse_frequencies(config: LongcatConfig) -> torch.Tensor:
    """Rotary frequencies for the rope part of each head (float32)."""
    dim = config.qk_rope_head_dim
    return 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotation for positions [B, T], laid out for `apply_interleaved_rope`: cos and signed sin
    [B, 1, T, rope] (broadcast over heads), (cos a, cos a) and (-sin a, sin a) for each pair's
    angle a, cast to `dtype` as the reference casts them."""
    freqs = positions[:, None, :, None].to(torch.float32) * inv_freq.to(positions.device)
    cos, sin = freqs.cos().to(dtype), freqs.sin().to(dtype)
    return cos.repeat_interleave(2, dim=-1), torch.stack([-sin, sin], dim=-1).flatten(-2)


def apply_interleaved_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each interleaved pair (x0, x1), (x2, x3), ... of the last dim by its angle, in place
    in the pair: (x0 cos - x1 sin, x1 cos + x0 sin). The reference writes the same values
    de-interleaved (all first members, then all second members); attention scores do not
    depend on that order as long as queries and keys share it, and here they all do.

    x: [B, H, T, rope]; cos, sin: from `rope_cos_sin`.
    """
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x1, x0), (x3, x2), ...
    return torch.addcmul(x * cos, swapped, sin)


@dataclasses.dataclass
class Projected:
    """What `project` hands to `attend`: the queries and this step's latent and rope key."""

    q_nope: torch.Tensor  # [B, H, T, qk_nope_head_dim]
    q_rope: torch.Tensor  # [B, H, T, rope], rotated
    latent: torch.Tensor  # [B, T, kv_lora_rank], normed and scaled
    k_rope: torch.Tensor  # [B, T, rope], rotated


class MLA(nn.Module):
    """One LongCat-Flash attention sublayer."""

    def __init__(self, config: LongcatConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        self.heads = c.num_attention_heads
        # q_a_proj and kv_a_proj_with_mqa as one weight: one matmul for both (checkpoint names kept)
        kv_a_rows = c.kv_lora_rank + c.qk_rope_head_dim
        self.qkv_a_proj = fused_linear_weight(c.hidden_size, [c.q_lora_rank, kv_a_rows])
        save_as_parts(self, "qkv_a_proj", [("q_a_proj.weight", c.q_lora_rank), ("kv_a_proj_with_mqa.weight", kv_a_rows)])
        self.q_a_layernorm = RMSNorm(c.q_lora_rank)
        self.q_b_proj = nn.Linear(c.q_lora_rank, c.num_attention_heads * c.qk_head_dim, bias=False)
        self.kv_scale = math.sqrt(c.hidden_size / c.kv_lora_rank) if c.mla_scale_kv_lora else 1.0
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, scale=self.kv_scale)  # the scale is applied by the norm
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim), bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * c.v_head_dim, c.hidden_size, bias=False)
        self.q_scale = math.sqrt(c.hidden_size / c.q_lora_rank) if c.mla_scale_q_lora else 1.0
        # q's variance-alignment scale applies to the scores (q enters them linearly): one multiply fewer
        self.score_scale = c.qk_head_dim ** -0.5 * self.q_scale

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> Projected:
        """The q and kv projections of x [B, T, hidden], with rope applied (q's scale is left to the scores)."""
        c = self.config
        b, t, _ = x.shape
        q_a, latent, k_rope = torch.split(F.linear(x, self.qkv_a_proj), [c.q_lora_rank, c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
        q = self.q_b_proj(self.q_a_layernorm(q_a)).view(b, t, self.heads, c.qk_head_dim).transpose(1, 2)
        q_nope, q_rope = torch.split(q, [c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)  # scaled by kv_scale
        # the rope key rides along as one more head: one rotation for q and k
        rotated = apply_interleaved_rope(torch.cat([q_rope, k_rope.unsqueeze(1)], dim=1), cos, sin)
        return Projected(q_nope, rotated[:, : self.heads], latent, rotated[:, self.heads])

    def attend(self, p: Projected, cache: LatentCache | None = None, layout: TokenLayout | None = None) -> torch.Tensor:
        """Core attention over the cached and new positions, then the output projection: [B, T, hidden].

        With a `layout` (padding, or sequences of different cached lengths), only real tokens are
        cached and each query sees the keys the layout allows; without one, every sequence alike.
        """
        c = self.config
        t = p.q_nope.shape[2]
        if cache is not None:
            self._store(p, cache, layout)
            if t == 1:
                return self._attend_latent(p, cache, layout)
            latent, k_rope = torch.split(cache.cached(), [c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
        else:
            latent, k_rope = p.latent, p.k_rope
        b, s, _ = latent.shape
        q = torch.cat([p.q_nope, p.q_rope], dim=-1)
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
        if layout is not None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=layout.key_mask, scale=self.score_scale)
        elif past == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.score_scale)  # one position: itself
        else:
            mask = None
            if t > 1:  # new positions see everything cached plus the new ones up to themselves
                mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(diagonal=past)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.score_scale)
        out = out[..., pad:] if pad > 0 else out
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.heads * c.v_head_dim))

    @staticmethod
    def _store(p: Projected, cache: LatentCache, layout: TokenLayout | None) -> None:
        """This step's latent and rope key into the cache: appended alike, or each real token at its column."""
        if layout is None:
            cache.append(p.latent, p.k_rope)
            return
        sequences, columns = layout.write_index()
        rows = layout.real_rows
        cache.write(sequences, columns, p.latent.reshape(-1, p.latent.shape[-1]).index_select(0, rows),
                    p.k_rope.reshape(-1, p.k_rope.shape[-1]).index_select(0, rows), layout.key_length)

    def _attend_latent(self, p: Projected, cache: LatentCache, layout: TokenLayout | None) -> torch.Tensor:
        """`attend` for one new position: attention in the latent space, with kv_b_proj folded
        into the query (its key half) and into the output (its value half), so the cached
        positions are never expanded to heads. Same result up to rounding.

        Every head attends to the same cached rows, so the heads are laid out as the query
        positions of one shared key/value head.
        """
        c = self.config
        keys = cache.cached().unsqueeze(1)  # [B, 1, S, kv_lora + rope]: one head
        b, heads, _, _ = p.q_nope.shape
        kv_b = self.kv_b_proj.weight.view(heads, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)
        # per head: q_nope [B, nope] @ W_k [nope, kv_lora], as one batched matmul over heads
        q_latent = torch.bmm(p.q_nope.view(b, heads, c.qk_nope_head_dim).transpose(0, 1), kv_b[:, : c.qk_nope_head_dim])
        q = torch.cat([q_latent.transpose(0, 1), p.q_rope.view(b, heads, c.qk_rope_head_dim)], dim=-1).unsqueeze(1)  # [B, 1, H, D]
        # the cached rows serve as values too: their rope columns come out last and are dropped
        mask = None if layout is None else layout.key_mask  # [B, 1, 1, S]: the same keys for every head
        out = F.scaled_dot_product_attention(q, keys, keys, attn_mask=mask, scale=self.score_scale)[:, 0, :, : c.kv_lora_rank]
        # per head: out [B, kv_lora] @ W_v^T [kv_lora, v]
        values = torch.bmm(out.transpose(0, 1), kv_b[:, c.qk_nope_head_dim:].transpose(1, 2))  # [H, B, v]
        return self.o_proj(values.transpose(0, 1).reshape(b, 1, heads * c.v_head_dim))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LatentCache | None = None,
                layout: TokenLayout | None = None) -> torch.Tensor:
        """Projection then attention, for callers that do not split them."""
        return self.attend(self.project(x, cos, sin), cache, layout)
