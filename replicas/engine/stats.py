"""Engine counters and fixed-bucket histograms, cheap to update on every step.

Contract: `Histogram.observe` / `snapshot`; `EngineStats` is updated only by the engine loop
thread; `engine_snapshot(batch_engine)` is the plain dict `BatchEngine.stats_snapshot()` returns
(the replica exports it to Prometheus: `replicas/metrics.py`). Keys: requests by state and mode,
KV slots, tokens and blocks (used, free, cached), prefix-cache queries / hits / hit rate,
preemptions, tokens scheduled per step, counters and histograms, and `cost_model` (the measured
step costs and mode yields: `cost_model.CostModel.snapshot()`).
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

import torch

from replicas.wire import RUNNING_KINDS


@dataclass
class Histogram:
    buckets: tuple[float, ...]  # upper bounds, ascending; +Inf is implicit
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def snapshot(self) -> dict:
        return {"buckets": list(self.buckets), "counts": list(self.counts), "sum": self.total, "count": self.count}


TPF_BUCKETS = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0)
ACCEPT_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 31, 63)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


@dataclass
class EngineStats:
    forward_passes: int = 0  # batched forwards (steps) run
    generated_tokens: int = 0
    finished_requests: int = 0
    aborted_requests: int = 0
    rejected_requests: int = 0
    tokens_per_forward: Histogram = field(default_factory=lambda: Histogram(TPF_BUCKETS))  # per finished request
    accepted_length: Histogram = field(default_factory=lambda: Histogram(ACCEPT_BUCKETS))  # per self-spec cycle
    step_seconds: Histogram = field(default_factory=lambda: Histogram(STEP_BUCKETS))
    last_step_seconds: float = 0.0
    failed_requests: int = 0  # ended with finish_reason "error"
    scheduled_tokens: Histogram = field(default_factory=lambda: Histogram(TOKEN_BUCKETS))  # per step that ran
    last_step_tokens: int = 0


def engine_snapshot(core) -> dict:
    """The stats dict of a `BatchEngine` (called under its lock)."""
    sched, blocks, cache, s = core.scheduler, core.blocks, core.cache, core.stats
    running = list(sched.running.values())
    by_mode = {m: 0 for m in RUNNING_KINDS}
    for r in running:
        by_mode["prefill" if r.prefilling else r.mode_name] += 1
    alloc = blocks.allocator
    return {
        "running": len(running),
        "running_by_mode": by_mode,
        "waiting": len(sched.waiting),
        "kv_slots_used": len(running),
        "kv_slots_total": core.config.max_batch_size,
        "kv_tokens_used": alloc.num_used * cache.block_size,  # capacity taken: blocks in use x block size
        "kv_tokens_total": cache.num_blocks * cache.block_size,
        "kv_tokens_cached": sum(r.seq.kv.length for r in running),  # valid columns of running requests
        "kv_block_size": cache.block_size,
        "kv_blocks_total": cache.num_blocks,
        "kv_blocks_used": alloc.num_used,
        "kv_blocks_free": alloc.num_free,  # free + cached-unreferenced (evictable)
        "kv_blocks_cached": len(alloc.evictable),
        "prefix_cache_queries": blocks.queries,
        "prefix_cache_hits": blocks.hits,
        "prefix_cache_hit_rate": blocks.hit_rate,
        "preemptions": sched.preemptions,
        "torch_threads": torch.get_num_threads(),  # the engine's CPU threads (a replica: its Ray num_cpus)
        "forward_passes": s.forward_passes,
        "generated_tokens": s.generated_tokens,
        "finished_requests": s.finished_requests,
        "aborted_requests": s.aborted_requests,
        "rejected_requests": s.rejected_requests,
        "failed_requests": s.failed_requests,
        "tokens_per_forward": s.tokens_per_forward.snapshot(),
        "accepted_length": s.accepted_length.snapshot(),
        "step_seconds": s.step_seconds.snapshot(),
        "scheduled_tokens": s.scheduled_tokens.snapshot(),
        "last_step_seconds": s.last_step_seconds,
        "last_step_tokens": s.last_step_tokens,
        "cost_model": core.costs.snapshot(),
    }
