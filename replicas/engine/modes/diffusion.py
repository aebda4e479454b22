"""Block diffusion decoding (NLD.md "FastDiffuser").

A canvas [seed, MASK x (B-1)] sits at positions [kv.length, kv.length + B), seed = `pending`.
Denoise passes are bidirectional over the canvas (the cached prefix is visible, nothing is
cached); each reveals every masked position whose candidate's probability is >= threshold,
and always the single most confident one. Revealed tokens are frozen; the contiguous revealed
prefix is emitted as soon as it grows (so EOS stops the block early). A finished block gets
one causal commit pass that caches it and yields the next seed.
NFE per block = denoise passes + 1 commit (no commit after the final block).
With `params.denoise_lora`, denoise passes take the model's denoise adapter (`diffusion_lora/`,
ours; never the commit pass, which writes the KV the other modes read).
"""

from __future__ import annotations

import torch

from ..model import DENOISE_ADAPTER
from ..sequence import ForwardPass
from .base import DecodeMode


class DiffusionMode(DecodeMode):
    name = "diffusion"

    def __init__(self, seq) -> None:
        super().__init__(seq)
        self.block = seq.params.block_length
        self._new_canvas()

    def _new_canvas(self) -> None:
        s = self.seq
        self.canvas = [s.pending] + [s.mask_token_id] * (self.block - 1)
        self.emitted = 1  # canvas[0] (the seed) was emitted when it was chosen
        self.passes = 0
        self.committing = False

    @property
    def at_boundary(self) -> bool:
        return self.passes == 0 and not self.committing

    def next_pass(self) -> ForwardPass:
        return ForwardPass(
            tokens=list(self.canvas), start=self.seq.kv.length, causal=self.committing, all_logits=not self.committing,
            lora=bool(self.seq.params.denoise_lora) and not self.committing, adapter=DENOISE_ADAPTER,
        )

    def advance(self, logits: torch.Tensor, greedy: int | None = None) -> list[int]:
        s = self.seq
        s.forward_passes += 1
        if self.committing:
            s.kv.append(self.block)
            s.denoise_passes.append(self.passes)
            out = s.emit([self.choose_one(logits[-1:])])
            self._new_canvas()
            return out
        self.passes += 1
        mask_id = s.mask_token_id
        masked = torch.tensor([i for i, t in enumerate(self.canvas) if t == mask_id],
                              device=logits.device)  # [M] canvas positions still masked
        cand, conf = self.choose(logits[masked])  # [M], [M]
        reveal = conf >= s.params.threshold
        reveal[conf.argmax()] = True
        for pos, tok in zip(masked[reveal].tolist(), cand[reveal].tolist()):
            self.canvas[pos] = tok
        start = self.emitted
        while self.emitted < self.block and self.canvas[self.emitted] != mask_id:
            self.emitted += 1
        out = s.emit(self.canvas[start : self.emitted])
        if not s.finished and self.emitted == self.block:
            self.committing = True
        return out
