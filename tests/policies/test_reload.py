"""`PolicyHolder`: hot reload keeps the mode, a bad file keeps the old policy and says why;
the gateway serves `GET /v1/nld/policy` and reloads on file change."""

from __future__ import annotations

import os
import time

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from policies import ModeRequest, PolicyHolder

pytestmark = pytest.mark.anyio

GOOD = """
signals: [{name: inflight, source: local}]
mode: {signal: inflight, enter_loaded_above: %s, leave_loaded_below: 1, min_dwell_s: 0}
"""


def touch(path, text):
    path.write_text(text)
    st = path.stat()
    os.utime(path, (st.st_atime, st.st_mtime + 5))  # a visibly newer mtime


async def test_reload_swaps_policy_keeps_mode_and_rejects_bad_files(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(GOOD % 3)
    load = {"n": 5.0}
    registry = CollectorRegistry()
    holder = PolicyHolder(path, local_counters={"inflight": lambda: load["n"]}, registry=registry)
    assert holder.decide(ModeRequest()).mode == "ar"  # 5 > 3
    assert holder.reload() is False  # unchanged file
    touch(path, GOOD % 10)
    assert holder.reload() is True
    assert holder.current.spec.mode.enter_loaded_above == 10
    assert holder.current.mode == "ar"  # the new policy adopts the old mode (5 >= 1: stays loaded)
    touch(path, "mode: {signal: nope}\n")
    assert holder.reload() is False
    assert "mode.enter_loaded_above: Field required" in holder.snapshot()["reload_error"]
    assert holder.current.spec.mode.enter_loaded_above == 10  # the old policy still decides
    load["n"] = 0.0
    assert holder.decide(ModeRequest()).mode == "self_spec"
    assert "nld_policy_switches_total" in generate_latest(registry).decode()
    await holder.stop()


async def test_gateway_reloads_the_file_and_reports_the_policy(tmp_path):
    from gateway.app import create_app
    from gateway.config import GatewayConfig
    from gateway.metrics import GatewayMetrics, InflightCounter
    from tests.gateway.fakes import FakeReplicaClient

    path = tmp_path / "p.yaml"
    path.write_text(GOOD % 3)
    metrics = GatewayMetrics(InflightCounter())
    holder = PolicyHolder(path, local_counters={"inflight": lambda: metrics.inflight.value},
                          registry=metrics.registry)
    app = create_app(GatewayConfig(model_name="m"), FakeReplicaClient(), holder, metrics=metrics,
                     reload_interval_s=0.05)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://g") as c:
            state = (await c.get("/v1/nld/policy")).json()
            assert state["mode"] == "self_spec" and state["policy"] == "adaptive"
            touch(path, GOOD % 7)
            deadline = time.monotonic() + 5
            while holder.current.spec.mode.enter_loaded_above != 7 and time.monotonic() < deadline:
                await __import__("asyncio").sleep(0.05)
            assert holder.current.spec.mode.enter_loaded_above == 7
            r = await c.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 3})
            assert r.status_code == 200 and r.headers["x-nld-decoding-mode"] == "self_spec"
            assert "nld_policy_mode" in (await c.get("/metrics")).text
