"""The decoding cache: per attention block, the compressed latent and rope key of every position seen so far.

`LatentCache` is one attention block's storage; `Caches` holds every layer's two blocks
and each sequence's length (the positions it holds: every block holds the same). While
all sequences hold the same number of positions, new positions are appended as one
column range; once they differ (padding, sequences that joined later, a slot reset for
a new sequence), each real token is written at its own column (`TokenLayout`).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import torch

from moeport.model.config import LongcatConfig


@dataclasses.dataclass
class LatentCache:
    """One attention block's cache: for each position, the scaled normed latent [kv_lora_rank] and then the
    rotated rope key [rope], side by side in one tensor `keys` [B, S, kv_lora_rank + rope]. `length` is the
    number of columns in use (the longest sequence's positions)."""

    keys: torch.Tensor
    kv_lora_rank: int
    length: int = 0

    @classmethod
    def empty(cls, batch: int, capacity: int, config: LongcatConfig, dtype: torch.dtype,
              device: torch.device) -> "LatentCache":
        """A cache with room for `capacity` positions (zeros: a column never written reads as finite)."""
        width = config.kv_lora_rank + config.qk_rope_head_dim
        return cls(torch.zeros(batch, capacity, width, dtype=dtype, device=device), config.kv_lora_rank)

    def _check_room(self, end: int) -> None:
        if end > self.keys.shape[1]:
            raise ValueError(f"KV cache holds {self.keys.shape[1]} positions; {end} needed")

    def append(self, latent: torch.Tensor, k_rope: torch.Tensor) -> None:
        """Store new positions of every sequence alike: latent [B, T, kv_lora_rank], rotated rope key [B, T, rope]."""
        end = self.length + latent.shape[1]
        self._check_room(end)
        self.keys[:, self.length:end] = torch.cat([latent, k_rope], dim=-1)
        self.length = end

    def write(self, sequences: torch.Tensor, columns: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
              length: int) -> None:
        """Store one position per row: row i of latent [N, kv_lora_rank] and k_rope [N, rope] at
        (sequences[i], columns[i]); `length` columns are in use afterwards."""
        self._check_room(length)
        self.keys.index_put_((sequences, columns), torch.cat([latent, k_rope], dim=-1))
        self.length = length

    def cached(self) -> torch.Tensor:
        """Every column in use: [B, length, kv_lora_rank + rope]."""
        return self.keys[:, : self.length]


class Caches:
    """Every layer's decoding caches (`caches[layer]` is its two blocks' LatentCache) and each sequence's
    length, for `batch` sequences (slots) of up to `capacity` positions."""

    def __init__(self, blocks: list[tuple[LatentCache, LatentCache]], batch: int) -> None:
        self.blocks = blocks
        self.lengths = [0] * batch

    @classmethod
    def empty(cls, layers: int, batch: int, capacity: int, config: LongcatConfig, dtype: torch.dtype,
              device: torch.device) -> "Caches":
        """Empty caches for `layers` layers of two attention blocks each."""
        blocks = [tuple(LatentCache.empty(batch, capacity, config, dtype, device) for _ in range(2))
                  for _ in range(layers)]
        return cls(blocks, batch)

    def __getitem__(self, layer: int) -> tuple[LatentCache, LatentCache]:
        return self.blocks[layer]

    def __len__(self) -> int:
        return len(self.blocks)

    def __iter__(self) -> Iterator[tuple[LatentCache, LatentCache]]:
        return iter(self.blocks)

    @property
    def batch(self) -> int:
        """How many sequences (slots) the caches hold."""
        return len(self.lengths)

    @property
    def capacity(self) -> int:
        """Positions each sequence has room for."""
        return self.blocks[0][0].keys.shape[1] if self.blocks else 0

    def _set_lengths(self, lengths: list[int]) -> None:
        self.lengths = list(lengths)
        for pair in self.blocks:
            for block in pair:
                block.length = max(self.lengths, default=0)

    def advance(self, lengths: list[int]) -> None:
        """Record each sequence's length after a forward (the blocks have been written)."""
        self.lengths = list(lengths)

    def reset(self, slot: int) -> None:
        """Empty one sequence's slot for a new sequence (its old columns are no longer seen)."""
        lengths = list(self.lengths)
        lengths[slot] = 0
        self._set_lengths(lengths)

    def copy_in(self, slots: list[int], source: "Caches", rows: list[int] | None = None) -> None:
        """Put `source`'s sequences `rows` (default: all, in order) into this cache's `slots`, positions and
        lengths (e.g. the prefill of new sequences, run on their own, joining a decoding batch)."""
        rows = list(range(source.batch)) if rows is None else rows
        if len(rows) != len(slots):
            raise ValueError(f"{len(rows)} source sequences for {len(slots)} slots")
        lengths = list(self.lengths)
        for slot, row in zip(slots, rows):
            n = source.lengths[row]
            if n > self.capacity:
                raise ValueError(f"KV cache holds {self.capacity} positions; {n} needed")
            for mine, theirs in zip(self.blocks, source.blocks):
                for dst, src in zip(mine, theirs):
                    dst.keys[slot, :n] = src.keys[row, :n]
            lengths[slot] = n
        self._set_lengths(lengths)
