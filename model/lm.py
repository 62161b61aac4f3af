"""The LongCat-Flash causal language model: embedding, ScMoE layers, final norm, lm_head; decoding.

Built for one rank of a Runtime (its expert-parallel group decides which FFN experts
this rank holds), or for one process with no Runtime at all (every expert local).
Tensor names follow the HF checkpoint: model.embed_tokens, model.layers.N...., model.norm, lm_head.
"""

from __future__ import annotations

import torch
from torch import nn

from moeport.base.buffers import cannot_write_here
from moeport.collectives.expert_layout import ExpertLayout
from moeport.model.config import LongcatConfig
from moeport.model.context import ModelContext, ProvidesModelContext, context_of
from moeport.model.exchange import new_exchange
from moeport.model.layer import ScMoELayer
from moeport.model.mla import LatentCache, rope_cos_sin, rope_inverse_frequencies
from moeport.model.norm import RMSNorm
from moeport.model.timeline import Timeline
from moeport.model.workspace import Workspace

Caches = list[tuple[LatentCache, LatentCache]]


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
        dtype, device = self.lm_head.weight.dtype, self.device
        return [
            (LatentCache.empty(batch, capacity, self.config, dtype, device), LatentCache.empty(batch, capacity, self.config, dtype, device))
            for _ in self.model.layers
        ]

    def forward(self, input_ids: torch.Tensor, caches: Caches | None = None, logits_to_keep: int = 0) -> torch.Tensor:
        """Logits [B, T, vocab] for token ids [B, T], continuing after what `caches` hold.

        `logits_to_keep` > 0 gives only the last that many positions' logits (as
        transformers' argument of that name): a prefill that only needs the next
        token skips the rest of the vocabulary projection.
        """
        if input_ids.device != self.device:
            input_ids = input_ids.to(self.device)
        start = caches[0][0].length if caches else 0
        x = self.model.embed_tokens(input_ids)
        cos, sin = self._rotation(start, input_ids.shape[1], x.dtype)
        for index, layer in enumerate(self.model.layers):
            if self.timeline is not None:
                self.timeline.layer = index
            x = layer(x, cos, sin, None if caches is None else caches[index], self.schedule, self.timeline)
        if logits_to_keep > 0:
            x = x[:, -logits_to_keep:]
        return self.lm_head(self.model.norm(x))

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
    ) -> torch.Tensor:
        """Token ids [B, T + max_new_tokens]: greedy by default, sampled with `do_sample`.

        Sampling applies `temperature`, then keeps the `top_k` most likely tokens
        (0: all) and the smallest set whose probability reaches `top_p`.
        Decodes with the KV cache: the prompt once, then one position per step, in
        torch's inference mode (less bookkeeping per operation than no_grad); the
        returned ids are an ordinary tensor.
        """
        input_ids = input_ids.to(self.device)
        generator = None
        if do_sample:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(torch.initial_seed() if seed is None else seed)
        tokens = [input_ids]
        with torch.inference_mode():
            caches = self.new_caches(input_ids.shape[0], input_ids.shape[1] + max_new_tokens)
            logits = self(input_ids, caches, logits_to_keep=1)[:, -1]
            for step in range(max_new_tokens):
                next_token = pick_next_token(logits, do_sample, temperature, top_k, top_p, generator)
                tokens.append(next_token)
                if step + 1 < max_new_tokens:
                    logits = self(next_token, caches, logits_to_keep=1)[:, -1]
        return torch.cat(tokens, dim=1)  # outside inference mode: an ordinary tensor


def pick_next_token(
    logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """The next token [B, 1] from last-position logits [B, vocab]."""
    if not do_sample:
        return logits.argmax(dim=-1, keepdim=True)
    scores = logits.to(torch.float32) / max(temperature, 1e-6)
    if top_k > 0:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = scores.sort(dim=-1, descending=True)
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative - ordered.softmax(-1) >= top_p
        drop[..., 0] = False  # the most likely token reaches any top_p: top_p <= 0 is greedy, not an empty set
        scores = scores.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    return torch.multinomial(scores.softmax(-1), 1, generator=generator)
