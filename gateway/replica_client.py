"""How the gateway talks to the replicas: the `ReplicaClient` protocol and its HTTP implementation.

Contract of `ReplicaClient.generate(GenerateRequest) -> ReplicaStream`: it returns once the
replica accepted the request AND its first chunk arrived (the stream yields that chunk first);
a non-streaming request (`stream: false`) is answered by the replica in ONE message, so its
stream holds exactly one chunk: the last, with every token, the whole text and usage;
every failure before that raises `ReplicaError(status, ErrorInfo, retry_after)` with the
status the client should see (400, 413, 429, 503 no replica, 504 timeout). Iterating the
stream never raises: a failure after the first chunk is yielded as one last chunk with `error`
set and `finish_reason="error"`. A streamed request with `sse` set also yields ready SSE events
(bytes: `data: ...` and its blank line) for the chunks between its first and its last, which
are always `GenerateChunk`s. `ReplicaStream.aclose()` (idempotent) closes the upstream
response, which makes the replica abort the request and free its KV slot; it must be called
when the consumer stops early (client disconnect, error in a sibling choice).

`HttpReplicaClient` speaks the wire protocol of `replicas.wire` through the Ray Serve ingress
(HAProxy, or Serve's Python proxy) over `gateway.upstream.UpstreamPool` (kept-alive HTTP/1.1
connections), or, given `direct` (`gateway.direct.DirectRoutes`), straight to a healthy replica's
own port learned from the answers' `REPLICA_HEADER` (a direct attempt that fails before the
answer marks that replica failed and goes through the ingress). A streamed request sent
directly rides the replica's stream channel when `direct` has one open (`gateway.channel`:
the events of all its streams come in one read per engine step). Through the ingress a
connection failure before the first byte is retried `config.connect_retries` times (the proxy
may route the retry to another replica), then 503; an upstream status is mapped as above;
`info()` is cached for `config.info_ttl_s`; `update_engine(EngineSettings)` POSTs /engine (the replica the
proxy picks applies them; see `gateway.engine_push`). Each /generate answer's report header
(`replicas.wire.REPORT_HEADER`) goes to `on_report` (the policy's
`policies.reports.ReplicaReports.offer`). The streams it returns are
`gateway.replica_stream`'s. `on_route("direct" | "channel" | "ingress")` counts each /generate
attempt (`channel`: direct, its events on the replica's stream channel).
Non-goals: replica membership and health (Ray Serve's; `DirectRoutes` follows it), request
validation (the app and the replica do).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from pydantic import ValidationError

from replicas.wire import (REPLICA_HEADER, REPORT_HEADER, ChannelRoute, EngineSettings, ErrorBody, ErrorInfo,
                           GenerateChunk, GenerateRequest, ReplicaInfo)

from .channel import ChannelInbox
from .config import GatewayConfig
from .direct import DirectRoutes
from .replica_stream import HttpStream, WholeAnswer, error_chunk
from .upstream import UpstreamConnectionError, UpstreamPool, UpstreamResponse, UpstreamTimeout

GENERATE_HEADERS = {"Content-Type": "application/json", "Accept": "application/x-ndjson"}
JSON_HEADERS = {"Content-Type": "application/json"}


class ReplicaError(Exception):
    def __init__(self, status: int, info: ErrorInfo, retry_after: float | None = None) -> None:
        super().__init__(info.message)
        self.status = status
        self.info = info
        self.retry_after = retry_after


class ReplicaStream(Protocol):
    def __aiter__(self) -> AsyncIterator[GenerateChunk | bytes]: ...

    async def aclose(self) -> None: ...


class ReplicaClient(Protocol):
    async def generate(self, request: GenerateRequest) -> ReplicaStream: ...

    async def info(self) -> ReplicaInfo: ...

    async def health(self) -> bool: ...

    async def stats(self) -> dict: ...

    async def update_engine(self, settings: EngineSettings) -> dict: ...

    async def aclose(self) -> None: ...


def upstream_status(status: int) -> int:
    """The status the client sees for an upstream (proxy or replica) error status."""
    if status in (400, 413, 429, 503):
        return status
    if status in (408, 504):
        return 504
    if status == 404 or status >= 500 or status in (401, 403):
        return 503  # no route (app not deployed), proxy or replica failure
    return 400


def error_of(upstream: int, raw: bytes, retry_after: float | None = None) -> ReplicaError:
    """The `ReplicaError` for an upstream error status and its body (an `ErrorBody`, or anything)."""
    status = upstream_status(upstream)
    try:
        info = ErrorBody.model_validate_json(raw).error
    except ValidationError:
        info = ErrorInfo(message=f"replica returned HTTP {upstream}",
                         type="service_unavailable_error" if status == 503 else "upstream_error",
                         code="no_replica" if status == 503 else None)
    return ReplicaError(status, info, retry_after)


class HttpReplicaClient:
    def __init__(self, config: GatewayConfig, pool: UpstreamPool | None = None,
                 clock: Callable[[], float] = time.monotonic, on_retry: Callable[[], None] | None = None,
                 on_report: Callable[[str | None], None] | None = None, direct: DirectRoutes | None = None,
                 on_route: Callable[[str], None] | None = None) -> None:
        self._config = config
        self._on_report = on_report
        self._pool = pool or UpstreamPool(config.replica_url, connect_timeout_s=config.connect_timeout_s,
                                          max_idle=config.max_idle_connections)
        self._direct = direct  # the replicas' own ports (`gateway.direct`); None: always the ingress
        self._on_route = on_route  # "direct" or "ingress", once per /generate attempt
        self._clock = clock
        self._on_retry = on_retry
        self._info: ReplicaInfo | None = None
        self._info_at = float("-inf")
        self._info_lock = asyncio.Lock()

    async def generate(self, request: GenerateRequest) -> HttpStream | WholeAnswer:
        """Send to a replica directly when `direct` knows a healthy one, else through the ingress.
        A direct attempt that fails before the answer (connection, or 503 from a dead engine) marks
        that replica failed and goes through the ingress, outside `connect_retries`."""
        body: bytes | None = None  # the request as sent unbound (through the ingress, or no channel)
        timeout = self._config.request_timeout_s
        attempts = 1 + self._config.connect_retries
        direct = self._direct
        if direct is not None:
            direct.start()
        attempt = 0
        while True:
            replica = direct.pick(request.mode) if direct is not None else None
            pool = self._pool if replica is None else replica.pool
            if replica is not None:
                direct.begin(replica)
            bound = self._bind(replica, request)
            if self._on_route is not None:
                self._on_route("ingress" if replica is None else "direct" if bound is None else "channel")
            response: UpstreamResponse | None = None
            handed_over = False  # the stream ends the replica's in-flight count itself
            try:
                if bound is not None:
                    route = ChannelRoute(id=bound.channel.channel_id, stream=bound.stream)
                    sent = request.model_copy(update={"channel": route}).model_dump_json(exclude_none=True).encode()
                else:
                    sent = body = body or request.model_dump_json(exclude_none=True).encode()
                response = await pool.request("POST", "/generate", sent, GENERATE_HEADERS, timeout)
                self._heard(response, report=True, via_ingress=replica is None)
                if response.status != 200:
                    err = await self._error_from(response)
                    if replica is not None and err.status == 503:  # its engine died: another replica
                        direct.failed(replica)
                        self._retried()
                        continue
                    raise err
                if not request.stream:
                    return await self._whole(response, request)
                done = None if replica is None else (lambda r=replica: direct.end(r))
                stream = HttpStream(response, request, timeout, on_done=done, bound=bound)
                handed_over, bound = True, None
                await stream.read_first()
                return stream
            except UpstreamConnectionError as e:
                if response is not None:
                    await response.aclose()
                if replica is not None:  # not counted against connect_retries: the ingress next
                    direct.failed(replica)
                    self._retried()
                    continue
                attempt += 1
                if attempt < attempts:
                    self._retried()
                    continue
                raise ReplicaError(503, ErrorInfo(message=f"no replica reachable through the Ray Serve proxy: {e}",
                                                  type="service_unavailable_error", code="no_replica")) from e
            except UpstreamTimeout as e:
                if response is not None:
                    await response.aclose()
                raise ReplicaError(504, ErrorInfo(message="the replica did not answer in time",
                                                  type="timeout_error", code="upstream_timeout")) from e
            except BaseException:
                if response is not None:
                    await response.aclose()
                raise
            finally:
                if replica is not None and not handed_over:
                    direct.end(replica)
                if bound is not None:
                    bound.unbind()

    def _bind(self, replica, request: GenerateRequest) -> ChannelInbox | None:
        """A stream on the direct replica's channel for a streamed request, when one is ready."""
        if replica is None or not request.stream:
            return None
        channel = self._direct.channel(replica)
        return None if channel is None else channel.bind()

    def _retried(self) -> None:
        if self._on_retry is not None:
            self._on_retry()

    def _heard(self, response: UpstreamResponse, report: bool = False, via_ingress: bool = True) -> None:
        """What an answer says about its replica: its address (direct routes) and its report."""
        if self._direct is not None:
            self._direct.learn(response.headers.get(REPLICA_HEADER), via_ingress)
        if report and self._on_report is not None:
            self._on_report(response.headers.get(REPORT_HEADER))

    async def _whole(self, response: UpstreamResponse, request: GenerateRequest) -> WholeAnswer:
        """Read a non-streaming answer (transport errors propagate: the caller may retry)."""
        try:
            async with asyncio.timeout(self._config.request_timeout_s):
                raw = await response.read()
        except TimeoutError as e:
            raise UpstreamTimeout("the replica's answer did not arrive in time") from e
        finally:
            await response.aclose()
        try:
            return WholeAnswer(GenerateChunk.model_validate_json(raw))
        except ValidationError:
            return WholeAnswer(error_chunk(request.request_id or "", request.mode, "replica sent a malformed answer",
                                            "server_error", "bad_upstream_chunk"))

    async def _error_from(self, response: UpstreamResponse) -> ReplicaError:
        try:
            async with asyncio.timeout(self._config.request_timeout_s):
                raw = await response.read()
        except (TimeoutError, UpstreamConnectionError):
            raw = b""
        finally:
            await response.aclose()
        retry_after = None
        try:
            retry_after = float(response.headers["retry-after"])
        except (KeyError, ValueError):
            pass
        return error_of(response.status, raw, retry_after)

    async def _call(self, method: str, path: str, timeout: float, body: bytes = b"",
                    headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        """A short request (not /generate): (upstream status, body); unreachable or slow: 503."""
        try:
            async with asyncio.timeout(timeout):
                response = await self._pool.request(method, path, body, headers, timeout)
                self._heard(response)
                try:
                    return response.status, await response.read()
                finally:
                    await response.aclose()
        except (TimeoutError, UpstreamTimeout, UpstreamConnectionError) as e:
            raise ReplicaError(503, ErrorInfo(message=f"replica {path} unavailable ({type(e).__name__})",
                                              type="service_unavailable_error", code="no_replica")) from e

    async def info(self) -> ReplicaInfo:
        if self._info is not None and self._clock() - self._info_at < self._config.info_ttl_s:
            return self._info
        async with self._info_lock:  # one fetch for concurrent callers
            if self._info is not None and self._clock() - self._info_at < self._config.info_ttl_s:
                return self._info
            status, raw = await self._call("GET", "/info", self._config.ready_timeout_s)
            if status != 200:
                raise ReplicaError(upstream_status(status), ErrorInfo(
                    message=f"replica info: HTTP {status}", type="service_unavailable_error", code="no_replica"))
            try:
                self._info = ReplicaInfo.model_validate_json(raw)
            except ValidationError as e:
                raise ReplicaError(503, ErrorInfo(message="replica info: malformed", type="service_unavailable_error",
                                                  code="no_replica")) from e
            self._info_at = self._clock()
            return self._info

    async def health(self) -> bool:
        try:
            status, _ = await self._call("GET", "/health", self._config.ready_timeout_s)
        except ReplicaError:
            return False
        return status == 200

    async def stats(self) -> dict:
        status, raw = await self._call("GET", "/stats", self._config.ready_timeout_s)
        if status != 200:
            raise ReplicaError(upstream_status(status), ErrorInfo(message=f"replica stats: HTTP {status}",
                                                                  type="service_unavailable_error"))
        return json.loads(raw)

    async def update_engine(self, settings: EngineSettings) -> dict:
        """POST /engine: the replica that the proxy picks applies the settings at once."""
        body = settings.model_dump_json(exclude_none=True).encode()
        status, raw = await self._call("POST", "/engine", self._config.ready_timeout_s, body, JSON_HEADERS)
        if status != 200:
            raise error_of(status, raw)
        return json.loads(raw)

    async def aclose(self) -> None:
        if self._direct is not None:
            await self._direct.aclose()
        await self._pool.aclose()
