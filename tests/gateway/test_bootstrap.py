"""The composition root (`gateway.bootstrap.build_gateway`) and the completion handler as a plain
class (`gateway.completion.CompletionHandler`, driven without a FastAPI app)."""

from __future__ import annotations

import asyncio
import json

import pytest

from gateway import GatewayConfig
from gateway.bootstrap import Gateway, PolicySpec, build_gateway, open_policy
from gateway.completion import CompletionHandler
from gateway.errors import GatewayError
from gateway.metrics import GatewayMetrics, InflightCounter
from gateway.openai_api import ChatCompletionRequest, CompletionRequest
from gateway.replica_client import HttpReplicaClient
from gateway.service import CompletionService
from policies import FixedModePolicy, PolicyHolder, StackPorts
from tests.gateway.fakes import FakeReplicaClient

from .servers import asgi_client

pytestmark = pytest.mark.anyio


def test_build_gateway_wires_a_fixed_policy_and_an_http_client():
    gw = build_gateway(GatewayConfig(), PolicySpec(mode="ar", client_override="deny"))
    assert isinstance(gw, Gateway) and isinstance(gw.client, HttpReplicaClient)
    assert isinstance(gw.policy, FixedModePolicy) and (gw.policy.mode, gw.policy.client_override) == ("ar", "deny")
    assert gw.app.state.policy is gw.policy and gw.app.state.metrics is gw.metrics
    assert gw.app.state.inflight is gw.metrics.inflight


RAY_PAGE_POLICY = """signals:
  - {name: fleet, source: scrape, urls: ["http://{metrics_host}:{metrics_port}/metrics"],
     metric: ray_nld_replica_num_requests_running}
mode: {signal: fleet, enter_loaded_above: 8, leave_loaded_below: 4}
"""


def test_build_gateway_opens_a_policy_file_with_the_stack_ports(tmp_path):
    (tmp_path / "ray_page.yaml").write_text(RAY_PAGE_POLICY)
    gw = build_gateway(GatewayConfig(), PolicySpec(file=tmp_path / "ray_page.yaml",
                                                   ports=StackPorts(metrics_host="10.1.2.3", metrics_port=9191)))
    assert isinstance(gw.policy, PolicyHolder)
    urls = {u for s in gw.policy.current.spec.signals if s.source == "scrape" for u in s.urls}
    assert urls == {"http://10.1.2.3:9191/metrics"}
    # the policy's series live in the gateway's registry (one /metrics page)
    assert b"nld_policy_" in gw.metrics.render()


def test_policy_spec_and_file_errors_are_config_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown decoding mode 'fast'"):
        PolicySpec(mode="fast")
    bad = tmp_path / "bad.yaml"
    bad.write_text("mode: {sparse_mode: nope}\n")
    with pytest.raises(ValueError):
        open_policy(PolicySpec(file=bad), GatewayMetrics(InflightCounter()))


async def test_build_gateway_serves_completions_through_an_injected_client():
    fake = FakeReplicaClient()
    gw = build_gateway(GatewayConfig(), PolicySpec(mode="diffusion"), client=fake)
    async with asgi_client(gw.app) as c:
        r = await c.post("/v1/completions", json={"model": "nld", "prompt": "x", "max_tokens": 4})
    assert r.status_code == 200 and r.headers["x-nld-decoding-mode"] == "diffusion"
    assert [q.mode for q in fake.requests] == ["diffusion"]


# ---- the completion handler without FastAPI -------------------------------------------------------

def handler(fake: FakeReplicaClient, **config) -> tuple[CompletionHandler, GatewayMetrics]:
    cfg = GatewayConfig(**config)
    metrics = GatewayMetrics(InflightCounter())
    return CompletionHandler(cfg, CompletionService(cfg, fake, FixedModePolicy(mode="self_spec")), metrics), metrics


async def never_disconnects() -> dict:
    await asyncio.Event().wait()
    return {}


async def test_handler_answers_json_with_the_mode_headers():
    fake = FakeReplicaClient()
    h, metrics = handler(fake)
    body = CompletionRequest(model="nld", prompt="def f(", max_tokens=8)
    r = await h.handle(body, chat=False, receive=never_disconnects)
    assert r.status_code == 200
    assert (r.headers["x-nld-decoding-mode"], r.headers["x-nld-mode-reason"]) == ("self_spec", "policy:fixed")
    payload = json.loads(r.body)
    assert payload["object"] == "text_completion" and payload["usage"]["completion_tokens"] == 8
    assert r.headers["x-request-id"] == payload["id"] and metrics.inflight.value == 0


async def test_handler_refuses_beyond_the_inflight_limit_and_counts_it():
    fake = FakeReplicaClient()
    h, metrics = handler(fake, max_inflight_requests=1)
    metrics.inflight.enter()  # one request already in flight
    body = ChatCompletionRequest(model="nld", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(GatewayError) as e:
        await h.handle(body, chat=True, receive=never_disconnects)
    assert e.value.status == 429 and fake.requests == []
    assert b'status="429"' in metrics.render()


async def test_handler_answers_499_and_aborts_upstream_on_disconnect():
    fake = FakeReplicaClient()
    fake.chunk_delay_s = 0.05  # a non-streaming answer takes 7 x 50 ms
    h, metrics = handler(fake)

    async def disconnect_soon() -> dict:
        await asyncio.sleep(0.05)
        return {"type": "http.disconnect"}

    body = CompletionRequest(model="nld", prompt="x", max_tokens=8)
    r = await h.handle(body, chat=False, receive=disconnect_soon)
    assert r.status_code == 499 and metrics.inflight.value == 0
    assert len(fake.streams) == 1 and fake.streams[0].closed  # the upstream request was aborted


async def test_handler_times_out_with_504_and_the_decided_mode():
    fake = FakeReplicaClient()
    fake.hang_s = 5.0
    h, _ = handler(fake, request_timeout_s=0.1)
    with pytest.raises(GatewayError) as e:
        await h.handle(CompletionRequest(model="nld", prompt="x", max_tokens=2), chat=False, receive=never_disconnects)
    assert e.value.status == 504 and e.value.extra_headers["x-nld-decoding-mode"] == "self_spec"
