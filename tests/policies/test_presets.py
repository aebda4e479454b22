"""The shipped presets on the replicas' reports (the `reports:` page the gateway collects from
their answers): no fetch, and the number of replicas is read from the reports, not assumed (the
gateway's in-flight count is divided by it)."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from policies import PRESETS, ModeRequest, PolicyHolder, ReplicaReports
from replicas.report import Reporter

pytestmark = pytest.mark.anyio


def reports_of(running_per_replica: list[int]) -> ReplicaReports:
    """One report per replica, as their answers carry them (`replicas.report`), with the per-mode
    counts too (which the presets must not count as replicas)."""
    reports = ReplicaReports()
    for i, n in enumerate(running_per_replica):
        stats = {"running": n, "waiting": 0, "running_by_mode": {"prefill": 0, "ar": n, "self_spec": 0},
                 "kv_tokens_used": 0, "kv_tokens_total": 1, "cost_model": {}}
        reports.offer(Reporter(f"r{i}", "m", lambda stats=stats: stats, application="nld").header())
    return reports


async def decide_with(reports: ReplicaReports, preset: str, inflight: int) -> tuple[str, dict, int]:
    """(mode, snapshot, HTTP fetches the policy made)."""
    holder = PolicyHolder(PRESETS / f"{preset}.yaml", local_counters={"inflight": lambda: inflight},
                          registry=CollectorRegistry(), reports=reports)
    try:
        board = holder.current.board
        await asyncio.gather(*(board.poll_once(name) for name, s in board.sources.items() if s.interval_s))
        mode = holder.decide(ModeRequest()).mode
        pages = next(s.pages for s in board.sources.values() if hasattr(s, "pages"))
        return mode, holder.snapshot(), pages.fetches
    finally:
        await holder.stop()


@pytest.mark.parametrize("preset", ["adaptive", "adaptive_cpu", "static", "latency", "throughput"])
async def test_presets_read_the_replicas_reports_without_a_fetch(preset):
    mode, snap, fetches = await decide_with(reports_of([1, 1, 1]), preset, inflight=0)
    assert fetches == 0
    assert snap["reports"] == {"replicas": ["r0", "r1", "r2"], "offers": 3, "parsed": 3, "rejected": 0}
    assert snap["signals"]["replicas"]["value"] == 3.0  # three replicas, not 3 x 4 mode series
    assert snap["signals"]["fleet_running"]["value"] == 1.0
    assert all(s["error"] is None and not s["stale"] for s in snap["signals"].values())


async def test_gateway_inflight_is_divided_by_the_replicas_seen():
    """12 requests through this gateway: loaded for one replica (12 > 8), sparse for four (3)."""
    mode, snap, _ = await decide_with(reports_of([0]), "adaptive", inflight=12)
    assert (mode, snap["raw_value"]) == ("ar", 12.0)
    mode, snap, _ = await decide_with(reports_of([0, 0, 0, 0]), "adaptive", inflight=12)
    assert (mode, snap["raw_value"]) == ("self_spec", 3.0)


async def test_no_replica_reported_yet_does_not_divide_by_zero():
    mode, snap, _ = await decide_with(ReplicaReports(), "adaptive", inflight=9)
    assert snap["signals"]["replicas"]["value"] == 0.0
    assert (mode, snap["raw_value"]) == ("ar", 9.0)  # max(replicas, 1)


async def test_a_holder_without_the_gateways_reports_says_so_on_its_signals():
    """A preset run outside the gateway (no reports wired in) does not read zeros: its report
    signals carry an error naming the missing reports and no value (the board counts them stale)."""
    holder = PolicyHolder(PRESETS / "adaptive.yaml", local_counters={"inflight": lambda: 0},
                          registry=CollectorRegistry())
    try:
        board = holder.current.board
        await asyncio.gather(*(board.poll_once(name) for name, s in board.sources.items() if s.interval_s))
        snap = holder.snapshot()
    finally:
        await holder.stop()
    assert snap["reports"] is None
    for name in ("fleet_running", "replicas", "costs"):
        assert "reports:" in snap["signals"][name]["error"] and snap["signals"][name]["value"] is None
