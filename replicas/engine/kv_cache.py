"""Paged key/value pool: blocks of `block_size` columns, reached through per-slot block tables.

Contract: `KVCache` stores K/V as [layers, num_blocks + 1, block_size, kv_heads, head_dim]. The
last block is scratch: padding tokens write into it and no mask ever reads it as data. A
sequence decoded by the engine holds a slot, a row of `tables` ([num_slots, blocks_per_seq]
int64, on the host): entry i is the block holding its columns [i * block_size, (i + 1) *
block_size); entries it does not own point at the scratch block. Every forward writes the K/V
of its tokens at their flat locations (`block * block_size + offset`, see `locations`) and
every pass type (causal, bidirectional canvas, any boolean mask) reads a row's first S columns
by gathering its blocks (`read`): on a CPU this gather plus SDPA is the attention kernel, and
under CUDA graphs the block tables are static inputs, so the gather is captured too.
`block_size=None` makes the contiguous layout: one block of `max_len + 1` columns per slot,
slot s owning block s (the reference layout of the paged == contiguous tests).
`SequenceKV` is one sequence's slot, valid length and block list. Whether a column is valid is
decided by `SequenceKV.length` only: bidirectional passes write columns at or past it, which the
next causal pass overwrites; `truncate` crops rejected drafts.
Non-goals: who owns which block (see `block_manager`), attention itself (see `model`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class KVCache:
    """K/V blocks for `num_slots` sequences of up to `max_len` columns each."""

    def __init__(
        self,
        *,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        block_size: int | None = None,
        num_blocks: int | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if num_slots < 1 or max_len < 1:
            raise ValueError(f"KVCache needs num_slots >= 1 and max_len >= 1, got {num_slots}, {max_len}")
        self.paged = block_size is not None
        if self.paged:
            if block_size < 1 or num_blocks is None or num_blocks < 1:
                raise ValueError(f"KVCache needs block_size >= 1 and num_blocks >= 1, got {block_size}, {num_blocks}")
        else:
            block_size, num_blocks = max_len + 1, num_slots
        shape = (num_layers, num_blocks + 1, block_size, num_kv_heads, head_dim)  # block num_blocks: scratch
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.num_slots, self.max_len = num_slots, max_len
        self.block_size, self.num_blocks = block_size, num_blocks
        self.scratch_block = num_blocks
        self.scratch_index = num_blocks * block_size  # the flat location padding tokens write
        self.blocks_per_seq = -(-(max_len + 1) // block_size)  # columns [0, max_len] fit a table row
        self.tables = torch.full((num_slots, self.blocks_per_seq), self.scratch_block, dtype=torch.long)
        if not self.paged:
            self.tables[:, 0] = torch.arange(num_slots)

    @staticmethod
    def block_bytes(*, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype) -> int:
        """Bytes of K and V for one block across all layers."""
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def set_blocks(self, slot: int, blocks: list[int]) -> None:
        """Point `slot`'s table at `blocks` (the rest at scratch)."""
        row = self.tables[slot]
        row.fill_(self.scratch_block)
        if blocks:
            row[: len(blocks)] = torch.tensor(blocks, dtype=torch.long)

    def locations(self, tables: torch.Tensor, positions: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Flat write locations [R, T] of columns `positions` [R, T] through `tables` [R, W]; tokens
        that are not `real` [R, T] go to the scratch location. A real token whose block is not
        allocated is an engine bug: it raises rather than write scratch silently."""
        bs = self.block_size
        block = tables.gather(1, torch.where(real, positions // bs, 0))  # [R, T]
        if self.paged and bool((real & (block == self.scratch_block)).any()):
            raise RuntimeError("KV cache: a token's column has no allocated block")
        return torch.where(real, block * bs + positions % bs, self.scratch_index)

    def write(self, layer: int, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """index [B, T] flat locations, k/v [B, Hkv, T, D]."""
        flat = index.reshape(-1)  # [B*T]
        hkv, d = k.shape[1], k.shape[3]
        self.k[layer].view(-1, hkv, d).index_copy_(0, flat, k.transpose(1, 2).reshape(-1, hkv, d))
        self.v[layer].view(-1, hkv, d).index_copy_(0, flat, v.transpose(1, 2).reshape(-1, hkv, d))

    def read(self, layer: int, tables: torch.Tensor, columns: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V [R, Hkv, columns, D] of the rows whose block tables are `tables` [R, NB]
        (NB * block_size >= columns): one gather of their blocks."""
        r, nb = tables.shape
        flat = tables.reshape(-1)  # [R*NB]
        shape = (r, nb * self.block_size, self.k.shape[3], self.k.shape[4])
        k = self.k[layer].index_select(0, flat).view(shape)[:, :columns]  # [R, S, Hkv, D]
        v = self.v[layer].index_select(0, flat).view(shape)[:, :columns]
        return k.transpose(1, 2), v.transpose(1, 2)


@dataclass
class SequenceKV:
    """The cached prefix of one sequence: columns [0, length) hold valid K/V, stored in `blocks`
    (block i = columns [i * block_size, (i + 1) * block_size)) and listed in row `slot` of the
    cache's tables."""

    slot: int
    length: int = 0
    blocks: list[int] = field(default_factory=list)

    def append(self, count: int) -> None:
        """A causal pass made `count` more columns valid."""
        self.length += count

    def truncate(self, length: int) -> None:
        """Drop every column from `length` on (rejected drafts); whole blocks past it are freed
        by the block manager at the sequence's next cycle boundary."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a KV prefix of {self.length} to {length}")
        self.length = length
