"""Quadratic self-speculation (NLD.md "Self-speculation, quadratic", TiDAR's layout): draft and
verify in ONE forward per cycle.

State between cycles (the boundary invariant holds after every cycle): the cache holds the
verified prefix [0, n), `pending` = d_0 sits at position n uncached, and `drafts` d_1..d_K are
proposals for positions n+1..n+K (from the previous cycle's mask group, or, on the first cycle
after prefill or a switch, from one initial-draft pass: LinearSpec's bidirectional draft over
[pending, MASK x (B-1)], LoRA on, which emits nothing).

A cycle with G = K + 1 groups of M = B masks (B = the block, draft tiers applied) is one pass of
G (M + 1) tokens, stored at columns [n, n + G + G M):
  columns n .. n+G-1:        d_0..d_(G-1) at positions n..n+G-1; d_i sees d_0..d_i (causal AR
                             verification; LoRA off). Its logit a_i predicts position n+i+1.
  columns n+G+iM .. +M-1:    group i's masks at positions n+i+1..n+i+M; they see d_0..d_i and
                             their own group (bidirectional; LoRA on when the request drafts with
                             it): the pre-draft of the next block if d_1..d_i are accepted.
Every query also sees the cached prefix. The drafts' rows never see a mask, so the verify is
exactly AR's and the draft LoRA changes acceptance only.
Accept c drafts (greedy: the longest prefix with d_(i+1) == argmax a_i; sampled: speculative
rejection sampling with q = the distributions the drafts were drawn from), emit d_1..d_c and one
more token (a_c's argmax, the bonus, or the rejection's residual draw); keep the K/V of
d_0..d_c only (crop to n + 1 + c; the masks' columns are dropped). Group c's masks become the
next draft: slot 0 (position n+c+1) is the emitted token, slots 1..M-1 are d'_1..d'_(M-1).
NFE: one forward per cycle (plus the initial-draft pass). Cost per row: O(B^2) tokens.
Non-goals: batching (the runner), block tiers (the engine sets `block` at cycle boundaries).
"""

from __future__ import annotations

import torch

from ..sampling import ban_mask, probabilities
from ..sequence import ForwardPass
from .base import DecodeMode, accept_drafts


def group_mask(groups: int, masks: int) -> torch.Tensor:
    """[T, T] bool, T = groups (masks + 1): drafts first, then each group's masks (see above)."""
    t = groups * (masks + 1)
    m = torch.zeros(t, t, dtype=torch.bool)
    m[:groups, :groups] = torch.ones(groups, groups, dtype=torch.bool).tril()  # d_i sees d_0..d_i
    for i in range(groups):
        rows = slice(groups + i * masks, groups + (i + 1) * masks)
        m[rows, : i + 1] = True  # d_0..d_i
        m[rows, rows] = True  # the whole group
    return m


def group_positions(start: int, groups: int, masks: int) -> list[int]:
    """[T] RoPE positions: d_i at start + i, group i's masks at start + i + 1 .. start + i + masks."""
    return list(range(start, start + groups)) + [start + i + 1 + j for i in range(groups) for j in range(masks)]


class QuadraticSpecMode(DecodeMode):
    name = "self_spec"
    algorithm = "quadratic"

    def __init__(self, seq) -> None:
        super().__init__(seq)
        self.block = seq.params.block_length
        self.drafts: list[int] | None = None  # d_1..d_K for positions n+1..n+K
        self.q: torch.Tensor | None = None  # [K, V] the drafts' distributions (sampled requests)
        self.shape: tuple[int, int] | None = None  # (groups, masks) of the pass in flight

    def next_pass(self) -> ForwardPass:
        s = self.seq
        n, mask_id, lora = s.kv.length, s.mask_token_id, bool(s.params.draft_lora)
        if self.drafts is None:  # the initial-draft pass
            self.shape = None
            return ForwardPass(tokens=[s.pending] + [mask_id] * (self.block - 1), start=n, causal=False, lora=lora)
        k = min(len(self.drafts), self.block - 1)  # a smaller draft tier takes effect at once
        groups, masks = k + 1, self.block
        self.shape = (groups, masks)
        return ForwardPass(
            tokens=[s.pending] + self.drafts[:k] + [mask_id] * (groups * masks), start=n, causal=False,
            mask=group_mask(groups, masks), positions=group_positions(n, groups, masks),
            lora_tokens=[False] * groups + [lora] * (groups * masks),
        )

    def advance(self, logits: torch.Tensor, greedy: int | None = None) -> list[int]:
        s = self.seq
        s.forward_passes += 1
        if self.shape is None:  # initial draft: logits [B, V], slots 1..B-1 are the drafts
            self.drafts, self.q = self.draft(logits[1:])
            return []
        groups, masks = self.shape
        drafts = self.drafts[: groups - 1]
        verify = logits[:groups]  # [G, V] a_i predicts position n+i+1
        pre = logits[groups:].view(groups, masks, -1)  # [G, M, V] group i's masks
        c, extra = accept_drafts(s, drafts, verify, None if s.params.greedy else self.q[: groups - 1])
        base = s.kv.length
        s.kv.append(groups)  # d_0..d_(G-1) were written at columns base..base+G-1
        s.kv.truncate(base + 1 + c)  # keep d_0 and the c accepted drafts; the masks' columns go
        s.accepted_lengths.append(c)
        s.draft_blocks.append(groups)
        self.drafts, self.q = self.draft(pre[c, 1:])  # slot 0 is the token emitted below
        return s.emit(drafts[:c] + [extra])

    def draft(self, logits: torch.Tensor) -> tuple[list[int], torch.Tensor | None]:
        """Draft tokens from mask logits [K, V]: argmax, or one draw each from q [K, V]."""
        s = self.seq
        if s.params.greedy:
            return ban_mask(logits, s.mask_token_id).argmax(-1).tolist(), None
        q = probabilities(logits, s.params, s.mask_token_id)  # [K, V]
        return torch.multinomial(q, 1, generator=s.generator).squeeze(-1).tolist(), q
