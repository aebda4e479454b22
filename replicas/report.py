"""The report a replica attaches to each answer: its load and measured cost model.

Contract: `Reporter(replica_id, model, read_stats)` makes the `REPORT_HEADER` value
(`replicas.wire`): `<replica id>;<seq>;<JSON>`. `header()` reads the engine's last stats snapshot
(`read_stats()`) at most every `min_interval_s` (0 for the engine process, whose snapshot is a
cached dict) and renders it only when the snapshot object changed (the engine process pushes one
every stats interval while busy and one when it goes idle, after the outputs that idled it: the
answer that ends a burst carries the snapshot before its last step), so the render happens at
most once per snapshot. The JSON holds
`running`, `waiting`, `running_by_mode`, `kv_usage`, `model`, under Ray Serve `application` and
`deployment`, and `cost_model` (the engine's `CostModel.snapshot()`, compacted: the step-shape
buckets of decode steps only, as the policy reads them, numbers to 6 significant digits, and the
most-measured buckets first when the whole would pass `MAX_REPORT_BYTES`, so the header stays
well under HAProxy's 16 KB buffer); `policies.reports` turns it back into the replica's series.
Non-goals: Ray's metrics (`replicas.metrics`), HTTP (`replicas.app` sets the header).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Callable


MAX_REPORT_BYTES = 8192  # a report header's JSON at most (HAProxy's default buffer: 16 KB of headers)


def _num(x):
    """6 significant digits: the report's floats in about half the characters."""
    return float(f"{x:.6g}") if isinstance(x, float) else x


def compact_costs(costs: dict, max_bucket_bytes: int = MAX_REPORT_BYTES - 1024) -> dict:
    """The cost-model snapshot for a report: decode-step buckets only (no prefill chunk in them:
    logits == tokens, or tokens == rows), rounded, the most-measured first while they fit."""
    if not costs:
        return {}
    buckets = [[r, t, lg, _num(y), n] for r, t, lg, y, n in costs.get("buckets", []) if lg == t or t == r]
    if len(json.dumps(buckets, separators=(",", ":"))) > max_bucket_bytes:
        buckets.sort(key=lambda b: -b[4])
        while buckets and len(json.dumps(buckets, separators=(",", ":"))) > max_bucket_bytes:
            buckets = buckets[: len(buckets) * 3 // 4]
        buckets.sort()
    return {
        "coef": {k: _num(v) for k, v in costs["coef"].items()} if costs.get("coef") else costs.get("coef"),
        "steps": costs.get("steps", 0),
        "buckets": buckets,
        "self_spec": {b: {k: _num(v) for k, v in y.items()} for b, y in (costs.get("self_spec") or {}).items()},
        "diffusion": {b: {k: _num(v) for k, v in y.items()} for b, y in (costs.get("diffusion") or {}).items()},
        "realized": [[m, n, _num(rate), w] for m, n, rate, w in costs.get("realized", [])],
    }


def report_body(model: str, stats: dict, application: str | None = None) -> dict:
    """The report's JSON object for one engine stats snapshot (`application`: the Serve app)."""
    return {
        "model": model,
        **({"application": application, "deployment": "NLDReplica"} if application else {}),
        "running": stats.get("running", 0),
        "waiting": stats.get("waiting", 0),
        "running_by_mode": stats.get("running_by_mode", {}),
        "kv_usage": stats.get("kv_tokens_used", 0) / max(stats.get("kv_tokens_total", 0), 1),
        "cost_model": compact_costs(stats.get("cost_model") or {}),
    }


class Reporter:
    def __init__(self, replica_id: str | None, model: str, read_stats: Callable[[], dict],
                 min_interval_s: float = 0.25, clock: Callable[[], float] = time.monotonic,
                 application: str | None = None) -> None:
        # outside Ray Serve (tests, a bare replica) an id of its own, so reports never merge
        self.replica_id = (replica_id or f"local-{uuid.uuid4().hex[:8]}").replace(";", "_")
        self.model, self.read_stats, self.application = model, read_stats, application
        self.min_interval_s, self.clock = min_interval_s, clock
        self.seq = 0
        self._source: dict | None = None
        self._value = ""
        self._read_at = -float("inf")

    def header(self) -> str:
        now = self.clock()
        if self._value and now - self._read_at < self.min_interval_s:
            return self._value
        self._read_at = now
        stats = self.read_stats()
        if stats is not self._source or not self._value:
            self._source = stats
            self.seq += 1
            body = json.dumps(report_body(self.model, stats or {}, self.application), separators=(",", ":"))
            self._value = f"{self.replica_id};{self.seq};{body}"
        return self._value
