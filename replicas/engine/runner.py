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

    def build_host_inputs(
        self, items: list[tuple[int, ForwardPass]], shape: tuple[int, int, int] | None = None
    ) -> dict[str, torch.Tensor]:
        """The pass's inputs as host tensors; `shape` = (rows, tokens, columns) pads them to a
        bucket: extra rows are all padding (slot 0, no real token), extra columns are masked."""
        b = len(items)
        t = max(len(p.tokens) for _, p in items)
        rows, t, s = shape if shape else (b, t, None)
        lengths = torch.zeros(rows, dtype=torch.long)  # [R]; padding rows have no real token
        starts = torch.zeros(rows, dtype=torch.long)  # [R]
        causal = torch.ones(rows, dtype=torch.bool)  # [R]
        tokens = torch.zeros(rows, t, dtype=torch.long)  # [R, T]
        slots = torch.zeros(rows, dtype=torch.long)  # [R]
        lora = torch.zeros(rows, dtype=torch.float32)  # [R]
        for i, (slot, p) in enumerate(items):
            lengths[i], starts[i], causal[i], slots[i], lora[i] = len(p.tokens), p.start, p.causal, slot, p.lora
            tokens[i, : len(p.tokens)] = torch.tensor(p.tokens)
        offs = torch.arange(t)[None, :]  # [1, T]
        real = offs < lengths[:, None]  # [R, T]
        positions = torch.where(real, starts[:, None] + offs, 0)  # [R, T]
        write_index = torch.where(real, positions, self.cache.scratch_column)
        canvas_end = (starts + lengths - 1)[:, None]  # [R, 1] last column of the row's tokens
        limit = torch.where(causal[:, None], positions, canvas_end)  # [R, T]
        limit = torch.where(real, limit, 0)
        s = s or int((starts + lengths).max())
        mask = torch.arange(s)[None, None, :] <= limit[:, :, None]  # [R, T, S]
        return {"tokens": tokens, "positions": positions, "write_index": write_index,
                "mask": mask[:, None], "slots": slots, "lora_rows": lora}

    def build_inputs(
        self, items: list[tuple[int, ForwardPass]]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionInputs]:
        """(tokens [B, T], positions [B, T], attention inputs) for a list of (slot, pass)."""
        host = self.build_host_inputs(items)
        slot_list = [slot for slot, _ in items]
        contiguous = slot_list == list(range(slot_list[0], slot_list[0] + len(items)))
        wants_lora = any(p.lora for _, p in items) and self.model.has_lora
        dev = self.device
        attn = AttentionInputs(
            slots=host["slots"].to(dev),
            slot_start=slot_list[0] if contiguous else None,
            write_index=host["write_index"].to(dev),
            mask=host["mask"].to(dev),
            lora_rows=host["lora_rows"].to(dev) if wants_lora else None,
        )
        return host["tokens"].to(dev), host["positions"].to(dev), attn

    def forward(self, items: list[tuple[int, ForwardPass]]) -> torch.Tensor:
        """Hidden states [B, >= T, hidden] of the batched pass (row b's tokens left-aligned)."""
        tokens, positions, attn = self.build_inputs(items)
        return self.model(tokens, positions, self.cache, attn)  # [B, T, hidden]

    @torch.inference_mode()
    def run(self, items: list[tuple[int, ForwardPass]]) -> list[torch.Tensor]:
        hidden = self.forward(items)
        picked = []
        for i, (_, p) in enumerate(items):
            n = len(p.tokens)
            picked.append(hidden[i, :n] if p.all_logits else hidden[i, n - 1 : n])
        counts = [x.shape[0] for x in picked]
        logits = self.model.logits(torch.cat(picked))  # [sum n_b, V], one head matmul
        return list(logits.split(counts))
