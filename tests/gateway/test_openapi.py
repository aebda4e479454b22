"""`/openapi.json` is a valid OpenAPI document (openapi-spec-validator), with and without auth,
so code generators accept it, and it publishes the configured limits."""

from __future__ import annotations

import pytest
from openapi_spec_validator import validate

from gateway import GatewayConfig, create_app
from tests.gateway.fakes import FakeReplicaClient
from policies import FixedModePolicy

from .servers import asgi_client

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("config", [
    GatewayConfig(),
    GatewayConfig(auth_enabled=True, api_keys=frozenset({"sk-x"}), max_tokens_limit=64, default_max_tokens=16),
])
async def test_the_served_document_validates(config):
    async with asgi_client(create_app(config, FakeReplicaClient(), FixedModePolicy())) as c:
        r = await c.get("/openapi.json")
    assert r.status_code == 200
    doc = r.json()
    validate(doc)  # raises OpenAPIValidationError, naming the offending node, when invalid
    assert doc["openapi"].startswith("3.1")
    post = doc["paths"]["/v1/completions"]["post"]
    assert post["responses"]["200"]["content"]["text/event-stream"]["schema"]["required"] == ["data"]
    props = doc["components"]["schemas"]["CompletionRequest"]["properties"]
    limits = [b.get("maximum") for b in props["max_tokens"]["anyOf"] if b.get("type") == "integer"]
    assert limits == [config.max_tokens_limit]
    assert ("securitySchemes" in doc["components"]) == config.auth_enabled


def test_the_validator_rejects_what_the_gateway_used_to_publish():
    """The check has teeth: 3.2's `itemSchema` in a 3.1 document (the old event-stream entry)."""
    from openapi_spec_validator.validation.exceptions import OpenAPIValidationError

    doc = create_app(GatewayConfig(), FakeReplicaClient(), FixedModePolicy()).openapi()
    media = doc["paths"]["/v1/completions"]["post"]["responses"]["200"]["content"]["text/event-stream"]
    media["itemSchema"] = media.pop("schema")
    with pytest.raises(OpenAPIValidationError, match="itemSchema"):
        validate(doc)
