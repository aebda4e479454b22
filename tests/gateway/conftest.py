"""Gateway test fixtures: the app over an in-process fake replica client, and loopback servers.

Every test builds its own app (its own metrics registry); nothing here touches the network
beyond 127.0.0.1.
"""

from __future__ import annotations

import pytest

from gateway import GatewayConfig, create_app
from tests.gateway.fakes import FakeReplicaClient
from policies import FixedModePolicy

from .servers import asgi_client

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def fake() -> FakeReplicaClient:
    return FakeReplicaClient()


@pytest.fixture
def make_app(fake):
    def build(policy=None, **config):
        return create_app(GatewayConfig(**config), fake, policy or FixedModePolicy())
    return build


@pytest.fixture
async def client(make_app):
    async with asgi_client(make_app()) as c:
        yield c
