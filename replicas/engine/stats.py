"""Engine counters and fixed-bucket histograms, cheap to update on every step.

Contract: `Histogram.observe` / `snapshot`; `EngineStats` is updated only by the engine loop
thread and read as a plain dict through `snapshot()`. The replica exports these to Prometheus.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field


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
