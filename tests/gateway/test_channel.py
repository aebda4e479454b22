"""The gateway's stream channels (`gateway.channel`, and their use by `gateway.direct` and the
replica client) against scripted replicas (test_direct.Replica): streams ride a replica's
channel once it is open and yield exactly what an unbound stream yields; a replica without
channels is asked at most once per `channel_idle_s`; a lost channel ends its streams with
`replica_lost`; an answer that ends before its last chunk is reported lost; closing a bound
stream unbinds it and resets its request; idle and draining replicas' channels are closed.
The replica's end is in tests/replicas/test_channels.py, Ray Serve's in test_direct_e2e.py."""

from __future__ import annotations

import asyncio

import pytest

from gateway import replica_stream
from gateway.config import GatewayConfig
from gateway.direct import DirectRoutes
from gateway.replica_client import HttpReplicaClient
from gateway.upstream import UpstreamPool
from replicas.channel_wire import CHANNEL_PATH
from replicas.wire import GenerateChunk, GenerateRequest, replica_address
from tests.gateway.fakes import fake_chunks

from .servers import ScriptedServer
from .test_direct import Replica

pytestmark = pytest.mark.anyio


def stream_req(k: int, max_tokens: int = 6) -> GenerateRequest:
    return GenerateRequest(request_id=f"r-{k}", prompt=f"p{k}", mode="ar", max_tokens=max_tokens, stream=True)


async def client_for(a: Replica, ingress: ScriptedServer, **direct_kw) -> tuple[HttpReplicaClient, DirectRoutes]:
    cfg = GatewayConfig(replica_url=ingress.url)
    pool = UpstreamPool(cfg.replica_url)
    direct = DirectRoutes(pool, health_interval_s=60, discover_interval_s=60, **direct_kw)
    direct.learn(a.header)
    assert await direct.check(direct._replicas[a.rid])
    return HttpReplicaClient(cfg, pool, direct=direct), direct


async def client_with_channel(a: Replica, ingress: ScriptedServer, **direct_kw):
    """`client_for`, and the replica's channel opened and ready."""
    client, direct = await client_for(a, ingress, **direct_kw)
    direct.channel(direct._replicas[a.rid])
    await channel_ready(direct, a.rid)
    return client, direct


async def channel_ready(direct: DirectRoutes, rid: str) -> None:
    r = direct._replicas[rid]
    for _ in range(200):
        if direct.channel(r) is not None:
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the channel did not open")


async def drain(stream) -> list:
    return [c async for c in stream]


def expected(req: GenerateRequest) -> list[GenerateChunk]:
    return fake_chunks(req)


async def test_streams_ride_the_channel_once_open_and_yield_what_unbound_streams_yield():
    async with Replica("a") as a, ScriptedServer(a.respond) as ingress:
        client, direct = await client_for(a, ingress)
        first = [c async for c in await client.generate(stream_req(0))]  # opens the channel meanwhile
        assert first == expected(stream_req(0)) and a.bound == 0
        await channel_ready(direct, "a")
        streams = [await client.generate(stream_req(k, 4 + k)) for k in range(1, 7)]  # all in flight at once
        got = await asyncio.gather(*(drain(s) for s in streams))
        assert got == [expected(stream_req(k, 4 + k)) for k in range(1, 7)]
        assert a.bound == 6 and len(a.open_channels) == 1
        assert sum(r.path.endswith(CHANNEL_PATH) for r in a.server.requests) == 1
        channel = direct._replicas["a"].channel
        assert len(channel) == 0 and direct.open_channels() == 1  # every stream unbound at its end
        assert direct._replicas["a"].inflight == 0
        await client.aclose()
        for _ in range(100):  # the replica sees the channel closed
            if not a.open_channels:
                break
            await asyncio.sleep(0.01)
        assert not a.open_channels


async def test_a_replica_without_channels_streams_on_its_own_answers_and_is_asked_once_a_while():
    async with Replica("a", channels=False) as a, ScriptedServer(a.respond) as ingress:
        client, direct = await client_for(a, ingress, channel_idle_s=60)
        for k in range(5):
            assert [c async for c in await client.generate(stream_req(k))] == expected(stream_req(k))
            await asyncio.sleep(0.02)
        assert sum(r.path.endswith(CHANNEL_PATH) for r in a.server.requests) == 1 and a.bound == 0
        await client.aclose()


