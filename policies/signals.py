"""Signal sources behind one interface, chosen by name in YAML, and the board that polls them.

Contract: a source has `name`, `interval_s` (None: read on demand) and `stale_after_s` (None:
never stale) and `async read() -> float` (raises on failure). `policies.sources.SOURCES` maps YAML `source:`
names to builders. `SignalBoard` polls every polled source on its interval in asyncio tasks,
keeps the last good value with its time, and answers `read(now)` with values and the set of
stale names. Sources: `prometheus` (PromQL instant query; the vector's values are summed; an
empty vector is 0), `scrape` (Prometheus text from metrics endpoints: filter by name and
labels, sum per `per` label, then mean/sum/max across, or count the groups, e.g. replicas),
`local` (a gateway counter), `goodput` (the replicas' measured cost models, `policies.goodput`;
its value is their step count). The scrape sources of one policy fetch pages through one
`PageFetcher`: sources that poll the same URL at the same moment share one GET. `refresh_after`
polls every source once more, off its interval (the policy's re-poll while its running mode is
unmeasured at the load; a local counter with `repoll_after_s` asks for one when it falls an octave). Non-goals:
deciding modes (see `adaptive`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import httpx

from .reports import REPORTS_URL, ReplicaReports
from .schema import LocalSignal, PrometheusSignal, ScrapeSignal

log = logging.getLogger("policies.signals")


class SignalSource(Protocol):
    name: str
    interval_s: float | None
    stale_after_s: float | None

    async def read(self) -> float: ...


class PrometheusSource:
    def __init__(self, spec: PrometheusSignal, http: httpx.AsyncClient) -> None:
        self.spec, self.http = spec, http
        self.name, self.interval_s, self.stale_after_s = spec.name, spec.interval_s, spec.stale_after_s

    async def read(self) -> float:
        last: Exception | None = None
        for _ in range(self.spec.retries + 1):
            try:
                r = await self.http.get(self.spec.url.rstrip("/") + "/api/v1/query",
                                        params={"query": self.spec.query}, timeout=self.spec.timeout_s)
                r.raise_for_status()
                body = r.json()
                if body.get("status") != "success":
                    raise ValueError(f"prometheus: {body.get('error', 'query failed')}")
                data = body["data"]
                if data["resultType"] == "scalar":
                    return float(data["result"][1])
                return sum(float(s["value"][1]) for s in data["result"])
            except (httpx.HTTPError, ValueError, KeyError) as e:
                last = e
        raise RuntimeError(f"{self.name}: {type(last).__name__}: {last}")


class PageFetcher:
    """GETs of metrics pages, shared: a GET of a URL that is already in flight waits for that one
    instead of sending another. Ray's metrics page is about 470 KiB and costs about 0.1 s of CPU
    to produce, so two signals read from it (e.g. running requests and the replica count) cost
    one fetch per poll: their sources poll on the same interval, and a shared fetch ends for both
    at once, which keeps them in step."""

    def __init__(self, http: httpx.AsyncClient, reports: "ReplicaReports | None" = None) -> None:
        self.http = http
        self.reports = reports
        self._inflight: dict[str, asyncio.Future] = {}
        self.fetches = 0  # GETs actually sent

    async def text(self, url: str, timeout_s: float) -> str:
        if url == REPORTS_URL:  # the replicas' reports on their answers: no fetch
            if self.reports is None:
                raise RuntimeError(f"{REPORTS_URL} names the replicas' reports, and this policy was built without them")
            return self.reports.page()
        fut = self._inflight.get(url)
        if fut is None:
            fut = asyncio.ensure_future(self._get(url, timeout_s))
            self._inflight[url] = fut
            fut.add_done_callback(lambda f, u=url: self._done(u, f))
        return await asyncio.shield(fut)  # one waiter cancelled (a reload) leaves the others theirs

    def _done(self, url: str, fut: asyncio.Future) -> None:
        self._inflight.pop(url, None)
        if not fut.cancelled():
            fut.exception()  # retrieved: a failed GET whose waiters were all cancelled is not logged as lost

    async def _get(self, url: str, timeout_s: float) -> str:
        self.fetches += 1
        r = await self.http.get(url, timeout=timeout_s)
        r.raise_for_status()
        return r.text


class ScrapeSource:
    def __init__(self, spec: ScrapeSignal, pages: PageFetcher | httpx.AsyncClient) -> None:
        self.spec = spec
        self.pages = pages if isinstance(pages, PageFetcher) else PageFetcher(pages)
        self.name, self.interval_s, self.stale_after_s = spec.name, spec.interval_s, spec.stale_after_s

    async def read(self) -> float:
        groups: dict[tuple, float] = {}
        for url in self.spec.urls:
            text = await self.pages.text(url, self.spec.timeout_s)
            for labels, value in samples(text, self.spec.metric):
                if any(labels.get(k) != v for k, v in self.spec.labels.items()):
                    continue
                key = (url, labels.get(self.spec.per, "")) if self.spec.per else (url,)
                groups[key] = groups.get(key, 0.0) + value
        if self.spec.aggregate == "count":
            return float(len(groups))
        if not groups:
            return 0.0
        values = list(groups.values())
        if self.spec.aggregate == "sum":
            return sum(values)
        if self.spec.aggregate == "max":
            return max(values)
        return sum(values) / len(values)


_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def samples(text: str, metric: str):
    """(labels, value) of every sample named `metric` in Prometheus text. Only the lines of that
    metric are looked at: Ray's metrics page is about 470 KiB, and splitting all of it into lines
    on every poll costs the gateway's event loop milliseconds."""
    plain, braced = metric + " ", metric + "{"
    at = 0
    while (at := text.find(metric, at)) >= 0:
        line_start = text.rfind("\n", 0, at) + 1
        end_of_line = text.find("\n", at)
        if end_of_line < 0:
            end_of_line = len(text)
        line, at = text[line_start:end_of_line], end_of_line
        if line.startswith(braced):
            end = line.rfind("}")
            labels = dict(_LABEL.findall(line[len(braced):end]))
            rest = line[end + 1:].split()
        elif line.startswith(plain):
            labels, rest = {}, line[len(plain):].split()
        else:
            continue  # a comment (# HELP / # TYPE), another metric with this prefix, or a label value
        if rest:
            yield labels, float(rest[0])


