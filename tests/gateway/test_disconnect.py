"""A client that goes away cancels its upstream requests: the replica stream is closed (aborted),
in-flight goes back to zero and the request counts as 499."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from gateway import GatewayConfig, create_app
from gateway.replica_client import HttpReplicaClient
from tests.gateway.fakes import FakeReplicaState, fake_replica_app
from policies import FixedModePolicy

from .servers import asgi_client, call_with_disconnect, serve_in_thread

pytestmark = pytest.mark.anyio

BODY = {"model": "nld", "prompt": "hi", "max_tokens": 50, "decoding_mode": "ar"}


async def wait_for(predicate, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("path, extra", [("/v1/completions", {}), ("/v1/chat/completions", {"n": 3})])
async def test_disconnect_mid_stream_aborts_upstream(make_app, fake, path, extra):
    fake.chunk_delay_s = 0.05
    app = make_app()
    body = dict(BODY, stream=True, **extra)
    if "chat" in path:
        body = {k: v for k, v in body.items() if k != "prompt"} | {"messages": [{"role": "user", "content": "x"}]}
    t0 = time.monotonic()
    sent = await call_with_disconnect(app, path, body, disconnect_after_bodies=2)
    assert time.monotonic() - t0 < 1.0  # did not wait for the 50 tokens
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    assert len(fake.streams) == extra.get("n", 1)
    assert all(s.aborted for s in fake.streams)
    assert all(s.sent < 50 for s in fake.streams)
    assert app.state.inflight.value == 0
    async with asgi_client(app) as c:
        text = (await c.get("/metrics")).text
    assert 'nld_gateway_requests_total{mode="ar",status="499"} 1.0' in text


async def test_disconnect_while_waiting_non_streaming_aborts_upstream(make_app, fake):
    fake.chunk_delay_s = 0.05
    app = make_app()
    sent = await call_with_disconnect(app, "/v1/completions", BODY, disconnect_after_bodies=0)
    assert [s.aborted for s in fake.streams] == [True]
    assert fake.streams[0].sent < 50
    assert app.state.inflight.value == 0
    assert all(m.get("status") != 200 for m in sent if m["type"] == "http.response.start")


async def test_disconnect_before_the_first_chunk(make_app, fake):
    fake.hang_s = 2.0  # the replica has not answered yet (prefill)
    app = make_app()
    t0 = time.monotonic()
    await call_with_disconnect(app, "/v1/completions", dict(BODY, stream=True), disconnect_after_bodies=0)
    assert time.monotonic() - t0 < 1.0
    assert len(fake.requests) == 1 and not fake.streams and app.state.inflight.value == 0


async def test_inflight_counts_open_streams(make_app, fake):
    fake.chunk_delay_s = 0.02
    app = make_app()
    async with asgi_client(app) as c:
        task = asyncio.ensure_future(c.post("/v1/completions", json=dict(BODY, stream=True, max_tokens=10)))
        await wait_for(lambda: app.state.inflight.value == 1)
        assert (await c.get("/v1/nld/policy")).json()["gateway_inflight"] == 1
        await task
    assert app.state.inflight.value == 0 and app.state.inflight.peak == 1


def test_full_stack_disconnect_reaches_the_replica_over_http():
    """uvicorn gateway -> HttpReplicaClient -> uvicorn fake replica: closing the client's
    connection mid-stream makes the replica see a disconnect for that request."""
    state = FakeReplicaState(chunk_delay_s=0.05)
    with serve_in_thread(fake_replica_app(state)) as replica_url:
        config = GatewayConfig(replica_url=replica_url)
        app = create_app(config, HttpReplicaClient(config), FixedModePolicy())
        with serve_in_thread(app) as gateway_url:
            with httpx.Client(base_url=gateway_url, timeout=5) as c:
                with c.stream("POST", "/v1/completions", json=dict(BODY, stream=True)) as r:
                    assert r.status_code == 200 and r.headers["x-nld-decoding-mode"] == "ar"
                    lines = r.iter_lines()
                    assert next(lines).startswith("data: ")
                deadline = time.monotonic() + 3
                while not state.aborted and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert state.aborted == [state.requests[0].request_id]
                assert not state.completed
                # and the next request is served normally
                r = c.post("/v1/completions", json=dict(BODY, max_tokens=3))
                assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
