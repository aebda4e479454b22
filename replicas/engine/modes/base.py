"""The one interface every decoding mode implements, and the end of prefill shared by all of them.

Contract: a mode wraps a `Sequence` that satisfies the boundary invariant (see `sequence`).
`next_pass()` says what the next batched forward must compute for this sequence;
`advance(logits, greedy)` consumes that pass's logits ([T, V] float32, or [1, V] when only the last
position was asked for), updates the KV length, emits final tokens and returns them; `greedy`,
when given, is the argmax of the last position's logits with the mask token banned (the runner
computes it for the whole batch at once), which a greedy request may take instead of its own.
`at_boundary` is True when the invariant holds, i.e. the request may switch mode now.
Non-goals: batching, scheduling, tokenisation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ..sampling import ban_mask, greedy_token, probabilities, select, speculative_accept
from ..sequence import ForwardPass, Sequence


class DecodeMode(ABC):
    name: str = ""

    def __init__(self, seq: Sequence) -> None:
        self.seq = seq

    @property
    def at_boundary(self) -> bool:
        return True

    @abstractmethod
    def next_pass(self) -> ForwardPass: ...

    @abstractmethod
    def advance(self, logits: torch.Tensor, greedy: int | None = None) -> list[int]: ...

    def choose(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [N], probabilities [N]) for logits [N, V] under the request's parameters."""
        s = self.seq
        return select(logits, s.params, s.mask_token_id, s.generator)

    def choose_one(self, logits: torch.Tensor, greedy: int | None = None) -> int:
        """One token for logits [1, V]; greedy skips the distribution (`greedy_token`)."""
        return choose_token(self.seq, logits, greedy)


def choose_token(seq: Sequence, logits: torch.Tensor, greedy: int | None = None) -> int:
    """One token for logits [1, V] under the request's parameters (the same token `select` picks).
    `greedy`: these logits' argmax with the mask banned, already computed (the batch's)."""
    if seq.params.greedy:
        return greedy if greedy is not None else greedy_token(logits, seq.mask_token_id)
    return int(select(logits, seq.params, seq.mask_token_id, seq.generator)[0])


def finish_prefill(seq: Sequence, logits: torch.Tensor, greedy: int | None = None) -> list[int]:
    """Cache the (rest of the) prompt and emit the first token, establishing the boundary invariant."""
    seq.kv.append(len(seq.prompt_ids) - seq.kv.length)
    return seq.emit([choose_token(seq, logits[-1:], greedy)])


def accept_drafts(seq: Sequence, drafts: list[int], verify: torch.Tensor, q: torch.Tensor | None) -> tuple[int, int]:
    """Verify a block's drafts against the causal logits `verify` ([len(drafts) + 1, V]; row i
    predicts the token after draft i-1). Returns (c, extra): the c leading drafts accepted and
    the token emitted after them (greedy: the longest matching prefix and the argmax; sampled:
    speculative rejection sampling with q [len(drafts), V], the distributions the drafts were
    drawn from)."""
    if seq.params.greedy:
        target = ban_mask(verify, seq.mask_token_id).argmax(-1).tolist()  # [len(drafts) + 1]
        c = 0
        while c < len(drafts) and drafts[c] == target[c]:
            c += 1
        return c, target[c]
    p = probabilities(verify, seq.params, seq.mask_token_id)  # [len(drafts) + 1, V]
    return speculative_accept(torch.tensor(drafts, device=p.device), q, p, seq.generator)
