"""Fuzz the gateway's own OpenAPI schema with schemathesis (positive and negative cases) against
the app with a fake replica client: no 5xx, every documented status and schema holds, and every
error body is the OpenAI envelope."""

from __future__ import annotations

import json

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from gateway import GatewayConfig, create_app
from gateway.testing import FakeReplicaClient
from policies import FixedModePolicy

# Auth off (the local default): 401s are covered by test_errors, and schemathesis' auth probes
# would need its own credential plumbing.
APP = create_app(GatewayConfig(max_tokens_limit=64, default_max_tokens=16), FakeReplicaClient(), FixedModePolicy())
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


def error_envelope(ctx, response, case) -> None:
    """Every 4xx/5xx body is {"error": {"message", "type", "param", "code"}}."""
    if response.status_code < 400:
        return
    body = json.loads(response.content)
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and isinstance(body["error"]["type"], str)


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_fuzz_openapi(case):
    case.call_and_validate(additional_checks=[error_envelope])