async def test_without_stream_channels_configured_none_is_opened():
    async with Replica("a") as a, ScriptedServer(a.respond) as ingress:
        client, direct = await client_for(a, ingress, stream_channels=False)
        for k in range(3):
            assert [c async for c in await client.generate(stream_req(k))] == expected(stream_req(k))
        assert not any(r.path.endswith(CHANNEL_PATH) for r in a.server.requests)
        await client.aclose()


async def test_a_lost_channel_ends_its_streams_with_replica_lost_and_a_new_one_opens():
    async with Replica("a") as a, ScriptedServer(a.respond) as ingress:
        client, direct = await client_with_channel(a, ingress)
        a.gate = asyncio.Event()  # the replica holds each stream after its first line
        stream = await client.generate(stream_req(1, 20))
        assert a.bound == 1
        next(iter(a.open_channels.values())).writer.transport.abort()  # the channel's connection dies
        chunks = [c async for c in stream]
        assert chunks[-1].finish_reason == "error" and chunks[-1].error.code == "replica_lost"
        assert direct._replicas["a"].inflight == 0
        a.gate.set()
        await channel_ready(direct, "a")  # the next streams open a new one
        assert [c async for c in await client.generate(stream_req(2))] == expected(stream_req(2))
        assert a.bound == 2
        await client.aclose()


async def test_an_answer_that_ends_before_its_last_chunk_is_reported_lost(monkeypatch):
    monkeypatch.setattr(replica_stream, "CHANNEL_GRACE_S", 0.05)
    async with Replica("a") as a, ScriptedServer(a.respond) as ingress:
        client, direct = await client_with_channel(a, ingress)
        a.truncate = True  # bound, its first line, then the answer ends and no record follows
        chunks = [c async for c in await client.generate(stream_req(1))]
        assert chunks[0] == expected(stream_req(1))[0] and a.bound == 1
        assert chunks[-1].finish_reason == "error" and chunks[-1].error.code == "replica_lost"
        assert len(direct._replicas["a"].channel) == 0
        await client.aclose()


async def test_closing_a_bound_stream_unbinds_it_and_resets_its_request():
    async with Replica("a") as a, ScriptedServer(a.respond) as ingress:
        client, direct = await client_with_channel(a, ingress)
        a.gate = asyncio.Event()
        stream = await client.generate(stream_req(1, 20))
        channel = direct._replicas["a"].channel
        assert a.bound == 1 and len(channel) == 1
        await stream.aclose()
        assert len(channel) == 0 and direct._replicas["a"].inflight == 0
        (req,) = [r for r in a.server.requests if r.path.endswith("/generate")]
        try:  # the replica sees its request's connection go (reset, or at least closed)
            gone = await asyncio.wait_for(req.reader.read(), 5) == b""
        except ConnectionError:
            gone = True
        assert gone
        a.gate.set()
        assert channel.ready  # the channel itself stays for the other streams
        await client.aclose()


async def test_idle_and_draining_replicas_channels_are_closed():
    async with Replica("a") as a, ScriptedServer(a.respond) as ingress:
        client, direct = await client_with_channel(a, ingress, channel_idle_s=0.05)
        r = direct._replicas["a"]
        await direct.check_all()
        assert r.channel is not None  # not idle long enough yet
        await asyncio.sleep(0.1)
        await direct.check_all()
        assert r.channel is None and direct.open_channels() == 0
        direct.channel_idle_s = 60
        direct.channel(r)
        await channel_ready(direct, "a")
        a.health = 503  # draining: its channel goes at the next round even though it is fresh
        await direct.check_all()
        assert r.channel is None
        for _ in range(100):
            if not a.open_channels:
                break
            await asyncio.sleep(0.01)
        assert not a.open_channels
        await client.aclose()


async def test_a_forgotten_clusters_channel_carries_its_streams_to_their_end_then_closes():
    async with Replica("a") as a, ScriptedServer(a.respond) as ingress:
        client, direct = await client_with_channel(a, ingress)
        channel = direct._replicas["a"].channel
        a.gate = asyncio.Event()
        stream = await client.generate(stream_req(1, 8))
        direct.learn(replica_address("b", "127.0.0.1", 1, "a-new-cluster"))  # KubeRay's NewCluster upgrade
        assert "a" not in direct._replicas
        await direct.check_all()
        assert channel.ready and len(channel) == 1  # its stream is still running there
        a.gate.set()
        assert await drain(stream) == expected(stream_req(1, 8))
        await direct.check_all()
        assert channel.closed
        await client.aclose()
