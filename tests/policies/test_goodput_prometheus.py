"""The goodput signal read through a real Prometheus server's federation endpoint: on Kubernetes
the gateway cannot reach every node's Ray metrics port, but Prometheus scrapes them all, and
`/federate` serves the replicas' latest samples as the same Prometheus text the `goodput` source
parses (timestamps after the values are ignored; Prometheus adds `instance` and `job`). The view
read through Prometheus equals the view read from the page itself."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from policies import parse_policy
from policies.cost_view import GoodputSource
from policies.schema import StackPorts
from policies.signals import PageFetcher

from .test_goodput import CPU, cost_page
from .pages import MetricsPage

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

# the cluster preset's URL: {ray_match} is match[]={__name__=~"ray_nld_replica_.*",<ray_selector>}, URL-encoded
FEDERATE = "{prometheus_url}/federate?{ray_match}"


def source(url: str, http: httpx.AsyncClient, ports: StackPorts = StackPorts()) -> GoodputSource:
    spec = parse_policy(f"""
signals:
  - {{name: costs, source: goodput, urls: ["{url}"], per: replica}}
mode: {{signal: costs, enter_loaded_above: 8, leave_loaded_below: 4, goodput: {{costs: costs}}}}
""")
    return GoodputSource(spec.resolved(ports).signals[0], PageFetcher(http))


async def test_the_goodput_source_reads_the_fleet_through_prometheus_federation():
    from tests.prometheus import PrometheusServer

    slow = {k: 2 * v for k, v in CPU.items()}
    page_text = cost_page([
        {"coef": CPU, "steps": 300, "self_spec": {32: (4.0, 30)}, "shapes": [(1, 1, 0.004, 20), (32, 256, 0.05, 9)],
         "realized": {("ar", 32): (3000.0, 6), ("self_spec", 1): (500.0, 4)}},
        {"coef": slow, "steps": 100, "self_spec": {32: (8.0, 10), 8: (3.0, 5)}, "realized": {("ar", 32): (2000.0, 2)}}])
    async with MetricsPage(page_text) as page, httpx.AsyncClient() as http:
        direct = source(f"http://127.0.0.1:{page.port}/metrics", http)
        assert await direct.read() == 400
        prom = await asyncio.to_thread(PrometheusServer.start, [f"127.0.0.1:{page.port}"], 0.5)
        try:
            # the release's series only: Prometheus labels the page's samples with job="nld"
            federated = source(FEDERATE, http, StackPorts(prometheus_url=prom.url, ray_selector='{job="nld"}'))
            other = source(FEDERATE, http, StackPorts(prometheus_url=prom.url, ray_selector='{job="another"}'))
            deadline = time.monotonic() + 30
            while True:  # until Prometheus has scraped the page once
                try:
                    if await federated.read() == 400:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "Prometheus never served the replicas' samples"
                await asyncio.sleep(0.5)
            assert await other.read() == 0 and other.view.replicas == 0  # another release's selector
        finally:
            prom.stop()
    a, b = direct.view, federated.view
    assert b.replicas == 2 and b.steps == 400
    assert b.coef == pytest.approx(a.coef)
    assert b.self_spec == a.self_spec and b.diffusion == a.diffusion
    assert sorted(b.shapes) == sorted(a.shapes) and len(b.shapes) == 2
    assert b.realized == a.realized and b.realized[("self_spec", 1)] == (500.0, 4)
