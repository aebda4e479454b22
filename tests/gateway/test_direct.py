"""Direct routes (`gateway.direct`) and the replica client's use of them, against scripted loopback
servers standing in for HAProxy and for the replicas' own ports: replicas learned from answers,
least-in-flight choice, health checks that drain and restore, fallback to the ingress on a
refused connection or a dead engine, in-flight counts released by streams, forgetting, and the
discovery loop. The real Ray Serve path is in test_direct_e2e.py."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest

from gateway import GatewayConfig
from gateway.bootstrap import build_replica_client
from gateway.direct import HEALTH_PATH, DirectRoutes
from gateway.metrics import GatewayMetrics, InflightCounter
from gateway.replica_client import HttpReplicaClient, ReplicaError
from gateway.upstream import UpstreamPool
from replicas.channel_wire import CHANNEL_HEADER, CHANNEL_PATH, encode_record
from replicas.wire import (REPLICA_HEADER, ErrorBody, ErrorInfo, GenerateRequest, parse_replica_address,
                           replica_address)
from tests.gateway.fakes import fake_chunks

from .servers import ScriptedServer

pytestmark = pytest.mark.anyio

REQ = GenerateRequest(request_id="r-0", prompt="hi", mode="ar", max_tokens=5, stream=False)
STREAM = GenerateRequest(request_id="r-1", prompt="hi", mode="ar", max_tokens=5, stream=True)


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Replica:
    """A scripted replica: answers /generate (one JSON chunk, or NDJSON when streaming) and
    /-/healthz with `health` (200 or 503 DRAINING), naming itself in REPLICA_HEADER. With
    `channels`, it opens stream channels (`replicas.channel_wire`) and puts a bound request's
    lines after the first there; without, /channel is a 404 (a replica before channels)."""

    def __init__(self, rid: str, *, generate_status: int = 200, advertise: bool = True,
                 channels: bool = True) -> None:
        self.rid, self.health, self.generate_status, self.advertise = rid, 200, generate_status, advertise
        self.server = ScriptedServer(self.respond)
        self.gate: asyncio.Event | None = None  # set: a streamed answer waits for it after its first line
        self.channels = channels
        self.open_channels: dict[str, object] = {}  # channel id -> its request (to send records on)
        self.bound = 0  # streamed requests whose lines went to a channel
        self.truncate = False  # a bound request's answer ends after its first line, no record sent

    async def __aenter__(self) -> "Replica":
        await self.server.__aenter__()
        self.header = replica_address(self.rid, "127.0.0.1", self.server.port)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.server.__aexit__(*exc)

    def generates(self) -> int:
        return sum(r.path.endswith("/generate") for r in self.server.requests)

    async def respond(self, req) -> None:
        named = f"{REPLICA_HEADER}: {self.header}\r\n" if self.advertise else ""
        if req.path == HEALTH_PATH:  # at the port's root, as Serve answers it whatever the route prefix
            body = b"success" if self.health == 200 else b"DRAINING"
            await req.send(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s" % (self.health, len(body), body))
            return
        if req.path.endswith("/health"):
            await req.json_response(200, {"status": "ok"}, extra=named)
            return
        if req.path.endswith(CHANNEL_PATH):
            if not self.channels:
                await req.json_response(404, {"error": {"message": "no route", "type": "not_found_error"}})
                return
            cid = f"ch-{len(self.open_channels)}"
            self.open_channels[cid] = req
            await req.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            await send_chunk(req, encode_record(0, cid.encode()))
            await req.reader.read()  # open until the gateway closes it
            self.open_channels.pop(cid, None)
            return "close"
        if self.generate_status != 200:
            body = ErrorBody(error=ErrorInfo(message="engine died", type="service_unavailable_error",
                                             code="engine_dead")).model_dump_json()
            await req.json_response(self.generate_status, body, extra=named)
            return
        request = GenerateRequest.model_validate_json(req.body)
        chunks = fake_chunks(request)
        if not request.stream:
            last = chunks[-1].model_copy(update={"text": "".join(c.text for c in chunks)})
            await req.json_response(200, last.model_dump_json(exclude_none=True), extra=named)
            return
        channel = self.open_channels.get(request.channel.id) if request.channel is not None else None
        bound = f"{CHANNEL_HEADER}: bound\r\n" if channel is not None else ""
        self.bound += channel is not None
        await req.send(b"HTTP/1.1 200 OK\r\n" + (named + bound).encode() + b"Transfer-Encoding: chunked\r\n\r\n")
        for k, c in enumerate(chunks):
            line = c.model_dump_json(exclude_none=True).encode() + b"\n"
            if k > 0 and channel is not None:
                if self.truncate:
                    break
                await send_chunk(channel, encode_record(request.channel.stream, line))
            else:
                await send_chunk(req, line)
            if k == 0 and self.gate is not None:
                await self.gate.wait()
        await req.send(b"0\r\n\r\n")


async def send_chunk(req, data: bytes) -> None:
    await req.send(b"%x\r\n%s\r\n" % (len(data), data))


def passed(replica) -> None:
    """The state a passing `/-/healthz` check leaves (`DirectRoutes.check`)."""
    replica.passed, replica.failing_since = True, None


def direct_client(ingress_url: str, routes: list, **config) -> tuple[HttpReplicaClient, DirectRoutes]:
    cfg = GatewayConfig(replica_url=ingress_url, **config)
    pool = UpstreamPool(cfg.replica_url)
    direct = DirectRoutes(pool, health_interval_s=60, discover_interval_s=60)  # checks run by hand here
    return HttpReplicaClient(cfg, pool, direct=direct, on_route=routes.append), direct


async def test_first_request_through_the_ingress_teaches_the_replica_then_requests_go_direct():
    async with Replica("a") as a:
        async def ingress_answer(req):  # HAProxy: forwards to replica a (its header included)
            await a.respond(req)
        async with ScriptedServer(ingress_answer) as ingress:
            routes: list[str] = []
            client, direct = direct_client(ingress.url, routes)
            for k in range(3):
                answer = [c async for c in await client.generate(REQ)]
                assert answer[-1].finish_reason == "length"
                if k == 0:  # learned from that answer: requests go there once its first check passed
                    assert direct.pick() is None
                    await asyncio.gather(*direct._checks)
            assert routes == ["ingress", "direct", "direct"]
            assert sum(r.path == "/generate" for r in ingress.requests) == 1 and a.generates() == 2
            assert direct.snapshot() == [{"replica_id": "a", "address": f"127.0.0.1:{a.server.port}",
                                          "healthy": True, "inflight": 0}]
            await client.aclose()


async def test_under_a_route_prefix_requests_keep_it_and_health_checks_do_not():
    async with Replica("a") as a:
        async with ScriptedServer(a.respond) as ingress:
            client, direct = direct_client(ingress.url + "/app", [])
            direct.learn(a.header)
            assert await direct.check(direct._replicas["a"]) is True
            await client.generate(REQ)
            paths = [r.path for r in a.server.requests]
            assert "/app/generate" in paths and HEALTH_PATH in paths
            await client.aclose()


async def test_pick_is_least_in_flight_rotates_ties_and_skips_unhealthy():
    direct = DirectRoutes(UpstreamPool("http://127.0.0.1:1"))
    for rid, port in (("a", 1001), ("b", 1002), ("c", 1003)):
        direct.learn(replica_address(rid, "127.0.0.1", port))
    assert direct.pick() is None  # none has passed a health check yet
    a, b, c = (direct._replicas[k] for k in "abc")
    for r in (a, b, c):
        passed(r)  # as after a passing check (the checks are tested below)
    assert {direct.pick().replica_id for _ in range(6)} == {"a", "b", "c"}  # ties rotate
    direct.begin(a), direct.begin(b)
    assert direct.pick() is c
    direct.begin(c), direct.begin(c)
    assert direct.pick() in (a, b)
    direct.failed(a), direct.failed(b)
    assert direct.pick() is c and direct.healthy_count() == 1
    direct.failed(c)
    assert direct.pick() is None


async def test_learn_ignores_malformed_headers_keeps_a_cap_and_follows_a_moved_replica():
    direct = DirectRoutes(UpstreamPool("http://127.0.0.1:1/app"), max_replicas=2)
    for bad in (None, "", "a", "a 127.0.0.1", "a 127.0.0.1:x", "a 127.0.0.1:0", "a 127.0.0.1:70000", " :80"):
        direct.learn(bad)
    assert direct.snapshot() == []
    direct.learn("a 127.0.0.1:1001")
    direct.learn("b [::1]:1002")
    direct.learn("c 127.0.0.1:1003")  # over the cap: not kept
    assert [r["address"] for r in direct.snapshot()] == ["127.0.0.1:1001", "[::1]:1002"]
    a = direct._replicas["a"]
    direct.begin(a)
    direct.learn("a 127.0.0.2:2001")  # the same replica at a new address keeps its in-flight count
    moved = direct._replicas["a"]
    assert moved.address == "127.0.0.2:2001" and moved.inflight == 1
    assert (moved.pool.host, moved.pool.port, moved.pool.prefix) == ("127.0.0.2", 2001, "/app")  # ingress prefix kept
    await direct.aclose()


def test_replica_address_round_trip():
    assert parse_replica_address(replica_address("r1", "10.0.0.7", 30001)) == ("r1", "10.0.0.7", 30001, None)
    assert parse_replica_address(replica_address("r1", "fd00::7", 30001, "s1")) == ("r1", "fd00::7", 30001, "s1")
    assert replica_address("r1", "fd00::7", 30001, "s1") == "r1 [fd00::7]:30001 s1"
    assert parse_replica_address("r1 10.0.0.7:") is None and parse_replica_address("10.0.0.7:80") is None
    assert parse_replica_address("r1 10.0.0.7:80 s1 extra") is None


async def test_an_ingress_answer_from_a_new_ray_cluster_forgets_the_old_clusters_replicas():
    """KubeRay's NewCluster upgrade moves its Service to a new Ray cluster: the first answer through
    the ingress from it drops every replica of the old one (which finishes what it has)."""
    direct = DirectRoutes(UpstreamPool("http://127.0.0.1:1"))
    direct.learn(replica_address("a", "10.0.0.1", 30001, "old"))
    direct.learn(replica_address("b", "10.0.0.2", 30001, "old"), via_ingress=False)
    a = direct._replicas["a"]
    direct.begin(a)
    direct.learn(replica_address("c", "10.1.0.1", 30001, "new"))
    assert [r["replica_id"] for r in direct.snapshot()] == ["c"] and direct.cluster == "new"
    passed(direct._replicas["c"])
    direct.end(a)  # a request still running on the old cluster ends normally
    direct.learn(replica_address("a", "10.0.0.1", 30001, "old"), via_ingress=False)  # its direct answer
    assert [r["replica_id"] for r in direct.snapshot()] == ["c"]
    assert direct.pick().replica_id == "c"
    await direct.aclose()


async def test_a_draining_replica_gets_no_new_requests_and_returns_when_healthy():
    async with Replica("a") as a, Replica("ingress-side", advertise=False) as behind:
        async with ScriptedServer(behind.respond) as ingress:
            routes: list[str] = []
            client, direct = direct_client(ingress.url, routes)
            direct.learn(a.header)
            a.health = 503  # Serve began the replica's graceful shutdown
            assert await direct.check(direct._replicas["a"]) is False
            await client.generate(REQ)
            assert routes[-1] == "ingress" and a.generates() == 0
            a.health = 200
            assert await direct.check(direct._replicas["a"]) is True
            await client.generate(REQ)
            assert routes[-1] == "direct" and a.generates() == 1
            await client.aclose()


@pytest.mark.parametrize("failure", ["refused", "engine_dead"])
async def test_a_failed_direct_attempt_goes_through_the_ingress_outside_connect_retries(failure):
    async with Replica("ingress-side", advertise=False) as behind, Replica("a", generate_status=503) as dead:
        async with ScriptedServer(behind.respond) as ingress:
            routes: list[str] = []
            retries = []
            cfg = GatewayConfig(replica_url=ingress.url, connect_retries=0)
            pool = UpstreamPool(cfg.replica_url)
            direct = DirectRoutes(pool, health_interval_s=60, discover_interval_s=60)
            client = HttpReplicaClient(cfg, pool, direct=direct, on_route=routes.append,
                                       on_retry=lambda: retries.append(1))
            dead.health = 503  # Serve's health check fails a replica whose engine died (UNHEALTHY)
            direct.learn(f"a 127.0.0.1:{closed_port()}" if failure == "refused" else dead.header)
            passed(direct._replicas["a"])  # it passed, then died
            answer = [c async for c in await client.generate(REQ)]
            assert answer[-1].finish_reason == "length"
            assert routes[:2] == ["direct", "ingress"] and retries == [1]
            assert direct.healthy_count() == 0 and direct._replicas["a"].inflight == 0
            await client.aclose()


async def test_the_ingress_failing_too_is_a_503():
    routes: list[str] = []
    client, direct = direct_client(f"http://127.0.0.1:{closed_port()}", routes, connect_retries=1)
    direct.learn(f"a 127.0.0.1:{closed_port()}")
    passed(direct._replicas["a"])  # it passed, then died
    with pytest.raises(ReplicaError) as e:
        await client.generate(REQ)
    assert e.value.status == 503 and e.value.info.code == "no_replica"
    assert routes == ["direct", "ingress", "ingress"]  # the direct try, then 1 + connect_retries
    await client.aclose()


async def test_a_stream_counts_in_flight_until_it_ends_or_is_closed():
    async with Replica("a") as a:
        async with ScriptedServer(a.respond) as ingress:
            client, direct = direct_client(ingress.url, [])
            direct.learn(a.header)
            r = direct._replicas["a"]
            assert await direct.check(r)
            a.gate = asyncio.Event()
            stream = await client.generate(STREAM)
            assert r.inflight == 1
            a.gate.set()
            chunks = [c async for c in stream]
            assert chunks[-1].finish_reason == "length" and r.inflight == 0
            a.gate = asyncio.Event()  # closed early (client went away)
            stream = await client.generate(STREAM)
            assert r.inflight == 1
            await stream.aclose()
            await stream.aclose()  # idempotent: counted down once
            assert r.inflight == 0
            a.gate.set()
            await client.aclose()


async def test_a_replica_failing_its_checks_is_forgotten_after_forget_after_s():
    now = [0.0]
    direct = DirectRoutes(UpstreamPool("http://127.0.0.1:1"), forget_after_s=10, health_timeout_s=1,
                          clock=lambda: now[0])
    direct.learn(f"a 127.0.0.1:{closed_port()}")
    await direct.check_all()
    assert direct.snapshot()[0]["healthy"] is False
    now[0] = 9.0
    await direct.check_all()
    assert len(direct.snapshot()) == 1
    now[0] = 10.5
    await direct.check_all()
    assert direct.snapshot() == []


async def test_the_discovery_loop_learns_replicas_through_the_ingress_and_stops():
    async with Replica("a") as a:
        async with ScriptedServer(a.respond) as ingress:
            direct = DirectRoutes(UpstreamPool(ingress.url), health_interval_s=0.02, discover_interval_s=0.02)
            direct.start()
            direct.start()  # idempotent
            for _ in range(200):
                if direct.snapshot():
                    break
                await asyncio.sleep(0.01)
            assert [r["replica_id"] for r in direct.snapshot()] == ["a"]
            for _ in range(200):  # and its health check ran on the replica's own port
                if any(r.path == HEALTH_PATH for r in a.server.requests):
                    break
                await asyncio.sleep(0.01)
            assert any(r.path == HEALTH_PATH for r in a.server.requests)
            await direct.aclose()
            assert direct.snapshot() == []


async def test_build_replica_client_honours_replica_routing_and_counts_routes():
    async with Replica("a") as a:
        async with ScriptedServer(a.respond) as ingress:
            for routing, expected in (("direct", ["ingress", "direct"]), ("ingress", ["ingress", "ingress"])):
                metrics = GatewayMetrics(InflightCounter())
                client = build_replica_client(GatewayConfig(replica_url=ingress.url, replica_routing=routing),
                                              metrics)
                for _ in range(2):
                    await client.generate(REQ)
                    if client._direct is not None:
                        await asyncio.gather(*client._direct._checks)  # the learned replica's first check
                page = metrics.render().decode()
                counts = {r: f'nld_gateway_upstream_requests_total{{route="{r}"}} {float(expected.count(r))}'
                          for r in ("direct", "ingress")}
                assert all(line in page for line in counts.values()), page
                assert f"nld_gateway_direct_replicas {1.0 if routing == 'direct' else 0.0}" in page
                await client.aclose()


def test_config_rejects_unknown_routing():
    with pytest.raises(ValueError):
        GatewayConfig(replica_routing="sideways")
    assert json.loads(GatewayConfig().model_dump_json())["replica_routing"] == "direct"


async def test_a_replica_whose_port_cannot_be_reached_never_gets_a_request(caplog):
    """A NetworkPolicy or firewall between the gateway and the replicas' ports: the replica is
    learned but its first check fails, so every request stays on the ingress, and it is said once."""
    async with Replica("ingress-side", advertise=False) as behind:
        async with ScriptedServer(behind.respond) as ingress:
            routes: list[str] = []
            client, direct = direct_client(ingress.url, routes)
            for _ in range(3):
                direct.learn(f"a 127.0.0.1:{closed_port()}")
                await asyncio.gather(*direct._checks)
                await client.generate(REQ)
            assert routes == ["ingress"] * 3 and direct.healthy_count() == 0
            assert sum("does not answer its health check" in r.message for r in caplog.records) == 1
            await client.aclose()


async def test_a_failing_round_does_not_stop_the_checks(caplog):
    async with Replica("a") as a:
        async with ScriptedServer(a.respond) as ingress:
            direct = DirectRoutes(UpstreamPool(ingress.url), health_interval_s=0.02, discover_interval_s=0.02)
            rounds = []
            real = direct.check_all

            async def flaky():
                rounds.append(1)
                if len(rounds) == 1:
                    raise RuntimeError("boom")
                await real()
            direct.check_all = flaky
            direct.start()
            for _ in range(200):
                if len(rounds) >= 3 and direct.healthy_count() == 1:
                    break
                await asyncio.sleep(0.01)
            assert len(rounds) >= 3 and direct.healthy_count() == 1
            assert any("health round failed" in r.message for r in caplog.records)
            await direct.aclose()
