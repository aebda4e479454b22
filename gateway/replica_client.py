"""How the gateway talks to the replicas: the `ReplicaClient` protocol and its HTTP implementation.

Contract of `ReplicaClient.generate(GenerateRequest) -> ReplicaStream`: it returns once the
replica accepted the request AND its first chunk arrived (the stream yields that chunk first);
every failure before that raises `ReplicaError(status, ErrorInfo, retry_after)` with the
status the client should see (400, 413, 429, 503 no replica, 504 timeout). Iterating the
stream never raises: a failure after the first chunk is yielded as one last chunk with `error`
set and `finish_reason="error"`. `ReplicaStream.aclose()` (idempotent) closes the upstream
response, which makes the replica abort the request and free its KV slot; it must be called
when the consumer stops early (client disconnect, error in a sibling choice).

`HttpReplicaClient` speaks the wire protocol of `replicas.wire` through the Ray Serve HTTP
proxy with one pooled `httpx.AsyncClient`: a connection failure before the first byte is
retried `config.connect_retries` times (the proxy may route the retry to another replica),
then 503; an upstream status is mapped as above; `info()` is cached for `config.info_ttl_s`.
Non-goals: load balancing (Ray Serve does it), request validation (the app and the replica do).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Protocol

import httpx
from pydantic import ValidationError

from replicas.wire import ErrorBody, ErrorInfo, GenerateChunk, GenerateRequest, ReplicaInfo

from .config import GatewayConfig

RETRYABLE = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError,
             httpx.WriteError)


class ReplicaError(Exception):
    def __init__(self, status: int, info: ErrorInfo, retry_after: float | None = None) -> None:
        super().__init__(info.message)
        self.status = status
        self.info = info
        self.retry_after = retry_after


class ReplicaStream(Protocol):
    def __aiter__(self) -> AsyncIterator[GenerateChunk]: ...

    async def aclose(self) -> None: ...


class ReplicaClient(Protocol):
    async def generate(self, request: GenerateRequest) -> ReplicaStream: ...

    async def info(self) -> ReplicaInfo: ...

    async def health(self) -> bool: ...

    async def stats(self) -> dict: ...

    async def aclose(self) -> None: ...


def error_chunk(request_id: str, mode: str, message: str, type: str, code: str) -> GenerateChunk:
    return GenerateChunk(request_id=request_id, mode=mode, finish_reason="error",
                         error=ErrorInfo(message=message, type=type, code=code))


def upstream_status(status: int) -> int:
    """The status the client sees for an upstream (proxy or replica) error status."""
    if status in (400, 413, 429, 503):
        return status
    if status in (408, 504):
        return 504
    if status == 404 or status >= 500 or status in (401, 403):
        return 503  # no route (app not deployed), proxy or replica failure
    return 400


class _HttpStream:
    """NDJSON lines of one upstream response as `GenerateChunk`s; see the module contract."""

    def __init__(self, response: httpx.Response, request: GenerateRequest) -> None:
        self._response = response
        self._lines = response.aiter_lines()
        self._request_id = request.request_id or ""
        self._mode = request.mode
        self._first: GenerateChunk | None = None
        self._done = False

    async def read_first(self) -> None:
        """Read the first chunk; transport errors propagate (the caller may retry)."""
        self._first = await self._read()

    def __aiter__(self) -> "_HttpStream":
        return self

    async def __anext__(self) -> GenerateChunk:
        if self._first is not None:
            chunk, self._first = self._first, None
        elif self._done:
            raise StopAsyncIteration
        else:
            try:
                chunk = await self._read()
            except httpx.TimeoutException:
                chunk = error_chunk(self._request_id, self._mode, "replica stopped sending (read timeout)",
                                    "timeout_error", "upstream_timeout")
            except httpx.HTTPError as e:
                chunk = error_chunk(self._request_id, self._mode, f"connection to the replica lost ({type(e).__name__})",
                                    "service_unavailable_error", "replica_lost")
        if chunk.finish_reason is not None:
            self._done = True
            await self._finish()
        return chunk

    async def _read(self) -> GenerateChunk:
        async for line in self._lines:
            if not line.strip():
                continue
            try:
                return GenerateChunk.model_validate_json(line)
            except ValidationError:
                return error_chunk(self._request_id, self._mode, "replica sent a malformed chunk",
                                   "server_error", "bad_upstream_chunk")
        return error_chunk(self._request_id, self._mode, "replica closed the stream before the last chunk",
                           "service_unavailable_error", "replica_lost")

    async def _finish(self) -> None:
        """After the last chunk: drain to EOF so the connection goes back to the pool."""
        try:
            async for _ in self._lines:
                pass
        except httpx.HTTPError:
            pass
        await self._response.aclose()

    async def aclose(self) -> None:
        self._done = True
        await self._response.aclose()


class HttpReplicaClient:
    def __init__(self, config: GatewayConfig, http: httpx.AsyncClient | None = None,
                 clock: Callable[[], float] = time.monotonic, on_retry: Callable[[], None] | None = None) -> None:
        self._config = config
        self._base = config.replica_url
        self._owns_http = http is None
        self._http = http or httpx.AsyncClient(
            timeout=httpx.Timeout(config.request_timeout_s, connect=config.connect_timeout_s),
            limits=httpx.Limits(max_connections=config.max_connections,
                                max_keepalive_connections=config.max_connections),
            trust_env=False,
        )
        self._clock = clock
        self._on_retry = on_retry
        self._info: ReplicaInfo | None = None
        self._info_at = float("-inf")
        self._info_lock = asyncio.Lock()

    def set_retry_hook(self, on_retry: Callable[[], None]) -> None:
        self._on_retry = on_retry

    async def generate(self, request: GenerateRequest) -> _HttpStream:
        body = request.model_dump_json(exclude_none=True).encode()
        headers = {"content-type": "application/json", "accept": "application/x-ndjson"}
        attempts = 1 + self._config.connect_retries
        for attempt in range(attempts):
            response: httpx.Response | None = None
            try:
                req = self._http.build_request("POST", f"{self._base}/generate", content=body, headers=headers)
                response = await self._http.send(req, stream=True)
                if response.status_code != 200:
                    raise await self._error_from(response)
                stream = _HttpStream(response, request)
                await stream.read_first()
                return stream
            except RETRYABLE as e:
                if response is not None:
                    await response.aclose()
                if attempt + 1 < attempts:
                    if self._on_retry is not None:
                        self._on_retry()
                    continue
                raise ReplicaError(503, ErrorInfo(
                    message=f"no replica reachable through the Ray Serve proxy ({type(e).__name__})",
                    type="service_unavailable_error", code="no_replica"), retry_after=None) from e
            except httpx.TimeoutException as e:
                if response is not None:
                    await response.aclose()
                raise ReplicaError(504, ErrorInfo(message="the replica did not answer in time",
                                                  type="timeout_error", code="upstream_timeout")) from e
            except BaseException:
                if response is not None:
                    await response.aclose()
                raise
        raise AssertionError("unreachable")

    async def _error_from(self, response: httpx.Response) -> ReplicaError:
        try:
            raw = await response.aread()
        finally:
            await response.aclose()
        status = upstream_status(response.status_code)
        try:
            info = ErrorBody.model_validate_json(raw).error
        except ValidationError:
            info = ErrorInfo(message=f"replica returned HTTP {response.status_code}",
                             type="service_unavailable_error" if status == 503 else "upstream_error",
                             code="no_replica" if status == 503 else None)
        retry_after = None
        if "retry-after" in response.headers:
            try:
                retry_after = float(response.headers["retry-after"])
            except ValueError:
                pass
        return ReplicaError(status, info, retry_after)

    async def info(self) -> ReplicaInfo:
        if self._info is not None and self._clock() - self._info_at < self._config.info_ttl_s:
            return self._info
        async with self._info_lock:  # one fetch for concurrent callers
            if self._info is not None and self._clock() - self._info_at < self._config.info_ttl_s:
                return self._info
            try:
                r = await self._http.get(f"{self._base}/info")
            except httpx.HTTPError as e:
                raise ReplicaError(503, ErrorInfo(message=f"replica info unavailable ({type(e).__name__})",
                                                  type="service_unavailable_error", code="no_replica")) from e
            if r.status_code != 200:
                raise ReplicaError(upstream_status(r.status_code), ErrorInfo(
                    message=f"replica info: HTTP {r.status_code}", type="service_unavailable_error", code="no_replica"))
            self._info, self._info_at = ReplicaInfo.model_validate_json(r.content), self._clock()
            return self._info

    async def health(self) -> bool:
        try:
            r = await self._http.get(f"{self._base}/health")
        except httpx.HTTPError:
            return False
        return r.status_code == 200

    async def stats(self) -> dict:
        r = await self._http.get(f"{self._base}/stats")
        r.raise_for_status()
        return r.json()

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()
