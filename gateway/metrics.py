"""Prometheus metrics of one gateway app, and the in-flight counter a policy may read.

Contract: `GatewayMetrics` owns its own `CollectorRegistry` (never the global one), so several
apps (tests) never share series. Series:
- `nld_gateway_requests_total{mode,status}`: finished completion requests; `mode` is the
  decoding mode used (`none` when the request failed before a mode was chosen), `status` the
  HTTP status (`499` when the client went away; a failure after streaming began counts with
  the status it would have had).
- `nld_gateway_request_seconds{mode}`: request latency to the last byte (histogram).
- `nld_gateway_time_to_first_token_seconds{mode}`: to the first upstream chunk (histogram).
- `nld_gateway_inflight_requests`: completion requests being served now.
- `nld_gateway_upstream_retries_total`: connection failures retried.
- `nld_gateway_upstream_requests_total{route}`: /generate attempts sent `direct` to a replica's
  own port, `channel` (the same, a streamed request whose events ride the replica's stream
  channel, `gateway.channel`) or through the `ingress` (`gateway.direct`).
- `nld_gateway_direct_replicas`: replicas the gateway may send to directly now (healthy).
- `nld_gateway_stream_channels`: stream channels open to direct replicas (`gateway.channel`).
- `nld_gateway_engine_pushes_total{result}`: the policy's engine settings pushed to the
  replicas when they changed (`ok`, `error`).
`InflightCounter` is the gateway-local concurrency signal: `value` is read lock-free by a
policy's `decide` on the event loop. Non-goals: replica or engine metrics (the replicas export
those).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class InflightCounter:
    """Completion requests the gateway is serving now (single event loop: no lock needed)."""

    def __init__(self) -> None:
        self.value = 0
        self.peak = 0

    def enter(self) -> None:
        self.value += 1
        if self.value > self.peak:
            self.peak = self.value

    def exit(self) -> None:
        self.value -= 1


class GatewayMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, inflight: InflightCounter, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.inflight = inflight
        self.requests = Counter("nld_gateway_requests", "Completion requests by decoding mode and HTTP status",
                                ["mode", "status"], registry=self.registry)
        self.latency = Histogram("nld_gateway_request_seconds", "Request latency to the last byte", ["mode"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.ttft = Histogram("nld_gateway_time_to_first_token_seconds", "Latency to the first upstream chunk",
                              ["mode"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.retries = Counter("nld_gateway_upstream_retries", "Connection failures to the replicas retried",
                               registry=self.registry)
        self.engine_pushes = Counter("nld_gateway_engine_pushes", "Engine settings pushed to the replicas",
                                     ["result"], registry=self.registry)
        self.upstream = Counter("nld_gateway_upstream_requests", "Requests sent to the replicas, by route",
                                ["route"], registry=self.registry)
        self._routes = {r: self.upstream.labels(route=r) for r in ("direct", "channel", "ingress")}
        self.direct_replicas = Gauge("nld_gateway_direct_replicas", "Replicas reachable directly (healthy)",
                                     registry=self.registry)
        self.stream_channels = Gauge("nld_gateway_stream_channels", "Stream channels open to direct replicas",
                                     registry=self.registry)
        gauge = Gauge("nld_gateway_inflight_requests", "Completion requests being served", registry=self.registry)
        gauge.set_function(lambda: inflight.value)
        # label children cached: .labels() costs a lock and a dict lookup per call
        self._children: dict = {}  # (mode, status) -> (count, latency); mode -> ttft

    def finished(self, mode: str | None, status: int, seconds: float | None = None) -> None:
        m = mode or "none"
        key = (m, status)
        child = self._children.get(key)
        if child is None:
            child = (self.requests.labels(mode=m, status=str(status)), self.latency.labels(mode=m))
            self._children[key] = child
        child[0].inc()
        if seconds is not None:
            child[1].observe(seconds)

    def first_token(self, mode: str, seconds: float) -> None:
        child = self._children.get(mode)
        if child is None:
            child = self._children[mode] = self.ttft.labels(mode=mode)
        child.observe(seconds)

    def routed(self, route: str) -> None:
        self._routes[route].inc()

    def engine_pushed(self, result: str) -> None:
        self.engine_pushes.labels(result=result).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
