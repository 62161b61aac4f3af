"""The ScMoE decoder layer, written once as a list of steps.

    h0  = x  + Attn0(RMSNorm_in0(x))
    u   = RMSNorm_post0(h0)
    moe = MoE(u)                       # the shortcut: the normed input of FFN0
    h1  = h0 + FFN0(u)
    h2  = h1 + Attn1(RMSNorm_in1(h1))
    out = h2 + FFN1(RMSNorm_post1(h2)) + moe

The steps are listed in the order of the overlap schedule (LongCat's single-batch
overlap): attn0 and the router; the dispatch in flight while FFN0 and attn1's q/kv
projections compute; the experts; the combine in flight while attn1's core attention,
its output projection and FFN1 compute; the sum. The sequential schedule runs the same
compute steps in the same order, waiting for each communication as soon as it is issued.
"""

from __future__ import annotations

import torch
from torch import nn

from moeport.model.config import LongcatConfig
from moeport.model.ffn import SwiGLU
from moeport.model.mla import MLA, LatentCache
from moeport.model.moe import ExpertFFNs, Router, zero_expert_output
from moeport.model.norm import RMSNorm
from moeport.model.steps import Compute, Issue, LayerState, Step, Wait


class MoEBlock(nn.Module):
    """The router and this rank's FFN experts (named as in the checkpoint: mlp.router, mlp.experts)."""

    def __init__(self, config: LongcatConfig, first_expert: int, expert_count: int) -> None:
        super().__init__()
        self.router = Router(config)
        self.experts = ExpertFFNs(config, first_expert, expert_count)


class ScMoELayer(nn.Module):
    """One LongCat-Flash layer: two attention sublayers, two dense FFNs and one shortcut MoE."""

    def __init__(self, config: LongcatConfig, first_expert: int, expert_count: int) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.config = config
        self.self_attn = nn.ModuleList([MLA(config), MLA(config)])
        self.mlps = nn.ModuleList([SwiGLU(config.hidden_size, config.ffn_hidden_size) for _ in range(2)])
        self.input_layernorm = nn.ModuleList([RMSNorm(config.hidden_size, eps) for _ in range(2)])
        self.post_attention_layernorm = nn.ModuleList([RMSNorm(config.hidden_size, eps) for _ in range(2)])
        self.mlp = MoEBlock(config, first_expert, expert_count)
        self.exchange = None  # set by the model: moves FFN-expert slots to the experts and back
        self.routing_counts: torch.Tensor | None = None  # when set: slots routed to each expert, accumulated

    def steps(self) -> list[Step]:
        """The layer's steps, in overlap order. State in: x [B, T, H], cos, sin, caches; out: `out`."""
        return [
            Compute("attn0", self._attn0),
            Compute("router", self._router),
            Issue("dispatch", self._dispatch),
            Compute("ffn0", self._ffn0),
            Compute("attn1_qkv", self._attn1_qkv),
            Wait("dispatch", self._received),
            Compute("experts", self._experts),
            Issue("combine", self._combine),
            Compute("attn1_core", self._attn1_core),
            Compute("ffn1", self._ffn1),
            Wait("combine", self._combined),
            Compute("sum", self._sum),
        ]

    def _cache(self, s: LayerState, sublayer: int) -> LatentCache | None:
        return None if s.caches is None else s.caches[sublayer]

    def _attn0(self, s: LayerState) -> None:
        attn = self.self_attn[0]
        s.h0 = s.x + attn(self.input_layernorm[0](s.x), s.cos, s.sin, self._cache(s, 0))
        s.u = self.post_attention_layernorm[0](s.h0)

    def _router(self, s: LayerState) -> None:
        s.tokens = s.u.reshape(-1, s.u.shape[-1])
        s.routing = self.mlp.router(s.tokens)
        if self.routing_counts is not None:
            self.routing_counts += torch.bincount(s.routing.ids.reshape(-1).cpu(), minlength=self.routing_counts.numel())
        s.zero_out = zero_expert_output(s.tokens, s.routing, self.config.n_routed_experts)

    def _dispatch(self, s: LayerState):
        return self.exchange.dispatch(s.tokens, s.routing)

    def _ffn0(self, s: LayerState) -> None:
        s.h1 = s.h0 + self.mlps[0](s.u)

    def _attn1_qkv(self, s: LayerState) -> None:
        s.projected = self.self_attn[1].project(self.input_layernorm[1](s.h1), s.cos, s.sin)

    def _received(self, s: LayerState, received) -> None:
        s.received = received

    def _experts(self, s: LayerState) -> None:
        s.expert_out = self.exchange.compute(self.mlp.experts, s.received)

    def _combine(self, s: LayerState):
        return self.exchange.combine(s.expert_out)

    def _attn1_core(self, s: LayerState) -> None:
        s.h2 = s.h1 + self.self_attn[1].attend(s.projected, self._cache(s, 1))

    def _ffn1(self, s: LayerState) -> None:
        s.f1 = self.mlps[1](self.post_attention_layernorm[1](s.h2))

    def _combined(self, s: LayerState, moe_ffn: torch.Tensor) -> None:
        s.moe = (moe_ffn + s.zero_out).view_as(s.h2)

    def _sum(self, s: LayerState) -> None:
        s.out = s.h2 + s.f1 + s.moe
