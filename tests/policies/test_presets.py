"""The shipped presets on a live metrics page: the scrape URL follows the stack's ports, and the
number of replicas is read from the page, not assumed (the gateway's in-flight count is divided
by it)."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from policies import PRESETS, ModeRequest, PolicyHolder, StackPorts

pytestmark = pytest.mark.anyio


def ray_page(running_per_replica: list[int]) -> str:
    """Ray's metrics page as the replicas export it: one mode-free series per replica, and the
    per-mode series (which the presets must not count as replicas)."""
    lines = ["# TYPE ray_nld_replica_num_requests_running gauge"]
    for i, n in enumerate(running_per_replica):
        tags = f'application="nld",deployment="NLDReplica",replica="r{i}",model="m"'
        lines.append(f"ray_nld_replica_num_requests_running{{{tags}}} {n}.0")
        for mode in ("ar", "diffusion", "self_spec", "prefill"):
            lines.append(f'ray_nld_replica_running_requests{{{tags},mode="{mode}"}} {n if mode == "ar" else 0}.0')
    return "\n".join(lines) + "\n"


class MetricsPage:
    """A loopback HTTP server answering every GET with `self.text`; counts requests."""

    def __init__(self, text: str) -> None:
        self.text, self.hits = text, 0

    async def __aenter__(self) -> "MetricsPage":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()

    async def _serve(self, reader, writer) -> None:
        await reader.readuntil(b"\r\n\r\n")
        self.hits += 1
        body = self.text.encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()


async def decide_with(page: MetricsPage, preset: str, inflight: int) -> tuple[str, dict]:
    holder = PolicyHolder(PRESETS / f"{preset}.yaml", local_counters={"inflight": lambda: inflight},
                          registry=CollectorRegistry(), ports=StackPorts(metrics_port=page.port))
    try:
        board = holder.current.board
        await asyncio.gather(*(board.poll_once(name) for name, s in board.sources.items() if s.interval_s))
        mode = holder.decide(ModeRequest()).mode
        return mode, holder.snapshot()
    finally:
        await holder.stop()


@pytest.mark.parametrize("preset", ["adaptive", "static", "latency", "throughput"])
async def test_preset_reads_the_metrics_port_it_was_given(preset):
    async with MetricsPage(ray_page([1, 1, 1])) as page:
        _, snap = await decide_with(page, preset, inflight=0)
    assert page.hits == 1  # both scrape signals, one GET
    assert snap["signals"]["replicas"]["value"] == 3.0  # three replicas, not 3 x 4 mode series
    assert snap["signals"]["fleet_running"]["value"] == 1.0
    assert all(s["error"] is None and not s["stale"] for s in snap["signals"].values())


async def test_gateway_inflight_is_divided_by_the_replicas_seen():
    """12 requests through this gateway: loaded for one replica (12 > 8), sparse for four (3)."""
    async with MetricsPage(ray_page([0])) as one:
        mode, snap = await decide_with(one, "adaptive", inflight=12)
    assert (mode, snap["raw_value"]) == ("ar", 12.0)
    async with MetricsPage(ray_page([0, 0, 0, 0])) as four:
        mode, snap = await decide_with(four, "adaptive", inflight=12)
    assert (mode, snap["raw_value"]) == ("self_spec", 3.0)


async def test_no_replica_exported_yet_does_not_divide_by_zero():
    async with MetricsPage("# Ray is still starting\n") as page:
        mode, snap = await decide_with(page, "adaptive", inflight=9)
    assert snap["signals"]["replicas"]["value"] == 0.0
    assert (mode, snap["raw_value"]) == ("ar", 9.0)  # max(replicas, 1)
