"""`Running`: one request's engine-side state: prefill progress, its decoding mode, a pending
mode switch. It is the scheduler's opaque row and the one place a mode object is created.

Contract: a request first prefills `prefill_tokens` (its prompt) in causal chunks whose size the
scheduler picks (`prefill_pass(chunk)`); the chunk that completes it emits the first token and
creates the mode (the pending switch, if any, decides which). After that `next_pass()` /
`advance()` are the mode's. `prepare()` applies a requested switch and the load-aware draft
block at cycle boundaries only. `preempt()` is recompute preemption: the request keeps its
output and its mode object, its cache is dropped, and it will be prefilled again over exactly
the columns it had cached, `(prompt + output)[:kv.length]`, without emitting anything. It then
resumes where it stopped, mid-cycle included (a self-spec verify, a half-revealed canvas), so
its output equals an unpreempted run's.
Non-goals: blocks (the block manager), batching (the runner), which rows run (the scheduler).
"""

from __future__ import annotations

from typing import Hashable

import torch

from .engine_config import EngineConfig
from .modes import DecodeMode, QuadraticSpecMode, SelfSpecMode, finish_prefill, mode_class
from .sequence import ForwardPass, Sequence


class Running:
    def __init__(self, seq: Sequence) -> None:
        self.seq = seq
        self.mode: DecodeMode | None = None  # None until the prompt is prefilled
        self.switch_to: str | None = None
        self.seen_accepts = 0  # accepted_lengths already reported to the stats
        self.seen_blocks = 0  # denoise_passes (finished diffusion blocks) already reported
        self.prefill_tokens: list[int] | None = list(seq.prompt_ids)  # None once decoding
        self.resuming = False  # prefilling again after a preemption: emits nothing
        self.prefix_keys: list[Hashable] | None = None  # prefix-cache keys of prefill_tokens' full blocks
        self.published = 0  # prefix_keys already published (or found) in the prefix cache

    @property
    def request_id(self) -> str:
        return self.seq.request_id

    @property
    def prefilling(self) -> bool:
        return self.prefill_tokens is not None

    @property
    def prefill_left(self) -> int:
        return len(self.prefill_tokens) - self.seq.kv.length if self.prefill_tokens is not None else 0

    @property
    def at_boundary(self) -> bool:
        """Decoding (not prefilling, nor resuming after a preemption) and between cycles: the
        cache holds exactly the verified prefix."""
        return self.prefill_tokens is None and self.mode is not None and self.mode.at_boundary

    @property
    def mode_name(self) -> str:
        return self.mode.name if self.mode is not None else self.seq.params.mode

    def prepare(self, config: EngineConfig, running: int) -> None:
        """At a cycle boundary: apply a requested mode switch, then the draft tier."""
        if not self.at_boundary:
            return
        if self.switch_to and self.switch_to != self.mode.name:
            self.seq.params = self.seq.params.with_(mode=self.switch_to)
            self.mode = mode_class(self.seq.params)(self.seq)
        self.switch_to = None
        if isinstance(self.mode, (SelfSpecMode, QuadraticSpecMode)):
            self.mode.block = config.draft_block(running, self.seq.params.block_length)

    def next_pass(self) -> ForwardPass:
        return self.mode.next_pass()

    def prefill_pass(self, chunk: int) -> ForwardPass:
        done = self.seq.kv.length
        return ForwardPass(tokens=self.prefill_tokens[done : done + chunk], start=done, causal=True, all_logits=False)

    def advance(self, p: ForwardPass, logits: torch.Tensor, greedy: int | None = None) -> list[int]:
        """Consume the logits of pass `p` (the one this row ran); returns the tokens made final.
        `greedy`: the argmax of its last position with the mask banned (see `DecodeMode`)."""
        seq = self.seq
        if self.prefill_tokens is None:
            return self.mode.advance(logits, greedy)
        seq.kv.append(len(p.tokens))
        if seq.kv.length < len(self.prefill_tokens):
            return []
        self.prefill_tokens = None
        if self.resuming:  # the cache is back; the mode carries on where it stopped
            self.resuming = False
            return []
        if self.switch_to:
            seq.params = seq.params.with_(mode=self.switch_to)
            self.switch_to = None
        out = finish_prefill(seq, logits, greedy)
        self.mode = mode_class(seq.params)(seq)
        return out

    def preempt(self) -> None:
        """The cache is gone (the scheduler freed its blocks): prefill again what it held."""
        seq = self.seq
        if self.prefill_tokens is None:
            self.prefill_tokens = (seq.prompt_ids + seq.output)[: seq.kv.length]
            self.resuming = True
            self.prefix_keys = None
        seq.kv.length = 0
        self.published = 0
