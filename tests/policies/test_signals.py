"""Signal sources against real HTTP shapes (httpx MockTransport): Prometheus API and scrape."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from policies.schema import PrometheusSignal, ScrapeSignal
from policies.signals import PageFetcher, PrometheusSource, ScrapeSource, SignalBoard, samples

pytestmark = pytest.mark.anyio

METRICS = """# HELP ray_nld_replica_running_requests requests holding a KV slot, by mode
# TYPE ray_nld_replica_running_requests gauge
ray_nld_replica_running_requests{application="nld",mode="ar",replica="a"} 3.0
ray_nld_replica_running_requests{application="nld",mode="self_spec",replica="a"} 1.0
ray_nld_replica_running_requests{application="nld",mode="ar",replica="b"} 2.0
ray_nld_replica_running_requests{application="other",mode="ar",replica="c"} 50.0
ray_nld_replica_running_requests_total 99
ray_nld_replica_waiting_requests{application="nld",replica="a"} 7.0
"""


def client(handler) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


async def test_scrape_sums_per_replica_then_aggregates():
    spec = ScrapeSignal(name="s", source="scrape", urls=["http://r/metrics"], metric="ray_nld_replica_running_requests",
                        labels={"application": "nld"}, per="replica", aggregate="mean")
    src = ScrapeSource(spec, client(lambda req: httpx.Response(200, text=METRICS)))
    assert await src.read() == 3.0  # replica a: 3 + 1, replica b: 2 -> mean 3
    src.spec = spec.model_copy(update={"aggregate": "max"})
    assert await src.read() == 4.0
    assert list(samples(METRICS, "ray_nld_replica_running_requests_total")) == [({}, 99.0)]


async def test_prometheus_query_sums_the_vector_and_reports_errors():
    seen = []

    def handler(req):
        seen.append(req.url.params["query"])
        if "bad" in req.url.params["query"]:
            return httpx.Response(400, json={"status": "error", "error": "parse error"})
        return httpx.Response(200, json={"status": "success", "data": {"resultType": "vector", "result": [
            {"metric": {}, "value": [0, "2.5"]}, {"metric": {}, "value": [0, "1"]}]}})

    spec = PrometheusSignal(name="p", source="prometheus", url="http://prom:9090", query="sum(x)", retries=1)
    assert await PrometheusSource(spec, client(handler)).read() == 3.5
    bad = PrometheusSource(spec.model_copy(update={"query": "bad("}), client(handler))
    with pytest.raises(RuntimeError, match="p: HTTPStatusError"):
        await bad.read()
    assert seen.count("bad(") == 2  # one retry


async def test_scrape_counts_the_replicas():
    spec = ScrapeSignal(name="replicas", source="scrape", urls=["http://r/metrics"],
                        metric="ray_nld_replica_running_requests", labels={"application": "nld"}, per="replica",
                        aggregate="count")
    assert await ScrapeSource(spec, client(lambda req: httpx.Response(200, text=METRICS))).read() == 2.0  # a, b
    empty = ScrapeSource(spec, client(lambda req: httpx.Response(200, text="# nothing yet\n")))
    assert await empty.read() == 0.0


async def test_sources_polling_one_page_at_once_share_one_fetch():
    """Two signals read from the same metrics page (the presets' running requests and replica
    count) cost one GET per poll, not two; a later poll fetches again."""
    gets = []

    async def handler(req):
        gets.append(str(req.url))
        await asyncio.sleep(0.02)  # Ray takes a while to produce its page
        return httpx.Response(200, text=METRICS)

    pages = PageFetcher(client(handler))
    base = dict(source="scrape", urls=["http://r/metrics"], metric="ray_nld_replica_running_requests",
                labels={"application": "nld"}, per="replica")
    mean = ScrapeSource(ScrapeSignal(name="fleet", aggregate="mean", **base), pages)
    count = ScrapeSource(ScrapeSignal(name="replicas", aggregate="count", **base), pages)
    board = SignalBoard([mean, count])
    await asyncio.gather(board.poll_once("fleet"), board.poll_once("replicas"))
    assert gets == ["http://r/metrics"] and pages.fetches == 1
    values, stale = board.read(board.clock())
    assert values == {"fleet": 3.0, "replicas": 2.0} and not stale
    await asyncio.gather(board.poll_once("fleet"), board.poll_once("replicas"))
    assert len(gets) == 2


async def test_a_failed_shared_fetch_fails_every_reader():
    pages = PageFetcher(client(lambda req: httpx.Response(503, text="down")))
    spec = ScrapeSignal(name="s", source="scrape", urls=["http://r/metrics"], metric="m")
    results = await asyncio.gather(ScrapeSource(spec, pages).read(), ScrapeSource(spec, pages).read(),
                                   return_exceptions=True)
    assert all(isinstance(r, httpx.HTTPStatusError) for r in results) and pages.fetches == 1


async def test_a_failed_fetch_whose_readers_were_cancelled_is_not_reported_as_lost():
    """A reload or a gateway stop cancels the readers of a fetch in flight; if that GET then
    fails, asyncio must not log 'Task exception was never retrieved' (seen in benchmark logs)."""
    import gc

    async def handler(req):
        await asyncio.sleep(0.05)
        raise httpx.ReadError("closed")

    lost = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: lost.append(context))
    try:
        pages = PageFetcher(client(handler))
        reader = asyncio.ensure_future(pages.text("http://r/metrics", 1.0))
        await asyncio.sleep(0.01)
        reader.cancel()
        await asyncio.sleep(0.1)  # the GET fails with nobody waiting
        assert pages.fetches == 1 and not pages._inflight and reader.cancelled()
        del reader  # nothing refers to the failed GET any more: it is collected now
        gc.collect()
        await asyncio.sleep(0)
        assert lost == []
    finally:
        loop.set_exception_handler(None)


async def test_a_local_counter_that_falls_an_octave_re_polls_the_polled_signals():
    """`repoll_after_s`: the fleet signal (polled every 10 s in the preset) follows a fall of the
    local load within seconds; moves within an octave, and rises (which `max()` of the two already
    follows), poll nothing extra."""
    import asyncio

    from policies.schema import LocalSignal
    from policies.signals import LocalSource, SignalBoard

    class Polled:
        name, interval_s, stale_after_s = "fleet", 30.0, 60.0

        def __init__(self) -> None:
            self.reads = 0

        async def read(self) -> float:
            self.reads += 1
            return 1.0

    inflight = {"n": 8}
    local = LocalSource(LocalSignal(name="local", source="local", repoll_after_s=0.1), lambda: inflight["n"])
    polled = Polled()
    board = SignalBoard([polled, local])
    board.start()
    try:
        await asyncio.sleep(0.05)
        assert polled.reads == 1  # the interval's first poll
        board.read(0.0)  # the base: 8
        inflight["n"] = 5  # within an octave
        board.read(0.0)
        await asyncio.sleep(0.2)
        assert polled.reads == 1 and board.refreshes == 0
        inflight["n"] = 1  # an octave (and more) down: one extra poll 0.1 s later
        board.read(0.0)
        board.read(0.0)  # the same move read twice: still one
        await asyncio.sleep(0.25)
        assert polled.reads == 2 and board.refreshes == 1
        inflight["n"] = 0  # below 1 counts as 1: no move
        board.read(0.0)
        inflight["n"] = 32  # a rise moves the base, polls nothing
        board.read(0.0)
        await asyncio.sleep(0.25)
        assert polled.reads == 2 and board.refreshes == 1
        inflight["n"] = 12  # an octave below the new base (32)
        board.read(0.0)
        await asyncio.sleep(0.25)
        assert polled.reads == 3 and board.refreshes == 2
    finally:
        await board.stop()
