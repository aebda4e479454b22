"""The tail profiler's attribution: slow requests against each process group's CPU, and the share
of slow and fast requests that overlapped a burst of Ray's dashboard agent."""

from __future__ import annotations

import pytest

from benchmarks.serving_profile import group_of
from benchmarks.tail_profile import GROUPS, attribute, bursts, busy, intervals


def test_process_groups_follow_the_command_lines():
    assert group_of("/x/python -m replicas.engine.core_loop 5", GROUPS) == "engine"
    assert group_of("ray::DashboardAgent", GROUPS) == "agent"
    assert group_of("ray::ServeReplica:nld:NLDReplica", GROUPS) == "replica"
    assert group_of("/x/ray/core/src/ray/gcs/gcs_server --a", GROUPS) == "gcs"
    assert group_of("/x/python -m gateway up --port 1", GROUPS) == "gateway"
    assert group_of("/x/.venv/bin/nld-gateway serve --port 1", GROUPS) == "gateway"
    assert group_of("/x/python -u -m replicas --port 2", GROUPS) == "driver"
    assert group_of("bash", GROUPS) is None


def test_slow_requests_are_attributed_to_the_burst_they_overlapped():
    # 10 intervals of 0.1 s; the agent burns 0.05 s of CPU in [0.5, 0.6) (half a core), else 0.001
    samples, cpu = [], {"agent": 0.0, "engine": 0.0}
    for k in range(11):
        samples.append((k * 0.1, dict(cpu)))
        cpu = {"agent": cpu["agent"] + (0.05 if k == 5 else 0.001), "engine": cpu["engine"] + 0.18}
    series = intervals(samples)
    assert len(series) == 10 and series[5][2]["agent"] == pytest.approx(0.05)
    assert bursts(series) == [(0.5, pytest.approx(0.6))]
    assert busy(series, "agent", 0.5, 0.6) == pytest.approx(0.5)
    assert busy(series, "engine", 0.0, 1.0) == pytest.approx(1.8)
    fast = [{"start": s, "end": s + 0.2, "error": None} for s in (0.0, 0.1, 0.7, 0.8)]
    slow = [{"start": 0.45, "end": 0.75, "error": None}]
    failed = [{"start": 0.0, "end": 0.9, "error": "503"}]
    rep = attribute(fast + slow + failed, series, slow=1.3)
    assert rep["requests"] == 5 and rep["slow"] == 1 and rep["fast"] == 4
    assert rep["share_overlapping_an_agent_burst"] == {"slow": 1.0, "fast": 0.0}
    assert rep["busy_cores"]["agent"]["slow"] > 10 * rep["busy_cores"]["agent"]["fast"]
    assert rep["agent_bursts_s"] == [0.5] and rep["slow_starts_s"] == [0.45]
    with pytest.raises(ValueError):
        attribute(failed, series)
