"""The gateway pushes the policy's engine settings to the replicas when they change, without
waiting for the next request; a replica that refuses the push is retried."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from gateway import GatewayConfig, create_app
from gateway.engine_push import EngineSettingsPusher
from gateway.metrics import GatewayMetrics, InflightCounter
from gateway.replica_client import HttpReplicaClient, ReplicaError
from tests.gateway.fakes import FakeReplicaClient, FakeReplicaState, fake_replica_app
from policies import FixedModePolicy, parse_policy
from policies.build import build_policy
from replicas.wire import EngineSettings, ErrorInfo

from .servers import serve_in_thread

pytestmark = pytest.mark.anyio

POLICY = """
signals:
  - {name: load, source: local}
mode:
  signal: load
  smoothing: {ewma_half_life_s: 0}
  enter_loaded_above: 3
  leave_loaded_below: 1
  min_dwell_s: 0
engine:
  downgrade_running: true
"""


def settings(downgrade: bool) -> EngineSettings:
    return EngineSettings(draft_tiers=[], downgrade_self_spec=downgrade)


async def test_pushes_each_change_once_and_retries_a_refused_push():
    fake = FakeReplicaClient()
    current = {"value": settings(False)}
    results: list[str] = []
    pusher = EngineSettingsPusher(lambda: current["value"], fake, interval_s=0.01, retry_s=0.01,
                                  on_push=results.append)
    assert await pusher.push_if_changed() and await pusher.push_if_changed()
    assert fake.engine_updates == [settings(False)]  # unchanged settings are not pushed again
    current["value"] = settings(True)
    fake.engine_error = ReplicaError(503, ErrorInfo(message="down", type="service_unavailable_error"))
    assert not await pusher.push_if_changed()
    assert pusher.pushed == settings(False)  # not accepted: pushed again on the next check
    fake.engine_error = None
    assert await pusher.push_if_changed()
    assert fake.engine_updates == [settings(False), settings(True)]
    assert results == ["ok", "error", "ok"]
    current["value"] = None  # a policy without engine settings: nothing to push
    assert await pusher.push_if_changed() and len(fake.engine_updates) == 2


async def test_the_loop_follows_changes_and_stops():
    fake = FakeReplicaClient()
    current = {"value": settings(False)}
    pusher = EngineSettingsPusher(lambda: current["value"], fake, interval_s=0.01)
    pusher.start()
    try:
        await asyncio.sleep(0.05)
        current["value"] = settings(True)
        for _ in range(100):
            if len(fake.engine_updates) == 2:
                break
            await asyncio.sleep(0.01)
        assert fake.engine_updates == [settings(False), settings(True)]
    finally:
        await pusher.stop()
    assert pusher._task is None


def test_rejects_a_nonpositive_interval():
    with pytest.raises(ValueError, match="interval_s"):
        EngineSettingsPusher(lambda: None, FakeReplicaClient(), interval_s=0)


def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_policy_switch_reaches_the_replica_over_http_without_a_request():
    """A load step seen only by the policy (no completion request is sent): the replica gets
    downgrade on, then off when the load is gone; the push counter records both."""
    state = FakeReplicaState()
    load = {"value": 0.0}
    with serve_in_thread(fake_replica_app(state)) as replica_url:
        cfg = GatewayConfig(replica_url=replica_url)
        metrics = GatewayMetrics(InflightCounter())
        policy = build_policy(parse_policy(POLICY), local_counters={"inflight": lambda: load["value"]})
        app = create_app(cfg, HttpReplicaClient(cfg), policy, metrics=metrics, engine_push_interval_s=0.02)
        with serve_in_thread(app) as url:
            wait_until(lambda: len(state.engine_updates) == 1)
            assert state.engine_updates[0].downgrade_self_spec is False  # the policy's start state
            load["value"] = 10.0
            wait_until(lambda: len(state.engine_updates) == 2)
            assert state.engine_updates[1].downgrade_self_spec is True
            load["value"] = 0.0
            wait_until(lambda: len(state.engine_updates) == 3)
            assert state.engine_updates[2].downgrade_self_spec is False
            assert state.requests == []  # no completion carried them
            text = httpx.get(url + "/metrics").text
            assert 'nld_gateway_engine_pushes_total{result="ok"} 3.0' in text


def test_a_fixed_policy_pushes_nothing():
    state = FakeReplicaState()
    with serve_in_thread(fake_replica_app(state)) as replica_url:
        cfg = GatewayConfig(replica_url=replica_url)
        with serve_in_thread(create_app(cfg, HttpReplicaClient(cfg), FixedModePolicy(), engine_push_interval_s=0.01)):
            time.sleep(0.2)
    assert state.engine_updates == []


async def test_http_client_maps_a_refused_push_to_replica_error():
    state = FakeReplicaState()
    with serve_in_thread(fake_replica_app(state)) as replica_url:
        client = HttpReplicaClient(GatewayConfig(replica_url=replica_url + "/nowhere"))
        try:
            with pytest.raises(ReplicaError) as e:
                await client.update_engine(settings(True))
            assert e.value.status == 503  # no route: the app is not deployed there
        finally:
            await client.aclose()
    client = HttpReplicaClient(GatewayConfig(replica_url="http://127.0.0.1:9", connect_timeout_s=0.5))
    try:
        with pytest.raises(ReplicaError) as e:
            await client.update_engine(settings(True))
        assert e.value.status == 503
    finally:
        await client.aclose()
