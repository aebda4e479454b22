"""Linear self-speculation (NLD.md "LinearSpec"): draft a block bidirectionally, verify causally.

Cycle, with n = kv.length and B = block_length:
1. draft: bidirectional over [pending, MASK x (B-1)] at [n, n+B) (LoRA on when asked); the
   drafts d1..d(B-1) are chosen at the mask positions; nothing is cached.
2. verify: causal over [pending, d1..d(B-1)] (LoRA off) writes K/V for [n, n+B); its logits
   give the target predictions a0..a(B-1), a_i for position n+i+1.
3. accept c drafts, emit c drafts plus one more token, crop the cache to n + 1 + c.
Greedy: c is the longest prefix with d(i+1) == argmax a_i, so the output is AR greedy's.
Sampled: speculative rejection sampling with the draft distributions q and the verify
distributions p, so the output is distributed exactly as AR sampling. NFE per cycle = 2.
"""

from __future__ import annotations

import torch

from ..sampling import ban_mask, probabilities
from ..sequence import ForwardPass
from .base import DecodeMode, accept_drafts


class SelfSpecMode(DecodeMode):
    name = "self_spec"
    algorithm = "linear"

    def __init__(self, seq) -> None:
        super().__init__(seq)
        self.block = seq.params.block_length
        self.drafts: list[int] | None = None
        self.q: torch.Tensor | None = None  # [B-1, V] draft distributions (sampled requests)

    @property
    def at_boundary(self) -> bool:
        return self.drafts is None

    def next_pass(self) -> ForwardPass:
        s = self.seq
        if self.drafts is None:
            tokens = [s.pending] + [s.mask_token_id] * (self.block - 1)
            return ForwardPass(tokens=tokens, start=s.kv.length, causal=False, lora=bool(s.params.draft_lora))
        return ForwardPass(tokens=[s.pending] + self.drafts, start=s.kv.length, causal=True)

    def advance(self, logits: torch.Tensor, greedy: int | None = None) -> list[int]:
        s = self.seq
        s.forward_passes += 1
        if self.drafts is None:
            if s.params.greedy:
                self.drafts = ban_mask(logits[1:], s.mask_token_id).argmax(-1).tolist()
            else:
                self.q = probabilities(logits[1:], s.params, s.mask_token_id)  # [B-1, V]
                self.drafts = torch.multinomial(self.q, 1, generator=s.generator).squeeze(-1).tolist()
            return []
        drafts, self.drafts = self.drafts, None
        c, extra = accept_drafts(s, drafts, logits, self.q)  # logits [B, V]: the causal verify
        base = s.kv.length
        s.kv.append(self.block)
        s.kv.truncate(base + 1 + c)  # keep pending and the c accepted drafts
        s.accepted_lengths.append(c)
        s.draft_blocks.append(self.block)
        return s.emit(drafts[:c] + [extra])