class LocalSource:
    def __init__(self, spec: LocalSignal, counter: Callable[[], float]) -> None:
        self.name, self.counter = spec.name, counter
        self.interval_s = self.stale_after_s = None
        self.repoll_after_s = spec.repoll_after_s

    async def read(self) -> float:
        return self.read_now()

    def read_now(self) -> float:
        return float(self.counter())


@dataclass
class SignalState:
    value: float | None = None
    updated_at: float | None = None
    error: str | None = None


class SignalBoard:
    def __init__(self, sources: list[SignalSource], clock: Callable[[], float] = time.monotonic) -> None:
        self.sources = {s.name: s for s in sources}
        self.states = {s.name: SignalState() for s in sources}
        self.clock = clock
        self._tasks: list[asyncio.Task] = []
        self._refreshes: set[asyncio.Task] = set()
        self.refreshes = 0  # extra polls run by `refresh_after`
        self._local_base: dict[str, float] = {}  # a local counter's value at its last octave move

    async def poll_once(self, name: str) -> None:
        source, state = self.sources[name], self.states[name]
        try:
            value = await source.read()
        except Exception as e:  # a failing source goes stale; the gateway keeps serving
            if state.error != str(e):
                log.warning("signal %s: %s", name, e)
            state.error = str(e)
            return
        state.value, state.updated_at, state.error = value, self.clock(), None

    async def _loop(self, name: str) -> None:
        interval = self.sources[name].interval_s
        while True:
            await self.poll_once(name)
            await asyncio.sleep(interval)

    def refresh_after(self, delay_s: float) -> bool:
        """Poll every polled source once, `delay_s` from now, besides their intervals (e.g. the
        cost model while the running mode has no measurement at a new load). Sources that read one
        page share its fetch. False (nothing scheduled) before `start` or outside the event loop."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        if not self._tasks:
            return False
        task = loop.create_task(self._refresh_later(delay_s), name="signal-refresh")
        self._refreshes.add(task)
        task.add_done_callback(self._refreshes.discard)
        return True

    async def _refresh_later(self, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        self.refreshes += 1
        await asyncio.gather(*(self.poll_once(n) for n, s in self.sources.items() if s.interval_s is not None))

    def start(self) -> None:
        if not self._tasks:
            self._tasks = [asyncio.create_task(self._loop(n), name=f"signal-{n}")
                           for n, s in self.sources.items() if s.interval_s is not None]

    def cancel(self) -> list[asyncio.Task]:
        tasks, self._tasks = self._tasks + list(self._refreshes), []
        self._refreshes.clear()
        for t in tasks:
            t.cancel()
        return tasks

    async def stop(self) -> None:
        await asyncio.gather(*self.cancel(), return_exceptions=True)

    def _follow(self, source: LocalSource, value: float) -> None:
        """A local counter an octave below its base (its value at its last octave move; counts
        below 1 count as 1): re-poll the polled signals `repoll_after_s` later, so a polled view
        of the same load follows the fall. A rise only moves the base: a `max()` of the local and
        the polled view already follows a rise, and a poll costs the metrics agent CPU."""
        if source.repoll_after_s is None:
            return
        base = self._local_base.setdefault(source.name, value)
        octaves = math.log2(max(value, 1.0) / max(base, 1.0))
        if octaves >= 1.0 or (octaves <= -1.0 and self.refresh_after(source.repoll_after_s)):
            self._local_base[source.name] = value

    def read(self, now: float) -> tuple[dict[str, float], set[str]]:
        """(values by name, names that are stale or never read)."""
        values: dict[str, float] = {}
        stale: set[str] = set()
        for name, source in self.sources.items():
            if isinstance(source, LocalSource):
                values[name] = source.read_now()
                self.states[name].value, self.states[name].updated_at = values[name], now
                self._follow(source, values[name])
                continue
            st = self.states[name]
            if st.value is None or now - st.updated_at > source.stale_after_s:
                stale.add(name)
            if st.value is not None:
                values[name] = st.value
        return values, stale
