"""One ScMoE decoder layer, read top to bottom: its state, its steps in the order they run, its forward.

    h0  = x  + Attn0(RMSNorm_in0(x))
    u   = RMSNorm_post0(h0)
    moe = MoE(u)                       # the shortcut: the normed input of FFN0
    h1  = h0 + FFN0(u)
    h2  = h1 + Attn1(RMSNorm_in1(h1))
    out = h2 + FFN1(RMSNorm_post1(h2)) + moe

The steps are listed in the order of the overlap schedule (LongCat's single-batch
overlap): attention 0 and the router; the dispatch's local packing; the dispatch in flight
while FFN0 and attention 1's q/kv projections compute; the experts; the combine in flight while attention 1's
core attention, its output projection and FFN1 compute; the sum. The sequential
schedule runs the same compute steps in the same order, waiting for each communication
as soon as it is issued (model/schedule.py drives both).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from moeport.model.cache import LatentCache
from moeport.model.config import LongcatConfig
from moeport.model.exchange import ExpertExchange
from moeport.model.experts import ExpertFFNs
from moeport.model.ffn import SwiGLU
from moeport.model.mla import MLA, Projected
from moeport.model.norm import RMSNorm
from moeport.model.router import Router, Routing, zero_expert_output
from moeport.model.schedule import Compute, Issue, Step, Wait, run_steps
from moeport.model.timeline import Timeline
from moeport.model.token_layout import TokenLayout


@dataclasses.dataclass
class LayerState:
    """What one layer's steps read and fill, in the order the steps fill it.

    In: x [B, T, H], the rotation cos / sin, the two attention sublayers' caches (None
    without a cache), whether this is a decoding step (one new position per sequence,
    after a cache: every rank is in the same phase) and the token layout (None: no padding,
    every sequence alike; else which positions are real, which keys each sees). Then: h0
    (after attention 0), u (its normed output, FFN0's and the
    MoE's input), tokens (u's real rows [N, H]: padding takes no expert slot), routing (the router's choice), zero_out
    (the zero experts' share, computed here), packed (the dispatch, routed and packed), h1 (after FFN0), projected (attention 1's
    queries and latent), received (what the dispatch brought this rank's experts),
    expert_out (their output rows), h2 (after attention 1), f1 (FFN1's output), moe (the
    MoE's output in token order) and out, the layer's output.
    """

    x: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    caches: tuple[LatentCache, LatentCache] | None = None
    decoding: bool = False
    layout: TokenLayout | None = None
    h0: torch.Tensor | None = None
    u: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    routing: Routing | None = None
    zero_out: torch.Tensor | None = None
    packed: Any = None
    h1: torch.Tensor | None = None
    projected: Projected | None = None
    received: Any = None
    expert_out: torch.Tensor | None = None
    h2: torch.Tensor | None = None
    f1: torch.Tensor | None = None
    moe: torch.Tensor | None = None
    out: torch.Tensor | None = None

    def cache(self, sublayer: int) -> LatentCache | None:
        """Attention `sublayer`'s cache, or None."""
        return None if self.caches is None else self.caches[sublayer]


class MoEBlock(nn.Module):
    """The router and this rank's FFN experts (named as in the checkpoint: mlp.router, mlp.experts)."""

    def __init__(self, config: LongcatConfig, experts_here: range) -> None:
        super().__init__()
        self.router = Router(config)
        self.experts = ExpertFFNs(config, experts_here)


class ScMoELayer(nn.Module):
    """One LongCat-Flash layer: two attention sublayers, two dense FFNs and one shortcut MoE.

    `exchange` (set by the model) moves the FFN-expert slots to the experts and back;
    `routing_counts`, when set, accumulates the slots routed to each expert.
    """

    def __init__(self, config: LongcatConfig, experts_here: range) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.config = config
        self.self_attn = nn.ModuleList([MLA(config), MLA(config)])
        self.mlps = nn.ModuleList([SwiGLU(config.hidden_size, config.ffn_hidden_size) for _ in range(2)])
        self.input_layernorm = nn.ModuleList([RMSNorm(config.hidden_size, eps) for _ in range(2)])
        self.post_attention_layernorm = nn.ModuleList([RMSNorm(config.hidden_size, eps) for _ in range(2)])
        self.mlp = MoEBlock(config, experts_here)
        self.exchange: ExpertExchange | None = None
        self.routing_counts: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                caches: tuple[LatentCache, LatentCache] | None = None, schedule: str = "overlap",
                timeline: Timeline | None = None, layout: TokenLayout | None = None,
                decoding: bool | None = None) -> torch.Tensor:
        """The layer's output for x [B, T, H], its steps driven by `schedule` (timed on `timeline` if given).

        `decoding` (default: one new position per sequence after a cache) is the phase, which every
        expert-parallel rank must share; `layout` as TokenLayout.
        """
        if decoding is None:
            decoding = caches is not None and x.shape[1] == 1
        return run_steps(self.steps(), LayerState(x, cos, sin, caches, decoding, layout), schedule, timeline).out

    def steps(self) -> list[Step]:
        """The layer's steps, in the order they run under the overlap schedule."""
        return [
            Compute("attn0", self._attn0),
            Compute("router", self._router),
            Compute("pack", self._pack),
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

    def _attn0(self, s: LayerState) -> None:
        s.h0 = s.x + self.self_attn[0](self.input_layernorm[0](s.x), s.cos, s.sin, s.cache(0), s.layout)
        s.u = self.post_attention_layernorm[0](s.h0)

    def _router(self, s: LayerState) -> None:
        s.tokens = s.u.reshape(-1, s.u.shape[-1])
        if s.layout is not None:
            s.tokens = s.tokens.index_select(0, s.layout.real_rows)
        s.routing = self.mlp.router(s.tokens)
        if self.routing_counts is not None:
            self.routing_counts += torch.bincount(s.routing.ids.reshape(-1).cpu(), minlength=self.routing_counts.numel())
        s.zero_out = zero_expert_output(s.tokens, s.routing, self.config.n_routed_experts)

    def _pack(self, s: LayerState) -> None:
        s.packed = self.exchange.prepare(s.tokens, s.routing, s.decoding)

    def _dispatch(self, s: LayerState):
        return self.exchange.dispatch(s.packed)

    def _ffn0(self, s: LayerState) -> None:
        s.h1 = s.h0 + self.mlps[0](s.u)

    def _attn1_qkv(self, s: LayerState) -> None:
        s.projected = self.self_attn[1].project(self.input_layernorm[1](s.h1), s.cos, s.sin)

    def _received(self, s: LayerState, received: Any) -> None:
        s.received = received

    def _experts(self, s: LayerState) -> None:
        s.expert_out = self.exchange.compute(self.mlp.experts, s.received)

    def _combine(self, s: LayerState):
        return self.exchange.combine(s.expert_out)

    def _attn1_core(self, s: LayerState) -> None:
        s.h2 = s.h1 + self.self_attn[1].attend(s.projected, s.cache(1), s.layout)

    def _ffn1(self, s: LayerState) -> None:
        s.f1 = self.mlps[1](self.post_attention_layernorm[1](s.h2))

    def _combined(self, s: LayerState, moe_ffn: torch.Tensor) -> None:
        moe = moe_ffn + s.zero_out
        if s.layout is not None:  # padded rows get nothing from the MoE
            moe = moe.new_zeros((s.h2.numel() // s.h2.shape[-1], moe.shape[-1])).index_copy_(0, s.layout.real_rows, moe)
        s.moe = moe.view_as(s.h2)

    def _sum(self, s: LayerState) -> None:
        s.out = s.h2 + s.f1 + s.moe
