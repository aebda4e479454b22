"""Preallocated key/value pool indexed by slot, plus per-sequence length bookkeeping.

Contract: `KVCache` stores K/V as [layers, slots, kv_heads, max_len + 1, head_dim]; column
`max_len` is a scratch column that padded tokens write into and no mask ever reads. Every
forward writes the K/V of its tokens at their positions; whether those columns become part
of the sequence is decided by `SequenceKV`: causal passes `append` (the length advances),
bidirectional passes leave the length unchanged (their columns are scratch that the next
causal pass overwrites), and `truncate` crops rejected drafts in O(1). Masks only ever let a
query see columns below the length it is allowed to read, so stale columns are never read.
Non-goals: paging; sharing prefixes between sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class KVCache:
    """K/V pool for `num_slots` sequences of up to `max_len` positions each."""

    def __init__(
        self,
        *,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if num_slots < 1 or max_len < 1:
            raise ValueError(f"KVCache needs num_slots >= 1 and max_len >= 1, got {num_slots}, {max_len}")
        shape = (num_layers, num_slots, num_kv_heads, max_len + 1, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.num_slots = num_slots
        self.max_len = max_len
        self.scratch_column = max_len

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def write(
        self, layer: int, slots: torch.Tensor, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """slots [B], index [B, T] columns, k/v [B, Hkv, T, D]."""
        rows = slots[:, None]  # [B, 1] broadcast against index [B, T]
        self.k[layer][rows, :, index] = k.transpose(1, 2)  # target view [B, T, Hkv, D]
        self.v[layer][rows, :, index] = v.transpose(1, 2)

    def read(
        self, layer: int, slots: torch.Tensor, length: int, slot_start: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V [B, Hkv, length, D] of `slots`; a view (no copy) when they are a contiguous range."""
        k = self.k[layer][:, :, :length]
        v = self.v[layer][:, :, :length]
        if slot_start is not None:
            b = slots.shape[0]
            return k[slot_start : slot_start + b], v[slot_start : slot_start + b]
        return k.index_select(0, slots), v.index_select(0, slots)


@dataclass
class SequenceKV:
    """The cached prefix of one sequence: columns [0, length) of `slot` hold valid K/V."""

    slot: int
    length: int = 0

    def append(self, count: int) -> None:
        """A causal pass made `count` more columns valid."""
        self.length += count

    def truncate(self, length: int) -> None:
        """Drop every column from `length` on (rejected drafts)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a KV prefix of {self.length} to {length}")
        self.length = length
