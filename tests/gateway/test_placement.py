"""Placement of direct requests (`gateway.placement`, `DirectRoutes.pick(mode)`, `pack_ar`): spread by
default; requests running `ar` fill the busiest replica below N with `pack_ar` N; through the real
replica client against scripted replicas; the option from `serve` and `up` flags."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
from pydantic import ValidationError

from gateway import GatewayConfig
from gateway.cli import build_parser, serve_config
from gateway.direct import DirectRoutes
from gateway.placement import choose
from gateway.replica_client import HttpReplicaClient
from gateway.up import AUTO_PACK_AR, up_config
from gateway.upstream import UpstreamPool
from replicas.wire import GenerateRequest, replica_address

from .servers import ScriptedServer
from .test_direct import Replica, passed

pytestmark = pytest.mark.anyio


@dataclass
class R:
    name: str
    inflight: int = 0
    healthy: bool = True


def test_spread_is_the_least_loaded_healthy_replica_first_in_rotation_order():
    rs = [R("a", 2), R("b", 1), R("c", 1, healthy=False), R("d", 1)]
    assert choose(rs, 0).name == "b"
    assert choose(rs, 2).name == "d"  # rotation from c (unhealthy) on: d before b
    assert choose(rs, 0, fill_below=0).name == "b"
    assert choose([], 0) is None and choose([R("x", healthy=False)], 0, 4) is None


def test_fill_takes_the_busiest_below_the_limit_then_the_least_loaded():
    rs = [R("a", 3), R("b", 1), R("c", 0)]
    assert choose(rs, 0, fill_below=4).name == "a"  # 3 < 4: the busiest still open
    rs[0].inflight = 4
    assert choose(rs, 0, fill_below=4).name == "b"  # a is full: the next busiest below 4
    rs[1].inflight = 4
    assert choose(rs, 0, fill_below=4).name == "c"
    rs[2].inflight = 5
    assert choose(rs, 0, fill_below=4).name == "a"  # all full: the least loaded (a and b tie; a first)
    assert choose(rs, 1, fill_below=4).name == "b"  # ties rotate
    idle = [R("a"), R("b")]
    assert {choose(idle, k, fill_below=4).name for k in range(2)} == {"a", "b"}  # all idle: rotation
    rs = [R("a", 3, healthy=False), R("b", 1)]
    assert choose(rs, 0, fill_below=4).name == "b"  # an unhealthy replica is never filled


def test_pick_fills_for_ar_and_spreads_the_other_modes():
    direct = DirectRoutes(UpstreamPool("http://127.0.0.1:1"), pack_ar=3)
    for rid, port in (("a", 1001), ("b", 1002)):
        direct.learn(replica_address(rid, "127.0.0.1", port))
    a, b = direct._replicas["a"], direct._replicas["b"]
    passed(a), passed(b)
    first = direct.pick("ar")
    direct.begin(first)
    other = b if first is a else a
    for _ in range(2):  # the same replica until it has 3
        assert direct.pick("ar") is first
        direct.begin(first)
    assert direct.pick("ar") is other  # full: the other one
    assert direct.pick("self_spec") is other and direct.pick(None) is other  # spread: the least loaded
    spread = DirectRoutes(UpstreamPool("http://127.0.0.1:1"))  # pack_ar 0 (the default): ar spreads too
    for rid, port in (("a", 1001), ("b", 1002)):
        spread.learn(replica_address(rid, "127.0.0.1", port))
    for r in spread._replicas.values():
        passed(r)
    x = spread.pick("ar")
    spread.begin(x)
    assert spread.pick("ar") is not x
    with pytest.raises(ValueError, match="pack_ar"):
        DirectRoutes(UpstreamPool("http://127.0.0.1:1"), pack_ar=-1)


def request(k: int, mode: str) -> GenerateRequest:
    return GenerateRequest(request_id=f"p-{k}", prompt="hi", mode=mode, max_tokens=5, stream=True)


async def test_the_replica_client_fills_one_replica_with_ar_streams_then_the_next():
    """Real `HttpReplicaClient` and `DirectRoutes` (built from `GatewayConfig.pack_ar`) against two
    scripted replicas holding their streams open: two `ar` streams land on one replica, the third on
    the other; a self_spec stream then goes to the least loaded; every stream ends."""
    async with Replica("a") as a, Replica("b") as b:
        async with ScriptedServer(a.respond) as ingress:
            cfg = GatewayConfig(replica_url=ingress.url, pack_ar=2)
            pool = UpstreamPool(cfg.replica_url)
            direct = DirectRoutes(pool, health_interval_s=60, discover_interval_s=60, stream_channels=False,
                                  pack_ar=cfg.pack_ar)
            client = HttpReplicaClient(cfg, pool, direct=direct)
            for rep in (a, b):
                direct.learn(rep.header)
                assert await direct.check(direct._replicas[rep.rid])
                rep.gate = asyncio.Event()
            streams = [await client.generate(request(k, "ar")) for k in range(3)]
            counts = sorted((a.generates(), b.generates()))
            assert counts == [1, 2]
            assert sorted(r.inflight for r in direct._replicas.values()) == [1, 2]
            lighter = a if a.generates() == 1 else b
            streams.append(await client.generate(request(3, "self_spec")))
            assert lighter.generates() == 2  # spread: to the replica with one in flight
            a.gate.set(), b.gate.set()
            for s in streams:
                chunks = [c async for c in s]
                assert chunks[-1].finish_reason == "length"
            assert all(r.inflight == 0 for r in direct._replicas.values())
            await client.aclose()


def test_pack_ar_from_the_flags_of_serve_and_up():
    parser, url = build_parser(), ["--replica-url", "http://127.0.0.1:8001"]
    assert serve_config(parser.parse_args(["serve", *url]), {}).pack_ar == 0  # spread unless asked
    assert serve_config(parser.parse_args(["serve", *url, "--pack-ar", "4"]), {}).pack_ar == 4
    assert up_config(parser.parse_args(["up", "--model", "m", "--pack-ar", "8"]), "m", {}).pack_ar == 8
    up = parser.parse_args(["up", "--model", "m"])  # auto: fill on a host of at most 2 CPUs, else spread
    assert up.pack_ar == "auto"
    assert [up_config(up, "m", {}, cpus=n).pack_ar for n in (1, 2, 3, 16)] == [AUTO_PACK_AR] * 2 + [0, 0]
    assert up_config(parser.parse_args(["up", "--model", "m", "--pack-ar", "0"]), "m", {}, cpus=2).pack_ar == 0
    for bad in ("-1", "x"):
        with pytest.raises(SystemExit):
            parser.parse_args(["serve", *url, "--pack-ar", bad])
        with pytest.raises(SystemExit):
            parser.parse_args(["up", "--model", "m", "--pack-ar", bad])
    with pytest.raises(SystemExit):  # serve cannot see the replicas' host: a count only
        parser.parse_args(["serve", *url, "--pack-ar", "auto"])
    with pytest.raises(ValidationError, match="pack_ar"):
        GatewayConfig(pack_ar=-1)
