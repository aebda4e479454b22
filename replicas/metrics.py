"""Replica metrics through `ray.serve.metrics` (exported on Ray's metrics port, prefixed `ray_`).

Contract: `ReplicaMetrics` owns the metric objects of one replica; `sync(stats)` is called
every `interval_s` by a background thread with the engine's stats snapshot and sets gauges and
counter deltas; the request path calls `observe_request(...)` / `observe_first_token` /
`observe_inter_token`. Ray adds the deployment, replica and node tags, so several replicas on
one node never clash on a port. Names (after Ray's `ray_` prefix):

  ray_nld_replica_running_requests{mode}        ray_nld_replica_waiting_requests
  ray_nld_replica_num_requests_running          (label-free total, for the endpoint picker)
  ray_nld_replica_kv_cache_usage_ratio          ray_nld_replica_kv_slots_used
  ray_nld_replica_generated_tokens_total        ray_nld_replica_forward_passes_total
  ray_nld_replica_tokens_per_forward_*          ray_nld_replica_accepted_length_*
  ray_nld_replica_time_to_first_token_seconds_* ray_nld_replica_inter_token_latency_seconds_*
  ray_nld_replica_requests_total{mode,finish_reason}
  ray_nld_replica_kv_blocks_used                ray_nld_replica_kv_blocks_free
  ray_nld_replica_prefix_cache_hit_ratio        ray_nld_replica_prefix_cache_queries_total
  ray_nld_replica_prefix_cache_hits_total       ray_nld_replica_preemptions_total
  ray_nld_replica_scheduled_tokens_total        ray_nld_replica_last_step_tokens
  ray_nld_replica_step_cost_seconds{term}       ray_nld_replica_cost_model_steps
  ray_nld_replica_self_spec_tokens_per_cycle{block}  ray_nld_replica_self_spec_cycles{block}
  ray_nld_replica_diffusion_tokens_per_pass{block}   ray_nld_replica_diffusion_blocks{block}
  ray_nld_replica_step_shape_seconds{rows,tokens,logits}  ray_nld_replica_step_shape_count{...}
  ray_nld_replica_realized_tokens_per_second{mode,running}  ray_nld_replica_realized_windows{...}

The last ten are the engine's measured cost model (`replicas/engine/cost_model.py`): the fitted
step-cost terms (`intercept_s`, `per_row_s`, `per_token_s`, `per_logit_s`), the steps measured,
the EWMA yields of self-spec cycles and diffusion passes per block length with their counts, and
the measured table behind the fit: per step shape (its bucket's rows, tokens, logit rows as labels)
the EWMA seconds and the steps seen; and what the replica really delivered per mode and load
cell (`running`: 1, 2, 3, 4, 6, 8, 12, ...) with the one-second windows folded into it.
The policy's `goodput` signal reads them from this page.

The Inference Gateway's `vllm:*` names contain ':' which Ray's metrics API rejects (a warning
today, an error in future releases); docs/ARCHITECTURE.md lists the endpoint-picker flags
that point it at these names instead. Non-goals: HTTP serving of metrics (Ray does it).
"""

from __future__ import annotations

import threading
from typing import Callable

from ray.serve import metrics as ray_metrics

from .wire import RUNNING_KINDS

TPF_BUCKETS = [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0]
ACCEPT_BUCKETS = [0.5, 1.5, 2.5, 3.5, 4.5, 6.5, 8.5, 12.5, 16.5, 24.5, 31.5]
TTFT_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
ITL_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]


