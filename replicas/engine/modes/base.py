"""The one interface every decoding mode implements, and the end of prefill shared by all of them.

Contract: a mode wraps a `Sequence` that satisfies the boundary invariant (see `sequence`).
`next_pass()` says what the next batched forward must compute for this sequence;
`advance(logits)` consumes that pass's logits ([T, V] float32, or [1, V] when only the last
position was asked for), updates the KV length, emits final tokens and returns them.
`at_boundary` is True when the invariant holds, i.e. the request may switch mode now.
Non-goals: batching, scheduling, tokenisation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ..sampling import select
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
    def advance(self, logits: torch.Tensor) -> list[int]: ...

    def choose(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [N], probabilities [N]) for logits [N, V] under the request's parameters."""
        s = self.seq
        return select(logits, s.params, s.mask_token_id, s.generator)


def finish_prefill(seq: Sequence, logits: torch.Tensor) -> list[int]:
    """Cache the (rest of the) prompt and emit the first token, establishing the boundary invariant."""
    seq.kv.append(len(seq.prompt_ids) - seq.kv.length)
    tok, _ = select(logits[-1:], seq.params, seq.mask_token_id, seq.generator)
    return seq.emit([int(tok)])
