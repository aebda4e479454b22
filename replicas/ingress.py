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

import random
import socket
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

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
    replica_port_min: int = Field(default=30000, ge=1, le=65535, description="the replicas' own HTTP ports (direct "
                                  "ingress) are chosen from here ...")
    replica_port_max: int = Field(default=31000, ge=1, le=65535, description="... to here (a NetworkPolicy opens "
                                  "this range to the gateway, which may send to them directly)")

    @model_validator(mode="after")
    def _ports(self) -> "IngressConfig":
        if self.replica_port_min > self.replica_port_max:
            raise ValueError("replica_port_min must not exceed replica_port_max")
        return self


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
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(config.replica_port_min),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(config.replica_port_max),
    }


EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST_PORT = 10_000  # free ports are chosen from here up to the kernel's ephemeral range


def ephemeral_range(path: Path = EPHEMERAL_RANGE) -> tuple[int, int]:
    """The ports the kernel hands out to bind(0) and outgoing connections (Linux's default when
    the file is missing or unreadable)."""
    try:
        low, high = (int(x) for x in path.read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port(ephemeral: tuple[int, int] | None = None, tries: int = 200, exclude: frozenset[int] = frozenset()) -> int:
    """A TCP port that nothing binds now, on any interface, chosen at random BELOW the kernel's
    ephemeral range. The caller binds it later (Ray Serve's HAProxy, a server the tests start),
    so the port must not be one the kernel may give meanwhile to another process's bind(0) or
    outgoing connection: an ephemeral port released by this check is often the next one handed
    out (a vLLM starting beside a stack took HAProxy's stats port that way). Falls back to an
    ephemeral port when the range leaves no room below it, or `tries` random ports are taken.
    `exclude`: ports already chosen for something else (not bound yet, so a check cannot see them)."""
    low, _ = ephemeral or ephemeral_range()
    pick = random.SystemRandom()
    for _ in range(tries if low > LOWEST_PORT else 0):
        port = pick.randrange(LOWEST_PORT, low)
        if port in exclude:
            continue
        with socket.socket() as s:
            try:
                s.bind(("", port))  # every interface: HAProxy's side listeners bind them all
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_ingress(kind: Ingress = "haproxy", drain_s: float = 2.0) -> IngressConfig:
    """An ingress for a stack on one machine: HAProxy's side listeners on four distinct free ports
    (`free_port`: checked unbound, outside the ephemeral range, so stacks and other servers side by
    side do not take them), and a short drain (nothing balances across machines here)."""
    ports: list[int] = []
    for _ in range(4):
        ports.append(free_port(exclude=frozenset(ports)))
    stats, metrics, fallback, fallback_grpc = ports
    return IngressConfig(kind=kind, stats_port=stats, metrics_port=metrics, fallback_port=fallback,
                         fallback_grpc_port=fallback_grpc, drain_s=drain_s)
