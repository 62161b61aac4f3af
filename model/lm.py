"""The LongCat-Flash causal language model: embedding, ScMoE layers, final norm, lm_head; decoding.

Built for one rank of a Runtime (its expert-parallel group decides which FFN experts
this rank holds), or for one process with no Runtime at all (every expert local).
Tensor names follow the HF checkpoint: model.embed_tokens, model.layers.N...., model.norm, lm_head.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from moeport.base.buffers import cannot_write_here
from moeport.collectives.expert_layout import ExpertLayout
from moeport.model.cache import Caches
from moeport.model.config import LongcatConfig
from moeport.model.context import ModelContext, ProvidesModelContext, context_of
from moeport.model.exchange import new_exchange
from moeport.model.generation import FROM_CHECKPOINT, GenerationDefaults, generate
from moeport.model.layer import ScMoELayer
from moeport.model.mla import rope_cos_sin, rope_inverse_frequencies
from moeport.model.norm import RMSNorm
from moeport.model.timeline import Timeline
from moeport.model.token_layout import TokenLayout, token_layout
from moeport.model.workspace import Workspace


class LongcatModel(nn.Module):
    """The decoder stack (the checkpoint's `model.` prefix)."""

    def __init__(self, config: LongcatConfig, experts_here: range) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([ScMoELayer(config, experts_here) for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LongcatForCausalLM(nn.Module):
    """LongCat-Flash for next-token prediction.

    `context` (a moeport Runtime, or a ModelContext) supplies the expert-parallel
    group, the schedule, the device's expert kernels, and the device and dtype
    `load_pretrained` places the model on; without one the model holds every
    expert and runs in this process alone. `model(input_ids)` returns logits
    [B, T, vocab]; `model.generate(input_ids, max_new_tokens=N)` returns token ids
    [B, T + N]. `layout` says which rank holds which FFN expert; this rank holds
    `experts_here`.
    """

    def __init__(self, config: LongcatConfig, context: ModelContext | ProvidesModelContext | None = None) -> None:
        super().__init__()
        self.config = config
        self.context = context_of(context)
        ep = self.context.ep
        try:
            self.layout = ExpertLayout(config.n_routed_experts, ep.world_size)
        except ValueError:
            raise ValueError(f"{config.n_routed_experts} FFN experts cannot be split over {ep.world_size} ranks") from None
        self.experts_here = self.layout.local_experts(ep.rank)
        self.model = LongcatModel(config, self.experts_here)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("rope_inv_freq", rope_inverse_frequencies(config), persistent=False)
        self._rotation_table: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin [1, 1, positions, rope]
        self.schedule = self.context.schedule
        self.timeline: Timeline | None = None  # set to time every step of every layer
        self.generation_defaults = GenerationDefaults()  # the checkpoint's stop and pad ids (load_pretrained)
        workspace = Workspace()  # shared: it holds one layer's peak, not the sum over layers
        for layer in self.model.layers:
            layer.exchange = new_exchange(ep, self.layout, self.context.dispatch, self.context.max_tokens_per_rank)
            layer.mlp.experts.workspace = workspace
            layer.mlp.experts.kernels = self.context.expert_kernels

    def place(self, device: torch.device | str, dtype: torch.dtype) -> "LongcatForCausalLM":
        """Move to `device` in `dtype`, keeping the router's classifier in float32 (as the reference does)."""
        self.to(device=device, dtype=dtype)
        for layer in self.model.layers:
            layer.mlp.router.to(torch.float32)
        self.rope_inv_freq = rope_inverse_frequencies(self.config).to(device)
        self._rotation_table = None
        return self

    @property
    def device(self) -> torch.device:
        """Where the weights live."""
        return self.lm_head.weight.device

    def new_caches(self, batch: int, capacity: int) -> Caches:
        """Empty decoding caches for `batch` sequences of up to `capacity` positions."""
        return Caches.empty(len(self.model.layers), batch, capacity, self.config, self.lm_head.weight.dtype, self.device)

    def forward(self, input_ids: torch.Tensor, caches: Caches | None = None, logits_to_keep: int = 0,
                attention_mask: torch.Tensor | None = None, decoding: bool | None = None) -> torch.Tensor:
        """Logits [B, T, vocab] for token ids [B, T], continuing after what `caches` hold.

        `logits_to_keep` > 0 gives only the last that many positions' logits (as
        transformers' argument of that name): a prefill that only needs the next
        token skips the rest of the vocabulary projection. `attention_mask` [B, T]
        (1 = real token, 0 = padding, as in transformers) lets sequences of different
        lengths share a batch: each real token's logits are those of its sequence run
        alone; padding is never cached, attended to or sent to an expert (its logits
        are meaningless). `decoding` names the phase where the default (one new
        position per sequence after a cache) does not fit, as when expert-parallel
        ranks run different work in one step: every rank must pass the same.
        """
        if input_ids.device != self.device:
            input_ids = input_ids.to(self.device)
        batch, length = input_ids.shape
        if caches is not None and caches.batch != batch:
            raise ValueError(f"input_ids hold {batch} sequences; the caches {caches.batch}")
        before = caches.lengths if caches is not None else [0] * batch
        layout = token_layout(attention_mask, before, batch, length, self.device, cached=caches is not None)
        x = self.model.embed_tokens(input_ids)
        cos, sin = self._rotation_of(layout, before, length, x.dtype)
        for index, layer in enumerate(self.model.layers):
            if self.timeline is not None:
                self.timeline.layer = index
            x = layer(x, cos, sin, None if caches is None else caches[index], self.schedule, self.timeline, layout,
                      decoding)
        if caches is not None:
            caches.advance(layout.lengths_after if layout is not None else [n + length for n in before])
        if logits_to_keep > 0:
            x = x[:, -logits_to_keep:]
        return self.lm_head(self.model.norm(x))

    def _rotation_of(self, layout: TokenLayout | None, before: list[int], length: int,
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotation of this forward's positions: shared by every sequence ([1, 1, T, rope]) without a
        layout, else each token's own ([B, 1, T, rope], from its position counting real tokens only)."""
        start = before[0] if before else 0
        if layout is None:
            return self._rotation(start, length, dtype)
        cos, sin = self._rotation(0, max(max(layout.lengths_after), 1), dtype)  # every position up to the last
        index = layout.positions
        return cos[0, 0][index].unsqueeze(1), sin[0, 0][index].unsqueeze(1)

    def _rotation(self, start: int, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """rope_cos_sin for positions start .. start + length - 1 ([1, 1, length, rope]), sliced from a table
        kept from call to call (a decoding step would otherwise spend a dozen operations on it)."""
        end = start + length
        table = self._rotation_table
        if (table is None or table[0].shape[2] < end or table[0].dtype != dtype or table[0].device != self.device
                or cannot_write_here(table[0])):
            kept = table[0].shape[2] if table is not None else 0
            size = max(256, end, 2 * kept if end > kept else kept)  # grows by doubling
            positions = torch.arange(size, device=self.device).unsqueeze(0)
            table = self._rotation_table = rope_cos_sin(self.rope_inv_freq, positions, dtype)
        return table[0][:, :, start:end], table[1][:, :, start:end]

    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int = 16,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        attention_mask: torch.Tensor | None = None,
        eos_token_id: int | Sequence[int] | None = FROM_CHECKPOINT,
        pad_token_id: int | None = None,
    ) -> torch.Tensor:
        """Token ids [B, T + n], n <= max_new_tokens: greedy by default, sampled with `do_sample`.

        Sampling applies `temperature`, then keeps the `top_k` most likely tokens
        (0: all) and the smallest set whose probability reaches `top_p`.
        `attention_mask` [B, T] (1 = real, 0 = padding) runs prompts of different
        lengths together, left-padded as in transformers. Each sequence stops at its
        first token in `eos_token_id` (one id or a list; None: the checkpoint's
        generation_config.json, where it names one; an empty list: never), after which
        it is filled with `pad_token_id` (default: the checkpoint's, else the first stop
        id, else 0); n is the steps until every sequence stopped. Decodes with the KV
        cache: the prompt once, then one position per step, in torch's inference mode
        (less bookkeeping per operation than no_grad); the returned ids are an
        ordinary tensor.
        """
        return generate(self, input_ids, max_new_tokens, do_sample, temperature, top_k, top_p, seed, attention_mask,
                        eos_token_id, pad_token_id)
