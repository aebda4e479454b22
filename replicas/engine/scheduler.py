"""The batch scheduler: which sequences hold a KV slot, which wait, and what runs next step.

Contract: `Scheduler` owns the waiting queue (bounded by `max_waiting`; `add` raises
`EngineOverloaded` past it), the running set (one KV slot each) and the free slots.
`admit()` moves waiting requests into free slots in arrival order; `schedule()` returns the
sequences of the next step: every sequence that still needs prompt prefill if there is one
(a prefill step, chunked by `prefill_chunk`), else every running sequence (a decode step, in
which each row runs its own mode's pass). Mid-flight mode switches and load-aware draft
lengths are applied by `Running.prepare` at cycle boundaries only.
Non-goals: running the model, sampling, thread safety (the engine serialises calls).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from .engine_config import EngineConfig
from .errors import EngineOverloaded
from .kv_cache import SequenceKV
from .modes import MODE_CLASSES, DecodeMode, finish_prefill
from .modes.self_spec import SelfSpecMode
from .sequence import ForwardPass, Sequence


@dataclass
class Running:
    seq: Sequence
    prefill_chunk: int
    mode: DecodeMode | None = None  # None while the prompt is being prefilled
    switch_to: str | None = None
    seen_accepts: int = 0  # accepted_lengths already reported to the stats

    @property
    def prefilling(self) -> bool:
        return self.mode is None

    def prepare(self, config: EngineConfig, running: int) -> None:
        """At a cycle boundary: apply a requested mode switch, then the draft tier."""
        if self.mode is None or not self.mode.at_boundary:
            return
        if self.switch_to and self.switch_to != self.mode.name:
            self.seq.params = self.seq.params.with_(mode=self.switch_to)
            self.mode = MODE_CLASSES[self.switch_to](self.seq)
        self.switch_to = None
        if isinstance(self.mode, SelfSpecMode):
            self.mode.block = config.draft_block(running, self.seq.params.block_length)

    def next_pass(self) -> ForwardPass:
        if self.mode is None:
            done = self.seq.kv.length
            chunk = self.seq.prompt_ids[done : done + self.prefill_chunk]
            return ForwardPass(tokens=chunk, start=done, causal=True, all_logits=False)
        return self.mode.next_pass()

    def advance(self, logits: torch.Tensor) -> list[int]:
        seq = self.seq
        if self.mode is not None:
            return self.mode.advance(logits)
        remaining = len(seq.prompt_ids) - seq.kv.length
        if remaining > self.prefill_chunk:
            seq.kv.append(self.prefill_chunk)
            return []
        out = finish_prefill(seq, logits)
        self.mode = MODE_CLASSES[seq.params.mode](seq)
        return out


class Scheduler:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: dict[str, Running] = {}
        self.free_slots = list(range(config.max_batch_size - 1, -1, -1))  # pop() hands out slot 0 first

    def add(self, seq: Sequence) -> None:
        """Queue a request; past `max_waiting` requests beyond the free slots, refuse it."""
        if len(self.waiting) >= self.config.max_waiting + len(self.free_slots):
            raise EngineOverloaded(
                f"engine overloaded: {len(self.running)} requests running and {len(self.waiting)} waiting "
                f"(max_batch_size {self.config.max_batch_size}, max_waiting {self.config.max_waiting})")
        self.waiting.append(seq)

    def admit(self) -> list[Running]:
        admitted = []
        while self.waiting and self.free_slots:
            seq = self.waiting.popleft()
            seq.kv = SequenceKV(slot=self.free_slots.pop())
            run = Running(seq, prefill_chunk=self.config.prefill_chunk)
            self.running[seq.request_id] = run
            admitted.append(run)
        return admitted

    def remove(self, request_id: str) -> Sequence | None:
        """Drop a request wherever it is; its KV slot is free at once."""
        run = self.running.pop(request_id, None)
        if run is not None:
            self.free_slots.append(run.seq.kv.slot)
            return run.seq
        for seq in self.waiting:
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                return seq
        return None

    def schedule(self) -> list[Running]:
        prefills = [r for r in self.running.values() if r.prefilling]
        return prefills or list(self.running.values())
