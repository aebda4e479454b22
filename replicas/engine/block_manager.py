"""KV block ownership: a free-list allocator with refcounts and a prefix cache, and the
per-sequence operations the scheduler needs (admit, reserve, trim, release).

Contract:
- `BlockAllocator` hands out block ids of a pool of `num_blocks`. Every block is in exactly one
  state: free (on the free list), referenced (refcount >= 1), or cached-unreferenced (holds a
  prefix-cache key, refcount 0, evictable, least recently released first). `allocate` takes a
  free block, else evicts the least recently used cached one; `release` drops one reference.
- Prefix caching: a full block of prefill tokens is keyed by (its parent block's key, its
  tokens), so a key names a whole prefix. `BlockManager.admit` looks the prompt's full blocks up
  in order and shares the hits (refcount + 1); the rest of the prompt is prefilled as usual and
  `register` publishes each full block once its K/V are written. At least one prompt token is
  always recomputed (the first output token needs its logits). Only blocks filled by causal
  prefill passes are published, and a published block is never written again: every later
  write of a sequence lands at or past its prefill length.
- `BlockManager.reserve(kv, columns)` makes `kv.blocks` cover `columns` (a pass's lookahead:
  AR token, self-spec draft or verify, diffusion canvas, prefill chunk), and `trim` frees the
  whole blocks past `kv.length` (after a rejected draft). `release` frees all of a sequence's
  blocks. Each keeps the cache's block table row of the sequence's slot in step.
Non-goals: choosing victims or admission order (the scheduler does), storing K/V (`kv_cache`).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Hashable

from .kv_cache import KVCache, SequenceKV


class BlockAllocator:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_kv_blocks: must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.refs = [0] * num_blocks
        self.free: deque[int] = deque(range(num_blocks))
        self.by_key: dict[Hashable, int] = {}
        self.key_of: dict[int, Hashable] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached, refcount 0; LRU first

    @property
    def num_free(self) -> int:
        """Blocks `allocate` can hand out: free plus evictable cached ones."""
        return len(self.free) + len(self.evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def allocate(self) -> int | None:
        if self.free:
            block = self.free.popleft()
        elif self.evictable:
            block, _ = self.evictable.popitem(last=False)
            del self.by_key[self.key_of.pop(block)]
        else:
            return None
        self.refs[block] = 1
        return block

    def acquire(self, block: int) -> None:
        """One more reference to a cached block (a prefix hit)."""
        if self.refs[block] == 0:
            del self.evictable[block]
        self.refs[block] += 1

    def release(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] > 0:
            return
        if self.refs[block] < 0:
            raise RuntimeError(f"KV block {block} released more often than referenced")
        if block in self.key_of:
            self.evictable[block] = None
        else:
            self.free.append(block)

    def lookup(self, key: Hashable) -> int | None:
        return self.by_key.get(key)

    def register(self, block: int, key: Hashable) -> None:
        """Publish a referenced, fully written block under `key` (first writer wins)."""
        if key not in self.by_key and block not in self.key_of:
            self.by_key[key] = block
            self.key_of[block] = key

    def check(self) -> None:
        """Every block in exactly one state; the key maps agree (tests call this)."""
        free, evictable = set(self.free), set(self.evictable)
        referenced = {b for b, r in enumerate(self.refs) if r > 0}
        assert len(free) == len(self.free) and not (free & evictable) and not (free & referenced)
        assert not (evictable & referenced) and len(free | evictable | referenced) == self.num_blocks
        assert all(r >= 0 for r in self.refs) and evictable <= set(self.key_of) and not (free & set(self.key_of))
        assert all(self.by_key[k] == b for b, k in self.key_of.items()) and len(self.by_key) == len(self.key_of)


def prefix_keys(tokens: list[int], block_size: int) -> list[Hashable]:
    """Keys of the full blocks of `tokens`: block i's key is (hash of block i-1's key, its tokens)."""
    keys: list[Hashable] = []
    parent = 0
    for i in range(len(tokens) // block_size):
        key = (parent, tuple(tokens[i * block_size : (i + 1) * block_size]))
        keys.append(key)
        parent = hash(key)
    return keys


class BlockManager:
    def __init__(self, cache: KVCache, *, enable_prefix_caching: bool, watermark: float) -> None:
        self.cache = cache
        self.block_size = cache.block_size
        self.allocator = BlockAllocator(cache.num_blocks)
        self.prefix_caching = enable_prefix_caching
        self.watermark_blocks = int(watermark * cache.num_blocks)
        self.queries = 0  # full prompt blocks looked up at admission
        self.hits = 0  # of which were found in the cache

    def blocks_for(self, columns: int) -> int:
        return -(-columns // self.block_size)

    def admit(self, kv: SequenceKV, keys: list[Hashable], prompt_len: int, *, alone: bool) -> bool:
        """Try to admit a sequence whose prefill covers `prompt_len` tokens with full-block `keys`:
        share its cached prefix and check that the rest of the prompt fits, keeping the watermark
        free unless nothing else runs (`alone`). On success `kv` holds the hit blocks and its length
        is the cached prefix; on failure nothing changed."""
        hits: list[int] = []
        if self.prefix_caching:
            for key in keys[: (prompt_len - 1) // self.block_size]:
                block = self.allocator.lookup(key)
                if block is None:
                    break
                hits.append(block)
        evictable_hits = sum(1 for b in hits if self.allocator.refs[b] == 0)
        need = self.blocks_for(prompt_len) - len(hits)
        spare = self.allocator.num_free - evictable_hits - need
        if spare < (0 if alone else self.watermark_blocks):
            return False
        for block in hits:
            self.allocator.acquire(block)
        if self.prefix_caching:
            self.queries += min(len(keys), (prompt_len - 1) // self.block_size)
            self.hits += len(hits)
        kv.blocks = hits
        kv.length = len(hits) * self.block_size
        self.cache.set_blocks(kv.slot, hits)
        return True

    def reserve(self, kv: SequenceKV, columns: int) -> bool:
        """Allocate blocks until `kv` covers `columns` columns; False when the pool ran dry (the
        blocks taken so far stay with the sequence)."""
        need = self.blocks_for(columns)
        while len(kv.blocks) < need:
            block = self.allocator.allocate()
            if block is None:
                return False
            self.cache.tables[kv.slot, len(kv.blocks)] = block
            kv.blocks.append(block)
        return True

    def trim(self, kv: SequenceKV) -> None:
        """Free the whole blocks past the valid length (rejected drafts, a finished canvas)."""
        keep = self.blocks_for(kv.length)
        while len(kv.blocks) > keep:
            self.cache.tables[kv.slot, len(kv.blocks) - 1] = self.cache.scratch_block
            self.allocator.release(kv.blocks.pop())

    def release(self, kv: SequenceKV) -> None:
        for block in reversed(kv.blocks):  # the prefix's tail first: the LRU evicts leaves first
            self.allocator.release(block)
        kv.blocks = []
        self.cache.set_blocks(kv.slot, [])

    def register(self, kv: SequenceKV, keys: list[Hashable], start: int) -> int:
        """Publish the full blocks `keys[start:]` whose K/V are written (below `kv.length`);
        returns how many keys are now published or skipped."""
        done = min(len(keys), kv.length // self.block_size)
        if self.prefix_caching:
            for i in range(start, done):
                self.allocator.register(kv.blocks[i], keys[i])
        return max(start, done)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0
