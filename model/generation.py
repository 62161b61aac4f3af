"""Decoding: the next token from logits, stop tokens and padding, and the generate loop over the KV cache.

`generate` runs a (left-padded) batch: the prompts' prefill once, then one position per
sequence per step; a sequence that has produced one of its stop tokens takes the pad id
from then on and is padding to the model (nothing cached, no expert slot), and the loop
ends when every sequence has stopped or `max_new_tokens` is reached. Stop and pad ids
default to the checkpoint's generation_config.json (else its config.json), as in
transformers.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import TYPE_CHECKING, Iterable, Sequence

import torch

if TYPE_CHECKING:
    from moeport.model.lm import LongcatForCausalLM

#: `eos_token_id` / `pad_token_id` left to the checkpoint's defaults.
FROM_CHECKPOINT = None


@dataclasses.dataclass(frozen=True)
class GenerationDefaults:
    """What a checkpoint says about decoding: its stop token ids and its pad id (None: it says nothing)."""

    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    @classmethod
    def read(cls, path: str) -> "GenerationDefaults":
        """From generation_config.json in checkpoint directory `path`, else from its config.json; empty if neither
        names them."""
        for name in ("generation_config.json", "config.json"):
            file = os.path.join(path, name)
            if not os.path.isfile(file):
                continue
            with open(file) as f:
                data = json.load(f)
            eos, pad = data.get("eos_token_id"), data.get("pad_token_id")
            if eos is not None or pad is not None:
                return cls(token_ids(eos), pad)
        return cls()


def token_ids(value: int | Iterable[int] | None) -> tuple[int, ...]:
    """One id, a list of ids, or None (no ids) as a tuple."""
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def stop_and_pad(defaults: GenerationDefaults, eos_token_id: int | Sequence[int] | None,
                 pad_token_id: int | None) -> tuple[tuple[int, ...], int]:
    """The stop ids (`eos_token_id`, else the checkpoint's; an empty list: none) and the pad id (`pad_token_id`,
    else the checkpoint's, else the first stop id, else 0)."""
    stops = defaults.eos_token_ids if eos_token_id is FROM_CHECKPOINT else token_ids(eos_token_id)
    if pad_token_id is None:
        pad_token_id = defaults.pad_token_id
    if pad_token_id is None:
        pad_token_id = stops[0] if stops else 0
    return stops, pad_token_id


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompts (lists of ids, or the rows of an array) as one batch: ids [B, T] int64, each prompt right-aligned
    after `pad_id` fill (left padding, as transformers does it), and the attention mask [B, T] (1 real, 0 padding);
    the mask is None when every prompt has the same length (no padding). No prompts: ids [0, 1]."""
    lengths = [len(p) for p in prompts]
    width = max(lengths, default=1)  # a rank with no prompts runs a batch of none, one position wide
    if all(n == width for n in lengths):
        return torch.as_tensor(prompts, dtype=torch.int64).reshape(len(prompts), width), None
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(prompts), width), dtype=torch.int64)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.as_tensor(prompt, dtype=torch.int64)
        mask[row, width - len(prompt):] = 1
    return ids, mask


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


def seeded_generator(device: torch.device, seed: int | None) -> torch.Generator:
    """A generator on `device` for sampling, seeded with `seed` (None: torch's initial seed)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(torch.initial_seed() if seed is None else seed)
    return generator


def every_rank_stopped(model: "LongcatForCausalLM", stopped: torch.Tensor) -> bool:
    """Whether every sequence has stopped, on every expert-parallel rank: each step is a collective (the experts'
    exchange), so the ranks, each with its own sequences, stop together."""
    live = (~stopped).sum().reshape(1).to(torch.int64)
    if model.context.ep.world_size > 1:
        live = model.context.ep.all_reduce(live)
    return int(live.item()) == 0


def generate(
    model: "LongcatForCausalLM", input_ids: torch.Tensor, max_new_tokens: int, do_sample: bool, temperature: float,
    top_k: int, top_p: float, seed: int | None, attention_mask: torch.Tensor | None,
    eos_token_id: int | Sequence[int] | None, pad_token_id: int | None,
) -> torch.Tensor:
    """LongcatForCausalLM.generate (see there)."""
    input_ids = input_ids.to(model.device)
    stops, pad = stop_and_pad(model.generation_defaults, eos_token_id, pad_token_id)
    generator = seeded_generator(model.device, seed) if do_sample else None
    tokens = [input_ids]
    batch = input_ids.shape[0]
    with torch.inference_mode():
        caches = model.new_caches(batch, input_ids.shape[1] + max_new_tokens)
        logits = model(input_ids, caches, logits_to_keep=1, attention_mask=attention_mask, decoding=False)[:, -1]
        stop_ids = torch.tensor(stops, dtype=input_ids.dtype, device=model.device)
        stopped = torch.zeros(batch, 1, dtype=torch.bool, device=model.device)
        for step in range(max_new_tokens):
            next_token = pick_next_token(logits, do_sample, temperature, top_k, top_p, generator)
            if stops:
                next_token = next_token.masked_fill(stopped, pad)
                stopped = stopped | torch.isin(next_token, stop_ids)
            tokens.append(next_token)
            if step + 1 == max_new_tokens or (stops and every_rank_stopped(model, stopped)):
                break
            step_mask = (~stopped).to(input_ids.dtype) if stops else None  # a stopped sequence is padding
            logits = model(next_token, caches, logits_to_keep=1, attention_mask=step_mask, decoding=True)[:, -1]
    return torch.cat(tokens, dim=1)  # outside inference mode: an ordinary tensor
