"""Run many sequences' forward passes as ONE batched model forward.

Layout: padding. Row b carries pass b's T_b tokens left-aligned, padded to T = max T_b.
Each real token at position p writes its K/V to cache column p of the row's slot; padding
tokens write to the cache's scratch column and use position 0. The boolean mask lets a real
query see every column <= p (causal pass) or every column < start + T_b (bidirectional pass:
the cached prefix and the whole canvas); a padding query sees column 0 only, so it stays
finite. Columns read: S = max over rows of start + T_b. Padding keeps the code simple and the
mask exact; its cost is the padded tokens, which mixed batches keep small (drafts and canvases
are at most one block; long prompts can be prefilled in their own step).
Contract: `run(items)` returns, per item, float32 logits [T_b, V] or [1, V] (last only).
Non-goals: deciding which passes to run (the scheduler does), sampling.
"""

from __future__ import annotations

import torch

from .kv_cache import KVCache
from .model import AttentionInputs, NLDModel
from .sequence import ForwardPass


class ModelRunner:
    def __init__(self, model: NLDModel, cache: KVCache) -> None:
        self.model = model
        self.cache = cache
        self.device = model.encoder.embed_tokens.weight.device

    def build_inputs(
        self, items: list[tuple[int, ForwardPass]]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionInputs]:
        """(tokens [B, T], positions [B, T], attention inputs) for a list of (slot, pass)."""
        b = len(items)
        t = max(len(p.tokens) for _, p in items)
        lengths = torch.tensor([len(p.tokens) for _, p in items])  # [B]
        starts = torch.tensor([p.start for _, p in items])  # [B]
        causal = torch.tensor([p.causal for _, p in items])  # [B]
        tokens = torch.zeros(b, t, dtype=torch.long)
        for i, (_, p) in enumerate(items):
            tokens[i, : len(p.tokens)] = torch.tensor(p.tokens)
        offs = torch.arange(t)[None, :]  # [1, T]
        real = offs < lengths[:, None]  # [B, T]
        positions = torch.where(real, starts[:, None] + offs, 0)  # [B, T]
        write_index = torch.where(real, positions, self.cache.scratch_column)
        canvas_end = (starts + lengths - 1)[:, None]  # [B, 1] last column of the row's tokens
        limit = torch.where(causal[:, None], positions, canvas_end)  # [B, T]
        limit = torch.where(real, limit, 0)
        s = int((starts + lengths).max())
        mask = torch.arange(s)[None, None, :] <= limit[:, :, None]  # [B, T, S]
        slot_list = [slot for slot, _ in items]
        contiguous = slot_list == list(range(slot_list[0], slot_list[0] + b))
        lora = torch.tensor([p.lora for _, p in items])
        dev = self.device
        attn = AttentionInputs(
            slots=torch.tensor(slot_list, device=dev),
            slot_start=slot_list[0] if contiguous else None,
            write_index=write_index.to(dev),
            mask=mask[:, None].to(dev),
            lora_rows=lora.to(dev) if bool(lora.any()) and self.model.has_lora else None,
        )
        return tokens.to(dev), positions.to(dev), attn

    @torch.inference_mode()
    def run(self, items: list[tuple[int, ForwardPass]]) -> list[torch.Tensor]:
        tokens, positions, attn = self.build_inputs(items)
        hidden = self.model(tokens, positions, self.cache, attn)  # [B, T, hidden]
        picked = []
        for i, (_, p) in enumerate(items):
            n = len(p.tokens)
            picked.append(hidden[i, :n] if p.all_logits else hidden[i, n - 1 : n])
        counts = [x.shape[0] for x in picked]
        logits = self.model.logits(torch.cat(picked))  # [sum n_b, V], one head matmul
        return list(logits.split(counts))