class ReplicaMetrics:
    def __init__(self, model: str) -> None:
        tags = ("model",)
        self._tags = {"model": model}
        self.running = ray_metrics.Gauge("nld_replica_running_requests", "requests holding a KV slot, by mode",
                                         tag_keys=tags + ("mode",))
        self.waiting = ray_metrics.Gauge("nld_replica_waiting_requests", "requests queued for a KV slot", tag_keys=tags)
        # label-free totals for the Inference Gateway endpoint picker (see docs/ARCHITECTURE.md)
        self.num_running = ray_metrics.Gauge("nld_replica_num_requests_running", "running requests, all modes",
                                             tag_keys=tags)
        self.kv_usage = ray_metrics.Gauge("nld_replica_kv_cache_usage_ratio",
                                          "cached tokens / KV capacity (0..1)", tag_keys=tags)
        self.kv_slots = ray_metrics.Gauge("nld_replica_kv_slots_used", "KV slots in use", tag_keys=tags)
        self.tokens = ray_metrics.Counter("nld_replica_generated_tokens", "tokens generated", tag_keys=tags)
        self.passes = ray_metrics.Counter("nld_replica_forward_passes", "batched forward passes", tag_keys=tags)
        self.requests = ray_metrics.Counter("nld_replica_requests", "finished requests",
                                            tag_keys=tags + ("mode", "finish_reason"))
        self.tpf = ray_metrics.Histogram("nld_replica_tokens_per_forward", "tokens per forward of a request",
                                         boundaries=TPF_BUCKETS, tag_keys=tags + ("mode",))
        self.accepted = ray_metrics.Histogram("nld_replica_accepted_length", "accepted drafts per self-spec cycle",
                                              boundaries=ACCEPT_BUCKETS, tag_keys=tags)
        self.ttft = ray_metrics.Histogram("nld_replica_time_to_first_token_seconds", "time to first token",
                                          boundaries=TTFT_BUCKETS, tag_keys=tags + ("mode",))
        self.itl = ray_metrics.Histogram("nld_replica_inter_token_latency_seconds", "seconds per token between chunks",
                                         boundaries=ITL_BUCKETS, tag_keys=tags + ("mode",))
        self._last_tokens = 0
        self._last_passes = 0
        self._stop = threading.Event()
        self._init_engine_v2(tags)
        self._init_costs(tags)

    def _t(self, **extra) -> dict:
        return dict(self._tags, **extra)

    def sync(self, stats: dict) -> None:
        for mode in RUNNING_KINDS:
            self.running.set(stats["running_by_mode"].get(mode, 0), tags=self._t(mode=mode))
        self.waiting.set(stats["waiting"], tags=self._t())
        self.num_running.set(stats["running"], tags=self._t())
        self.kv_usage.set(stats["kv_tokens_used"] / max(stats["kv_tokens_total"], 1), tags=self._t())
        self.kv_slots.set(stats["kv_slots_used"], tags=self._t())
        if stats["generated_tokens"] > self._last_tokens:
            self.tokens.inc(stats["generated_tokens"] - self._last_tokens, tags=self._t())
            self._last_tokens = stats["generated_tokens"]
        if stats["forward_passes"] > self._last_passes:
            self.passes.inc(stats["forward_passes"] - self._last_passes, tags=self._t())
            self._last_passes = stats["forward_passes"]
        self._sync_engine_v2(stats)
        self._sync_costs(stats.get("cost_model"))

    def _init_costs(self, tags: tuple) -> None:
        gauge = ray_metrics.Gauge
        self.cost_terms = gauge("nld_replica_step_cost_seconds", "fitted engine step cost: seconds = intercept + "
                                "per_row * rows + per_token * tokens + per_logit * logit rows", tag_keys=tags + ("term",))
        self.cost_steps = gauge("nld_replica_cost_model_steps", "engine steps the cost model measured", tag_keys=tags)
        shape = tags + ("rows", "tokens", "logits")
        self.shape_seconds = gauge("nld_replica_step_shape_seconds", "EWMA seconds of engine steps of this shape",
                                   tag_keys=shape)
        self.shape_count = gauge("nld_replica_step_shape_count", "engine steps of this shape", tag_keys=shape)
        realized = tags + ("mode", "running")
        self.realized_rate = gauge("nld_replica_realized_tokens_per_second", "EWMA tokens/s the engine delivered "
                                   "while every decoding request ran this mode at this running count",
                                   tag_keys=realized)
        self.realized_windows = gauge("nld_replica_realized_windows", "one-second windows behind the realized "
                                      "tokens/s", tag_keys=realized)
        self.yield_gauges = {
            "self_spec": (gauge("nld_replica_self_spec_tokens_per_cycle", "EWMA tokens per self-spec cycle",
                                tag_keys=tags + ("block",)),
                          gauge("nld_replica_self_spec_cycles", "self-spec cycles measured", tag_keys=tags + ("block",)),
                          "tokens_per_cycle", "cycles"),
            "diffusion": (gauge("nld_replica_diffusion_tokens_per_pass", "EWMA tokens per diffusion pass",
                                tag_keys=tags + ("block",)),
                          gauge("nld_replica_diffusion_blocks", "diffusion blocks measured", tag_keys=tags + ("block",)),
                          "tokens_per_pass", "blocks"),
        }

    def _sync_costs(self, model: dict | None) -> None:
        if not model or not model.get("coef"):
            return
        for term, value in model["coef"].items():
            self.cost_terms.set(value, tags=self._t(term=term))
        self.cost_steps.set(model["steps"], tags=self._t())
        for rows, tokens, logits, seconds, count in model.get("buckets", []):
            key = self._t(rows=str(rows), tokens=str(tokens), logits=str(logits))
            self.shape_seconds.set(seconds, tags=key)
            self.shape_count.set(count, tags=key)
        for mode, running, rate, windows in model.get("realized", []):
            key = self._t(mode=mode, running=str(running))
            self.realized_rate.set(rate, tags=key)
            self.realized_windows.set(windows, tags=key)
        for mode, (mean, count, mean_key, count_key) in self.yield_gauges.items():
            for block, y in model.get(mode, {}).items():
                mean.set(y[mean_key], tags=self._t(block=str(block)))
                count.set(y[count_key], tags=self._t(block=str(block)))

    def _init_engine_v2(self, tags: tuple) -> None:
        """Paged KV cache, prefix cache, preemptions and scheduled tokens (engine v2 keys)."""
        gauge, counter = ray_metrics.Gauge, ray_metrics.Counter
        self.v2_gauges = {
            "kv_blocks_used": gauge("nld_replica_kv_blocks_used", "KV blocks referenced", tag_keys=tags),
            "kv_blocks_free": gauge("nld_replica_kv_blocks_free", "KV blocks free or evictable", tag_keys=tags),
            "prefix_cache_hit_rate": gauge("nld_replica_prefix_cache_hit_ratio", "prefix-cache block hits / lookups",
                                           tag_keys=tags),
            "last_step_tokens": gauge("nld_replica_last_step_tokens", "tokens in the last engine step", tag_keys=tags),
        }
        self.v2_counters = {
            "prefix_cache_queries": counter("nld_replica_prefix_cache_queries", "prompt blocks looked up", tag_keys=tags),
            "prefix_cache_hits": counter("nld_replica_prefix_cache_hits", "prompt blocks found cached", tag_keys=tags),
            "preemptions": counter("nld_replica_preemptions", "requests preempted (recompute)", tag_keys=tags),
            "scheduled_tokens": counter("nld_replica_scheduled_tokens", "tokens scheduled in engine steps",
                                        tag_keys=tags),
        }
        self._v2_last = {key: 0 for key in self.v2_counters}

    def _sync_engine_v2(self, stats: dict) -> None:
        for key, metric in self.v2_gauges.items():
            if key in stats:
                metric.set(stats[key], tags=self._t())
        for key, metric in self.v2_counters.items():
            value = stats.get(key)
            if isinstance(value, dict):  # a histogram snapshot: its sum
                value = value.get("sum")
            if value is not None and value > self._v2_last[key]:
                metric.inc(value - self._v2_last[key], tags=self._t())
                self._v2_last[key] = value

    def start(self, read_stats: Callable[[], dict], interval_s: float = 0.5) -> threading.Thread:
        def loop():
            while not self._stop.wait(interval_s):
                self.sync(read_stats())

        self.sync(read_stats())
        thread = threading.Thread(target=loop, name="nld-metrics", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()

    def observe_request(self, mode: str, finish_reason: str, tokens_per_forward: float | None,
                        accepted_lengths: list[int]) -> None:
        self.requests.inc(1, tags=self._t(mode=mode, finish_reason=finish_reason))
        if tokens_per_forward is not None:
            self.tpf.observe(tokens_per_forward, tags=self._t(mode=mode))
        for c in accepted_lengths:
            self.accepted.observe(c, tags=self._t())

    def observe_first_token(self, mode: str, seconds: float) -> None:
        self.ttft.observe(seconds, tags=self._t(mode=mode))

    def observe_inter_token(self, mode: str, seconds_per_token: float) -> None:
        self.itl.observe(seconds_per_token, tags=self._t(mode=mode))
