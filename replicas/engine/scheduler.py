"""The batch scheduler: which requests hold a slot and KV blocks, which wait, and what the next
step runs, under a token budget.

Contract: `Scheduler` owns the waiting queue (bounded by `max_waiting`; `add` raises
`EngineOverloaded` past it), the running set (one slot, a row of the block tables, each) and the
free slots, and takes blocks from the `BlockManager`. `schedule()` returns a `StepPlan` for one step
of at most `max_num_batched_tokens` tokens:
1. every running row's pass (AR token, self-spec draft or verify, diffusion canvas or commit),
   so a running request advances on every step, whatever arrives;
2. prefill chunks of admitted prompts, oldest first (FCFS), in the budget left (each chunk at
   most `prefill_chunk`), so a long prompt is spread over steps instead of stalling the rows;
3. newly admitted requests, in arrival order, while there is a free slot, budget, and blocks for
   the prompt beyond its cached prefix with the watermark left free (`BlockManager.admit`).
Every pass's blocks, its lookahead included, are reserved before it is planned. When the pool
runs dry the newest request (latest arrival) is preempted by recompute: its blocks are freed,
it leaves the plan, and it goes back to the head of the queue; repeat until the pass fits (the
victim may be the row itself). No request is admitted in a step that preempted one.
Rows are opaque (`Row`): the scheduler never sees a decoding mode.
Non-goals: running the model, sampling, thread safety (the engine serialises calls).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Hashable, Protocol

from .block_manager import BlockManager, prefix_keys
from .engine_config import EngineConfig
from .errors import EngineOverloaded
from .kv_cache import SequenceKV
from .sequence import ForwardPass, Sequence


class Row(Protocol):
    """What the scheduler needs of a request (implemented by `running.Running`)."""

    seq: Sequence
    prefill_tokens: list[int] | None
    prefix_keys: list[Hashable] | None
    published: int

    @property
    def request_id(self) -> str: ...
    @property
    def prefilling(self) -> bool: ...
    @property
    def prefill_left(self) -> int: ...
    def next_pass(self) -> ForwardPass: ...
    def prefill_pass(self, chunk: int) -> ForwardPass: ...
    def preempt(self) -> None: ...


@dataclass
class StepPlan:
    """One step: `rows[i]` runs `passes[i]`."""

    rows: list[Row] = field(default_factory=list)
    passes: list[ForwardPass] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    tokens: int = 0  # tokens of all passes

    def add(self, row: Row, p: ForwardPass) -> None:
        self.rows.append(row)
        self.passes.append(p)
        self.tokens += len(p.tokens)

    def drop(self, row: Row) -> None:
        for i, r in enumerate(self.rows):
            if r is row:
                self.tokens -= len(self.passes[i].tokens)
                del self.rows[i], self.passes[i]
                return


class Scheduler:
    def __init__(self, config: EngineConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Row] = deque()
        self.running: dict[str, Row] = {}
        self.free_slots = list(range(config.max_batch_size - 1, -1, -1))  # pop() hands out slot 0 first
        self.preemptions = 0

    def add(self, row: Row) -> None:
        """Queue a request; past `max_waiting` requests beyond the free slots, refuse it."""
        if len(self.waiting) >= self.config.max_waiting + len(self.free_slots):
            raise EngineOverloaded(
                f"engine overloaded: {len(self.running)} requests running and {len(self.waiting)} waiting "
                f"(max_batch_size {self.config.max_batch_size}, max_waiting {self.config.max_waiting})")
        self.waiting.append(row)

    def find(self, request_id: str) -> Row | None:
        return self.running.get(request_id) or next((r for r in self.waiting if r.request_id == request_id), None)

    def remove(self, request_id: str) -> Row | None:
        """Drop a request wherever it is; its slot and blocks are free at once."""
        row = self.running.pop(request_id, None)
        if row is not None:
            self.blocks.release(row.seq.kv)
            self.free_slots.append(row.seq.kv.slot)
            return row
        for row in self.waiting:
            if row.request_id == request_id:
                self.waiting.remove(row)
                return row
        return None

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        budget = self.config.max_num_batched_tokens
        order = sorted(self.running.values(), key=lambda r: r.seq.arrival)
        for row in order:
            if not row.prefilling and row.request_id in self.running:
                self._plan(plan, row, row.next_pass())
        for row in order:
            left = budget - plan.tokens
            if left <= 0:
                break
            if row.prefilling and row.request_id in self.running:
                self._plan(plan, row, row.prefill_pass(min(row.prefill_left, self.config.prefill_chunk, left)))
        while not plan.preempted and self.waiting and self.free_slots and budget > plan.tokens:
            row = self.waiting[0]
            if not self._admit(row):
                break  # FCFS: the head of the queue waits for blocks, nobody overtakes it
            left = budget - plan.tokens
            self._plan(plan, row, row.prefill_pass(min(row.prefill_left, self.config.prefill_chunk, left)))
        return plan

    def _admit(self, row: Row) -> bool:
        kv = SequenceKV(slot=self.free_slots[-1])
        if row.prefix_keys is None:
            row.prefix_keys = (prefix_keys(row.prefill_tokens, self.blocks.block_size)
                               if self.blocks.prefix_caching else [])
        if not self.blocks.admit(kv, row.prefix_keys, len(row.prefill_tokens), alone=not self.running):
            return False
        self.free_slots.pop()
        self.waiting.popleft()
        row.seq.kv = kv
        row.published = len(kv.blocks)
        self.running[row.request_id] = row
        return True

    def _plan(self, plan: StepPlan, row: Row, p: ForwardPass) -> None:
        """Reserve the pass's blocks, preempting the newest requests while the pool is dry."""
        while not self.blocks.reserve(row.seq.kv, p.start + len(p.tokens)):
            victim = max(self.running.values(), key=lambda r: r.seq.arrival)
            self.preempt(victim, plan)
            if victim is row:
                return
        plan.add(row, p)

    def preempt(self, row: Row, plan: StepPlan) -> None:
        plan.drop(row)
        plan.preempted.append(row.request_id)
        self.preemptions += 1
        del self.running[row.request_id]
        self.blocks.release(row.seq.kv)
        self.free_slots.append(row.seq.kv.slot)
        row.preempt()
        self.waiting.appendleft(row)
