"""The gateway's composition root: `build_gateway(config, policy_spec)` wires one gateway.

Contract: `build_gateway(config, policy_spec, *, metrics=None, client=None, **app_options)`
returns a `Gateway` (its FastAPI `app`, `metrics`, `policy` and replica `client`): the metrics
(a fresh `GatewayMetrics` unless given), the replica client (unless given, `build_replica_client`:
an `HttpReplicaClient` on `config.replica_url`, with `gateway.direct` routes to the replicas' own
ports unless `replica_routing` is `ingress`; retries and routes counted in the metrics; the
replicas' reports on its answers collected into one `ReplicaReports` when a policy file is
given), the mode policy from `policy_spec` (`open_policy`, reading those reports as its
`reports:` page) and the app (`gateway.app.create_app`). `nld-gateway serve`, `nld-gateway up`
and the benchmarks all build their gateway here, so they are wired alike.
A `PolicySpec` names the policy: a policy file (hot-reloaded, its signal URLs' placeholders
filled from `ports`) or, without one, a fixed mode. Invalid configuration raises one of
`CONFIG_ERRORS` before anything runs; `config_error` prints it as the CLI's one line (never a
key). `auth_fields` turns a key path (flag, else `$NLD_API_KEY_FILE` from the given environment)
into `GatewayConfig` fields. Non-goals: argument parsing (`gateway.cli`, `gateway.up`),
running a server (`gateway.listeners`, `gateway.up`), reading `os.environ`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from fastapi import FastAPI
from pydantic import ValidationError

from policies import FixedModePolicy, ModePolicy, PolicyHolder, ReplicaReports, StackPorts
from replicas.wire import MODES

from .app import create_app
from .config import GatewayConfig
from .metrics import GatewayMetrics, InflightCounter
from .direct import DirectRoutes
from .replica_client import HttpReplicaClient, ReplicaClient
from .upstream import UpstreamPool

API_KEY_ENV = "NLD_API_KEY_FILE"
CONFIG_ERRORS = (ValidationError, ValueError, OSError)


@dataclass(frozen=True)
class PolicySpec:
    """Which mode policy a gateway runs: `file` (a policy YAML, hot-reloaded; `{metrics_host}` /
    `{metrics_port}` in its signal URLs come from `ports`), else a fixed `mode` for `auto`
    requests with `client_override` for explicit ones."""
    file: str | Path | None = None
    mode: str = "self_spec"
    client_override: str = "allow"
    ports: StackPorts = field(default_factory=StackPorts)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode: unknown decoding mode {self.mode!r} (choose one of {', '.join(MODES)})")


@dataclass
class Gateway:
    """One wired gateway: serve `app` (it closes `client` on shutdown)."""
    app: FastAPI
    metrics: GatewayMetrics
    policy: ModePolicy
    client: ReplicaClient


def open_policy(spec: PolicySpec, metrics: GatewayMetrics, reports: ReplicaReports | None = None) -> ModePolicy:
    """The running mode policy of `spec`: a `PolicyHolder` on the file (its `local` signals read
    the gateway's in-flight counter, its `reports:` page the replicas' reports, its metrics go to
    the gateway's registry), else a `FixedModePolicy`. Raises `PolicyFileError` (a ValueError)
    for a bad file."""
    if spec.file is not None:
        return PolicyHolder(spec.file, local_counters={"inflight": lambda: metrics.inflight.value},
                            registry=metrics.registry, ports=spec.ports, reports=reports)
    return FixedModePolicy(mode=spec.mode, client_override=spec.client_override)


def build_gateway(config: GatewayConfig, policy_spec: PolicySpec, *, metrics: GatewayMetrics | None = None,
                  client: ReplicaClient | None = None, **app_options) -> Gateway:
    """Wire one gateway (see the module contract); `app_options` go to `create_app`."""
    metrics = metrics or GatewayMetrics(InflightCounter())
    # the replicas' reports feed a policy file's `reports:` signals; a fixed mode reads none
    reports = ReplicaReports(keep_s=config.replica_report_keep_s) if policy_spec.file is not None else None
    policy = open_policy(policy_spec, metrics, reports)
    if client is None:
        client = build_replica_client(config, metrics, on_report=reports.offer if reports is not None else None)
    app = create_app(config, client, policy, metrics=metrics, **app_options)
    return Gateway(app=app, metrics=metrics, policy=policy, client=client)


def build_replica_client(config: GatewayConfig, metrics: GatewayMetrics,
                         on_report: Callable[[str | None], None] | None = None) -> HttpReplicaClient:
    """The HTTP replica client on `config.replica_url`, with direct routes to the replicas' own
    ports unless `config.replica_routing` is `ingress`; retries and routes counted in `metrics`."""
    pool = UpstreamPool(config.replica_url, connect_timeout_s=config.connect_timeout_s,
                        max_idle=config.max_idle_connections)
    direct = None
    if config.replica_routing == "direct":
        direct = DirectRoutes(pool, connect_timeout_s=config.direct_connect_timeout_s,
                              health_interval_s=config.direct_health_interval_s,
                              discover_interval_s=config.direct_discover_interval_s,
                              forget_after_s=config.direct_forget_after_s, max_idle=config.max_idle_connections,
                              stream_channels=config.stream_channels, channel_idle_s=config.channel_idle_s,
                              pack_ar=config.pack_ar)
        metrics.direct_replicas.set_function(direct.healthy_count)
        metrics.stream_channels.set_function(direct.open_channels)
    return HttpReplicaClient(config, pool, on_retry=metrics.retries.inc, on_report=on_report, direct=direct,
                             on_route=metrics.routed)


def auth_fields(api_key_file: str | None, no_auth: bool, environ: dict[str, str]) -> dict:
    """`GatewayConfig` fields for auth: keys from the flag, else from `$NLD_API_KEY_FILE`; none
    (auth off) without either or with `no_auth`. Raises ValueError for a missing or empty key
    path (the message names the path, never a key)."""
    from .auth import load_api_keys

    key_path = api_key_file or environ.get(API_KEY_ENV) or None
    if not key_path or no_auth:
        return {}
    return {"api_keys": load_api_keys(key_path), "auth_enabled": True}


def config_error(command: str, e: Exception) -> int:
    """Print the one-line configuration error of `nld-gateway <command>`; the exit status (2)."""
    print(f"nld-gateway {command}: invalid configuration: {_first_line(e)}", file=sys.stderr)
    return 2


def _first_line(e: Exception) -> str:
    if isinstance(e, ValidationError):  # never echo input values (they may be keys)
        err = e.errors()[0]
        return f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg')}"
    return str(e).splitlines()[0] if str(e) else type(e).__name__
