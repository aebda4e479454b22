"""Run many sequences' forward passes as ONE batched model forward, packed by pass length.

Layout: passes are grouped by token count (and by the columns they read, see `column_bucket`);
a group's rows are laid out one after another, and the groups one after another, as one
flat row of N = sum of the groups' rows x tokens (so an AR token, a 32-token canvas and a
500-token prefill chunk share a forward without padding each other). Real token i of a pass
writes its K/V to column p = start + i of its sequence, at the flat cache location its block
table gives, and takes RoPE position p unless the pass names its `positions` (quadratic
self-spec stores mask groups at fresh columns while their positions overlap the drafts');
padding tokens write to the scratch location and use position 0. The o_proj LoRA weight is
per token (`ForwardPass.lora_weights`: all of a draft pass, or only a quadratic pass's mask
rows). The boolean mask (over columns) lets a real query see every column <= p (causal pass), every
column < start + T_b (bidirectional pass: the cached prefix and the whole canvas), or the
cached prefix plus the pass's own [T, T] `mask` (any other pattern); a padding query sees
column 0 only, so it stays finite. A group reads S = max over its rows of start + T_b columns.
Contract: `run(items)` takes (slot, ForwardPass) pairs, the slot naming the block-table row of
the pass's sequence, and returns per item float32 logits [T_b, V] (or [1, V]: last only);
`run_with_greedy(items)` also returns each item's greedy token at its last position.
Non-goals: deciding which passes run (the scheduler), owning blocks (the block manager), sampling
(the greedy pick is `sampling.greedy_tokens`, applied to the batch).
"""

from __future__ import annotations

import torch

from .kv_cache import KVCache
from .model import AttentionGroup, AttentionInputs, NLDModel
from .sampling import greedy_tokens
from .sequence import ForwardPass

Items = list[tuple[int, ForwardPass]]


