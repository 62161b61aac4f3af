"""Where a forward's tokens sit when sequences differ in length: padding, positions, cache columns, visibility.

A batch [B, T] of token ids may hold padding (`attention_mask` 0, as in transformers:
left padding for generation, though any pattern works), and a decoding cache may hold a
different number of positions for each sequence. `TokenLayout` says, once per forward
and for every layer alike:

- which positions are real (`real` [B, T]) and which rows of the flattened batch they
  are (`real_rows`): only those take expert slots;
- each real token's rotary position, counting the sequence's real tokens only
  (`positions` [B, T]; a padded position gets 0);
- the cache column each real token is written to: its position, so every sequence's
  cache is compact from column 0 (`lengths_after` columns in use per sequence);
- which keys each query may see (`key_mask`): with a cache, the columns up to its own
  position; without one, the real tokens up to itself in the batch. A padded query sees
  one key (column 0, or itself), so its row stays finite; its output is never used.

Where no position is padding and every sequence has the same cached length, there is no
layout (None) and the model takes its uniform path, unchanged.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class TokenLayout:
    """The layout of one forward's tokens (see the module docstring); built by `token_layout`."""

    real: torch.Tensor  # [B, T] bool
    real_rows: torch.Tensor  # [N] int64: rows of the flattened [B * T] batch that are real
    positions: torch.Tensor  # [B, T] int64: rotary position (= cache column) of each real token, 0 for padding
    lengths_before: list[int]  # cached positions per sequence before this forward
    lengths_after: list[int]  # and after it
    key_mask: torch.Tensor  # [B, 1, T, keys] bool: key j visible to query t (keys: cache columns, or T)
    cached: bool  # keys are cache columns (True) or this forward's positions (False)

    @property
    def key_length(self) -> int:
        """How many keys each query row spans: the longest sequence's cache after this forward, or T."""
        return self.key_mask.shape[-1]

    def write_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sequence, column) of each real token in the cache, in real_rows order."""
        b, t = self.real.shape
        rows = self.real_rows
        return rows // t, self.positions.reshape(-1).index_select(0, rows)


def token_layout(
    attention_mask: torch.Tensor | None, lengths_before: list[int], batch: int, length: int, device: torch.device,
    cached: bool,
) -> TokenLayout | None:
    """The layout of a forward of [batch, length] tokens after `lengths_before` cached positions per sequence
    (with a cache when `cached`), or None where every position is real and the cached lengths are equal.

    `attention_mask` [batch, length]: 1 (or True) for a real token, 0 for padding; None: all real.
    """
    if attention_mask is not None and tuple(attention_mask.shape) != (batch, length):
        raise ValueError(f"attention_mask must be [{batch}, {length}] like input_ids, got {list(attention_mask.shape)}")
    uniform = len(set(lengths_before)) <= 1
    if attention_mask is None and uniform:
        return None
    real = (torch.ones(batch, length, dtype=torch.bool, device=device) if attention_mask is None
            else attention_mask.to(device=device, dtype=torch.bool))
    counts = real.sum(dim=1).tolist()  # the one host synchronisation of a padded forward
    if attention_mask is not None and uniform and all(c == length for c in counts):
        return None  # a mask of ones
    before = torch.tensor(lengths_before, dtype=torch.int64, device=device)
    positions = torch.where(real, before[:, None] + real.cumsum(dim=1) - 1, 0)
    after = [b + c for b, c in zip(lengths_before, counts)]
    if cached:
        columns = torch.arange(max(max(after), 1), device=device)
        key_mask = columns[None, None, :] <= positions[:, :, None]  # padded queries (position 0) see column 0
    else:
        order = torch.arange(length, device=device)
        causal = order[None, :] <= order[:, None]  # [T, T]: key t' <= query t
        itself = order[None, :] == order[:, None]
        key_mask = causal[None] & (real[:, None, :] | itself[None])
    return TokenLayout(
        real=real, real_rows=real.reshape(-1).nonzero().squeeze(1), positions=positions,
        lengths_before=list(lengths_before), lengths_after=after, key_mask=key_mask.unsqueeze(1), cached=cached,
    )
