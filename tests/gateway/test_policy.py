"""The mode policy is injected: it decides every request (auto and explicit), its decision is
the x-nld-decoding-mode header, and it can read the gateway's in-flight counter."""

from __future__ import annotations

import pytest

from gateway import GatewayConfig, create_app
from gateway.metrics import GatewayMetrics, InflightCounter
from policies import FixedModePolicy, ModeDecision, ModePolicyBase, ModeRequest

from .servers import asgi_client

pytestmark = pytest.mark.anyio


class LoadAwarePolicy(ModePolicyBase):
    """A policy in the shape of the adaptive one: reads the gateway's in-flight counter."""

    def __init__(self, inflight: InflightCounter) -> None:
        self.inflight = inflight
        self.seen: list[tuple[ModeRequest, int]] = []

    def decide(self, request: ModeRequest) -> ModeDecision:
        self.seen.append((request, self.inflight.value))
        if request.requested_mode != "auto":
            return ModeDecision(request.requested_mode, "client")
        return ModeDecision("ar" if self.inflight.value > 1 else "self_spec", "policy:load")

    def snapshot(self) -> dict:
        return {"policy": "load", "decisions": len(self.seen)}


async def test_policy_sees_requests_and_inflight(fake):
    metrics = GatewayMetrics(InflightCounter())
    policy = LoadAwarePolicy(metrics.inflight)
    app = create_app(GatewayConfig(), fake, policy, metrics=metrics)
    assert app.state.inflight is metrics.inflight
    async with asgi_client(app) as c:
        r = await c.post("/v1/completions", json={"model": "nld", "prompt": "x", "max_tokens": 3})
        assert (r.headers["x-nld-decoding-mode"], r.headers["x-nld-mode-reason"]) == ("self_spec", "policy:load")
        r = await c.post("/v1/chat/completions", json={"model": "nld", "messages": [{"role": "user", "content": "x"}],
                                                       "decoding_mode": "diffusion", "max_tokens": 2})
        assert r.headers["x-nld-decoding-mode"] == "diffusion"
        snap = (await c.get("/v1/nld/policy")).json()
    assert [(q.requested_mode, q.model, q.max_tokens) for q, _ in policy.seen] == [("auto", "nld", 3),
                                                                                  ("diffusion", "nld", 2)]
    assert snap == {"policy": "load", "decisions": 2, "gateway_inflight": 0}
    assert [q.mode for q in fake.requests] == ["self_spec", "diffusion"]


async def test_deny_override_forces_the_policy_mode(make_app, fake):
    async with asgi_client(make_app(policy=FixedModePolicy(mode="ar", client_override="deny"))) as c:
        r = await c.post("/v1/completions", json={"model": "nld", "prompt": "x", "decoding_mode": "self_spec"})
    assert (r.headers["x-nld-decoding-mode"], r.headers["x-nld-mode-reason"]) == ("ar", "override:deny")
    assert fake.requests[0].mode == "ar"


async def test_header_reports_the_mode_the_replica_used(make_app, fake):
    original = fake.generate

    async def downgraded(request):  # e.g. the replica moved a self_spec request to ar
        return await original(request.model_copy(update={"mode": "ar"}))
    fake.generate = downgraded
    async with asgi_client(make_app()) as c:
        r = await c.post("/v1/completions", json={"model": "nld", "prompt": "x", "max_tokens": 2})
    assert r.headers["x-nld-decoding-mode"] == "ar" and r.headers["x-nld-mode-reason"] == "policy:fixed"