def column_bucket(columns: int) -> int:
    """`columns` rounded up to a multiple of 64, or of an eighth of the power of two above it
    when larger (700 -> 768, 3,000 -> 3,072): a row reads at most a quarter (or 64 columns)
    beyond its need, and a step has at most 8 groups per doubling of the context."""
    step = max(64, 1 << max(0, (columns - 1).bit_length() - 3))
    return -(-columns // step) * step


class ModelRunner:
    def __init__(self, model: NLDModel, cache: KVCache) -> None:
        self.model = model
        self.cache = cache
        self.device = model.encoder.embed_tokens.weight.device

    def build_group(self, items: Items, shape: tuple[int, int, int] | None = None) -> dict[str, torch.Tensor]:
        """Host inputs of one group, rows left-aligned. `shape` = (rows, tokens, columns) pads it to
        a bucket: extra rows are all padding (scratch blocks, no real token), extra columns masked."""
        b = len(items)
        rows, t, s = shape if shape else (b, max(len(p.tokens) for _, p in items), None)
        pad = rows - b
        lengths = torch.tensor([len(p.tokens) for _, p in items] + [0] * pad)  # [R]; padding rows: no token
        starts = torch.tensor([p.start for _, p in items] + [0] * pad)  # [R]
        causal = torch.tensor([p.causal for _, p in items] + [True] * pad)  # [R]
        slots = torch.tensor([slot for slot, _ in items] + [0] * pad)  # [R]
        lora = torch.tensor([p.lora_weights() + [0.0] * (t - len(p.tokens)) for _, p in items] + [[0.0] * t] * pad
                            ).view(rows, t)  # [R, T]
        tokens = torch.tensor([p.tokens + [0] * (t - len(p.tokens)) for _, p in items] + [[0] * t] * pad,
                              dtype=torch.long).view(rows, t)  # [R, T]
        tables = self.cache.tables.index_select(0, slots)  # [R, W]
        tables[b:] = self.cache.scratch_block
        offs = torch.arange(t)[None, :]  # [1, T]
        real = offs < lengths[:, None]  # [R, T]
        columns = torch.where(real, starts[:, None] + offs, 0)  # [R, T] where each token's K/V is stored
        positions = columns
        if any(p.positions is not None for _, p in items):  # RoPE positions that differ from the columns
            positions = columns.clone()
            for i, (_, p) in enumerate(items):
                if p.positions is not None:
                    positions[i, : len(p.tokens)] = torch.tensor(p.positions)
        write_index = self.cache.locations(tables, columns, real)  # [R, T]
        canvas_end = (starts + lengths - 1)[:, None]  # [R, 1] last column of the row's tokens
        limit = torch.where(causal[:, None], columns, canvas_end)  # [R, T]
        limit = torch.where(real, limit, 0)
        s = s or int((starts + lengths).max())
        mask = torch.arange(s)[None, None, :] <= limit[:, :, None]  # [R, T, S]
        for i, (_, p) in enumerate(items):
            if p.mask is not None:  # the prefix, then the pass's own pattern, nothing beyond
                n, st = len(p.tokens), p.start
                mask[i, :n, :st] = True
                mask[i, :n, st : st + n] = p.mask.to(torch.bool)
                mask[i, :n, st + n :] = False
        nb = -(-s // self.cache.block_size)
        return {"tokens": tokens, "positions": positions, "write_index": write_index,
                "tables": tables[:, :nb].contiguous(), "mask": mask[:, None],
                "lora": lora}

    def adapters_used(self, items: Items) -> tuple[int, ...]:
        """The loaded adapters some pass of `items` asks for (sorted ids; () = none)."""
        return tuple(sorted({p.adapter for _, p in items if p.wants_lora and self.model.has_adapter(p.adapter)}))

    def groups(self, items: Items) -> list[list[int]]:
        """Item indices grouped by token count (no padding inside a group) and by the columns they
        read, shortest first. A group gathers and attends over its longest row's columns, so rows
        are grouped with rows of similar context (`column_bucket`): on a CPU the gather and the
        attention of a decode step dominate at long contexts."""
        by_key: dict[tuple[int, int], list[int]] = {}
        for i, (_, p) in enumerate(items):
            by_key.setdefault((len(p.tokens), column_bucket(p.start + len(p.tokens))), []).append(i)
        return [by_key[k] for k in sorted(by_key)]

    def build_inputs(self, items: Items) -> tuple[torch.Tensor, torch.Tensor, AttentionInputs, list[int]]:
        """(tokens [1, N], positions [1, N], attention inputs, each item's first flat token)."""
        dev = self.device
        offsets = [0] * len(items)
        parts, groups, start = [], [], 0
        for idx in self.groups(items):
            host = self.build_group([items[i] for i in idx])
            rows, t = host["tokens"].shape
            for r, i in enumerate(idx):
                offsets[i] = start + r * t
            groups.append(AttentionGroup(start, rows, t, host["tables"].to(dev), host["mask"].to(dev)))
            parts.append(host)
            start += rows * t

        def flat(name: str) -> torch.Tensor:
            if len(parts) == 1:
                return parts[0][name].reshape(1, -1).to(dev)  # [1, N]
            return torch.cat([h[name].reshape(-1) for h in parts])[None].to(dev)  # [1, N]

        adapters = self.adapters_used(items)
        attn = AttentionInputs(write_index=flat("write_index"), groups=tuple(groups),
                               lora_weight=flat("lora") if adapters else None, lora_adapters=adapters)
        return flat("tokens"), flat("positions"), attn, offsets

    def forward(self, items: Items) -> tuple[torch.Tensor, list[int]]:
        """(hidden states [N, hidden] of the packed pass, each item's first row in it)."""
        tokens, positions, attn, offsets = self.build_inputs(items)
        return self.model(tokens, positions, self.cache, attn)[0], offsets  # [N, hidden]

    @torch.inference_mode()
    def run(self, items: Items) -> list[torch.Tensor]:
        logits, counts = self._logits(items)
        return list(logits.split(counts))

    @torch.inference_mode()
    def run_with_greedy(self, items: Items) -> tuple[list[torch.Tensor], list[int]]:
        """(each item's logits, each item's greedy token at its last position). The greedy tokens
        (argmax with the mask token banned, `sampling.greedy_tokens`) come from ONE argmax over the
        batch's last rows and one transfer to the host, instead of an argmax and a device sync per
        request."""
        logits, counts = self._logits(items)
        last = torch.tensor(counts).cumsum(0).sub_(1).to(logits.device)  # [items] each item's last row
        tails = logits.index_select(0, last)  # [items, V], a copy: the returned logits keep the mask's logit
        return list(logits.split(counts)), greedy_tokens(tails, self.model.config.mask_token_id)

    def _logits(self, items: Items) -> tuple[torch.Tensor, list[int]]:
        """(the logits of every item's asked positions [sum n_b, V], one head matmul; their count per item)."""
        hidden, offsets = self.forward(items)
        index, counts = [], []
        for (_, p), off in zip(items, offsets):
            n = len(p.tokens)
            first = off if p.all_logits else off + n - 1
            index.extend(range(first, off + n))
            counts.append(off + n - first)
        picked = hidden.index_select(0, torch.tensor(index, device=hidden.device))  # [sum n_b, hidden]
        return self.model.logits(picked), counts
