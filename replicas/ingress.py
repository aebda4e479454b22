"""How HTTP reaches the replicas: Ray Serve's settings for the ingress, as environment variables.

Contract: `serve_env(IngressConfig)` returns the environment Ray Serve must see before Ray
starts (its settings are environment variables read at import, in every Ray process). Entry
points (`python -m replicas`, the test and benchmark launchers, the Helm chart) apply it; nothing
else reads or writes the environment.

- `haproxy` (the default): each replica serves HTTP itself on its own port ("direct ingress")
  and Ray Serve runs HAProxy on the Serve port in front of them, with health checks, least-
  connections balancing and draining; Serve still manages, health-checks and autoscales the
  replicas. A request or a streamed chunk then costs one HAProxy hop (C, event-driven) instead
  of the Python proxy actor plus a Ray object per chunk: measured on the 2-core VM at
  concurrency 32, the replica process and the proxy used 5.0 + 5.8 CPU-seconds for 96 streamed
  requests through the proxy, against 1.3-1.7 + 0.4 (HAProxy) for 128 through HAProxy
  (docs/PERFORMANCE.md, "Serving path"). User code runs on the replica's server loop
  (`RAY_SERVE_THROUGHPUT_OPTIMIZED`), which saves a thread hop per ASGI message.
- `proxy`: Ray Serve's Python HTTP proxy actor (Serve's default), for clusters that cannot run
  the bundled HAProxy binary.

HAProxy's stats and Prometheus listeners bind every interface (Ray Serve offers no host
setting): give them ports (`stats_port`, `metrics_port`) that a firewall or NetworkPolicy
closes. Non-goals: starting Ray (the entry points do), the gateway's own client.
"""

from __future__ import annotations

import socket
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Ingress = Literal["haproxy", "proxy"]


class IngressConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Ingress = "haproxy"
    stats_port: int = Field(default=8404, ge=1, le=65535, description="HAProxy's stats page (all interfaces)")
    metrics_port: int = Field(default=9101, ge=1, le=65535, description="HAProxy's Prometheus page (all interfaces)")
    fallback_port: int = Field(default=8500, ge=1, le=65535,
                               description="the Python proxy HAProxy falls back to while no replica is up")
    fallback_grpc_port: int = Field(default=9500, ge=1, le=65535)
    drain_s: float = Field(default=30.0, ge=0, description="a stopping replica keeps serving this long, so load "
                           "balancers deregister it before it refuses connections")
    haproxy_threads: int = Field(default=1, ge=1, description="HAProxy worker threads")


def serve_env(config: IngressConfig) -> dict[str, str]:
    """The environment for Ray Serve (for `proxy`, the switches off, overriding inherited ones)."""
    if config.kind == "proxy":
        return {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0",
                "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",  # implies direct ingress on the replicas
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_HAPROXY_STATS_PORT": str(config.stats_port),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(config.metrics_port),
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(config.fallback_port),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(config.fallback_grpc_port),
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": f"{config.drain_s:g}",
        "RAY_SERVE_HAPROXY_NBTHREAD": str(config.haproxy_threads),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_ingress(kind: Ingress = "haproxy", drain_s: float = 2.0) -> IngressConfig:
    """An ingress for a stack on one machine: HAProxy's side ports on free ports (so stacks side
    by side never clash), and a short drain (nothing balances across machines here)."""
    return IngressConfig(kind=kind, stats_port=free_port(), metrics_port=free_port(), fallback_port=free_port(),
                         fallback_grpc_port=free_port(), drain_s=drain_s)
