"""Build a running mode policy from a policy file: YAML parse, validate, build.

Contract: `build_policy(spec, *, local_counters, metrics, http, ports, reports)` returns an
`AdaptiveModePolicy` whose signal URLs are filled in from `ports` (`StackPorts`) and whose
signal sources come from the `SOURCES` registry (`policies.sources`) (scrape sources of one policy share their page
fetches: `PageFetcher`; the URL `reports:` reads `reports`, the replicas' reports the gateway
collected from their answers: `policies.reports`); `PolicyHolder`
is the `ModePolicy` the gateway holds: it delegates to the current policy and swaps in a new
one on `reload(path)` (the new policy adopts the old one's mode and dwell clock), keeping the
old one and returning the error when the file is bad. Non-goals: watching files or signals
(the gateway schedules `reload`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import httpx
from prometheus_client import CollectorRegistry

from .adaptive import AdaptiveModePolicy, PolicyMetrics
from .base import ModeDecision, ModePolicyBase, ModeRequest
from .schema import PolicyFile, PolicyFileError, StackPorts, load_policy_file
from .reports import ReplicaReports
from .signals import PageFetcher, SignalBoard
from .sources import SOURCES

log = logging.getLogger("policies")
PRESETS = Path(__file__).parent / "presets"


def build_policy(spec: PolicyFile, *, local_counters: dict[str, Callable[[], float]] | None = None,
                 metrics: PolicyMetrics | None = None, http: httpx.AsyncClient | None = None,
                 clock: Callable[[], float] = time.monotonic, ports: StackPorts = StackPorts(),
                 reports: ReplicaReports | None = None, **policy_kw) -> AdaptiveModePolicy:
    http = http or httpx.AsyncClient()
    counters = local_counters or {"inflight": lambda: 0.0}
    spec = spec.resolved(ports)
    pages = PageFetcher(http, reports)
    sources = [SOURCES[s.source](s, pages, counters) for s in spec.signals]
    return AdaptiveModePolicy(spec, SignalBoard(sources, clock=clock), metrics=metrics, clock=clock, **policy_kw)


class PolicyHolder(ModePolicyBase):
    """The gateway's policy: hot-reloadable, one registry and HTTP client for its lifetime."""

    def __init__(self, path: str | Path, *, local_counters: dict[str, Callable[[], float]],
                 registry: CollectorRegistry, ports: StackPorts = StackPorts(),
                 reports: ReplicaReports | None = None) -> None:
        self.path = Path(path)
        self.local_counters, self.registry, self.ports = local_counters, registry, ports
        self.reports = reports  # None: a `reports:` signal reports that it has none (goes stale)
        self.http = httpx.AsyncClient()
        self.metrics = PolicyMetrics(registry)
        self.current = self._build(load_policy_file(self.path))
        self._mtime = self._stat()
        self.last_error: str | None = None
        self.started = False

    def _stat(self) -> float | None:
        try:
            return self.path.stat().st_mtime
        except OSError:
            return None

    def _build(self, spec: PolicyFile) -> AdaptiveModePolicy:
        return build_policy(spec, local_counters=self.local_counters, metrics=self.metrics, http=self.http,
                            ports=self.ports, reports=self.reports)

    def decide(self, request: ModeRequest) -> ModeDecision:
        return self.current.decide(request)

    def snapshot(self) -> dict:
        snap = self.current.snapshot()
        snap.update(file=str(self.path), reload_error=self.last_error,
                    reports=self.reports.snapshot() if self.reports is not None else None)
        return snap

    def engine_settings(self) -> dict | None:
        return self.current.engine_settings()

    def reload(self, force: bool = False) -> bool:
        """Re-read the file if it changed (or `force`); a bad file keeps the old policy. True if swapped."""
        mtime = self._stat()
        if not force and mtime == self._mtime:
            return False
        self._mtime = mtime
        try:
            spec = load_policy_file(self.path)
        except PolicyFileError as e:
            self.last_error = str(e)
            log.error("policy reload failed, keeping the previous policy: %s", e)
            return False
        old = self.current
        new = self._build(spec)
        new.adopt(old)
        if self.started:
            old.cancel()
            new.start()
        self.current, self.last_error = new, None
        log.info("policy reloaded from %s", self.path)
        return True

    def start(self) -> None:
        self.current.start()
        self.started = True

    async def stop(self) -> None:
        await self.current.stop()
        await self.http.aclose()
