"""The streams `HttpReplicaClient.generate` returns: one upstream `/generate` response, read.

Contract: `HttpStream(response, request, read_timeout_s)` yields the NDJSON `GenerateChunk`s
of a streamed answer and, for a request with `sse`, the replica's ready SSE events as bytes
(`data: ...` and its blank line) between the first and the last chunk; it never raises while
iterating: a lost connection, a read timeout (no line for `read_timeout_s`), a malformed line
or a stream that ends early is yielded as one last chunk with `error` and
`finish_reason="error"` (`error_chunk`). After the last chunk it reads the body to its end so
the connection returns to the pool; `aclose()` resets it, so the replica aborts the request.
Given `bound`, a `gateway.channel.ChannelInbox`, and an answer that says it is
bound (`CHANNEL_HEADER`), the lines after the first come from the inbox instead: the same
bytes, the same rules; the rest of the request's own answer is read in the background, and
if it ends (or fails) before the last chunk came, the stream reports the replica lost (after
`CHANNEL_GRACE_S` for a normal end, whose last records may still be on their way).
`WholeAnswer(chunk)` is a non-streaming answer (ONE `GenerateChunk`) as a one-item stream.
Non-goals: connecting, retrying, status mapping (`gateway.replica_client`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from pydantic import ValidationError

from replicas.channel_wire import CHANNEL_HEADER
from replicas.wire import ErrorInfo, GenerateChunk, GenerateRequest

from .channel import ChannelInbox
from .upstream import UpstreamConnectionError, UpstreamResponse, UpstreamTimeout

CHANNEL_GRACE_S = 1.0  # a bound request's answer ended: how long its last records may still take


def error_chunk(request_id: str, mode: str, message: str, type: str, code: str) -> GenerateChunk:
    return GenerateChunk(request_id=request_id, mode=mode, finish_reason="error",
                         error=ErrorInfo(message=message, type=type, code=code))


class HttpStream:
    """NDJSON lines of one upstream response as `GenerateChunk`s, and ready SSE events as bytes
    (a request with `sse`: the replica renders its middle chunks); see the module contract.

    The read timeout is a watchdog, not a timer per line: each line stamps the time, and one
    timer per stream, re-armed only when it fires, aborts the connection once no line came for
    `read_timeout_s` (the pending read then fails and the stream reports a timeout)."""

    def __init__(self, response: UpstreamResponse, request: GenerateRequest, read_timeout_s: float,
                 on_done: Callable[[], None] | None = None,
                 bound: ChannelInbox | None = None) -> None:
        self._response = response
        self._bound = bound  # until the first chunk shows whether the replica bound the request
        self._inbox: ChannelInbox | None = None  # set once the lines after the first come from a channel
        self._tail: asyncio.Task | None = None  # reads the rest of a bound request's own answer
        self._on_done = on_done  # called once, when the stream stops (last chunk, failure or close)
        self._lines = response.lines()
        self._timeout = read_timeout_s
        self._request_id = request.request_id or ""
        self._mode = request.mode
        self._first: GenerateChunk | None = None
        self._done = False
        self._loop = asyncio.get_running_loop()
        self._last_line = self._loop.time()
        self._timed_out = False
        self._watchdog = self._loop.call_at(self._last_line + read_timeout_s, self._watch)

    def _watch(self) -> None:
        if self._done:
            return
        due = self._last_line + self._timeout
        if self._loop.time() < due:
            self._watchdog = self._loop.call_at(due, self._watch)
            return
        self._timed_out = True
        self._response.abort()
        if self._inbox is not None:
            self._inbox.lose("no chunk from the replica in time")

    async def read_first(self) -> None:
        """Read the first chunk (a `GenerateChunk`, never an event); transport errors propagate
        (the caller may retry)."""
        try:
            first = await self._read()
        except BaseException:
            self._stop()  # the caller drops this stream: no watchdog left behind
            raise
        if isinstance(first, bytes):
            first = error_chunk(self._request_id, self._mode, "replica sent an event before its first chunk",
                                "server_error", "bad_upstream_chunk")
        self._first = first
        if self._bound is not None and first.finish_reason is None and \
                self._response.headers.get(CHANNEL_HEADER) == "bound":
            self._inbox = self._bound
            self._tail = self._loop.create_task(self._read_tail())
        else:
            self._unbind()

    async def _read_tail(self) -> None:
        """A bound request's own answer after its first line: nothing, then its end."""
        inbox = self._inbox
        try:
            async for _ in self._lines:
                pass
        except UpstreamConnectionError:
            inbox.lose("connection to the replica lost")
            return
        if not self._done:
            self._loop.call_later(CHANNEL_GRACE_S, inbox.lose, "the replica ended the request before its last chunk")

    def _unbind(self) -> None:
        if self._bound is not None:
            bound, self._bound = self._bound, None
            bound.unbind()

    def __aiter__(self) -> "HttpStream":
        return self

    async def __anext__(self) -> GenerateChunk | bytes:
        if self._first is not None:
            chunk, self._first = self._first, None
        elif self._done:
            raise StopAsyncIteration
        else:
            try:
                chunk = await self._read()
            except UpstreamTimeout:
                chunk = error_chunk(self._request_id, self._mode, "replica stopped sending (read timeout)",
                                    "timeout_error", "upstream_timeout")
            except UpstreamConnectionError as e:
                chunk = error_chunk(self._request_id, self._mode, f"connection to the replica lost: {e}",
                                    "service_unavailable_error", "replica_lost")
            if type(chunk) is bytes:
                return chunk
        if chunk.finish_reason is not None:
            if chunk.finish_reason == "error" and self._inbox is not None:
                await self.aclose()  # a bound request's answer may never end (a lost channel): reset it
            else:
                await self._finish()
        return chunk

    async def _read(self) -> GenerateChunk | bytes:
        if self._inbox is not None:
            return await self._read_record()
        while True:
            try:
                line = await anext(self._lines, None)
            except UpstreamConnectionError:
                if self._timed_out:
                    raise UpstreamTimeout("no chunk from the replica in time") from None
                raise
            if self._timed_out:
                raise UpstreamTimeout("no chunk from the replica in time")
            self._last_line = self._loop.time()
            if line is None:
                return error_chunk(self._request_id, self._mode, "replica closed the stream before the last chunk",
                                   "service_unavailable_error", "replica_lost")
            if line.startswith(b"data: "):
                return line + b"\n\n"  # a ready SSE event (its empty line follows: skipped below)
            if not line.strip():
                continue
            return self._parse(line)

    async def _read_record(self) -> GenerateChunk | bytes:
        """The next line of a bound request, from its channel inbox."""
        try:
            payload = await self._inbox.get()
        except UpstreamConnectionError:
            if self._timed_out:
                raise UpstreamTimeout("no chunk from the replica in time") from None
            raise
        self._last_line = self._loop.time()
        if payload.startswith(b"data: "):
            return payload  # a ready SSE event, its blank line included
        return self._parse(payload)

    def _parse(self, line: bytes) -> GenerateChunk:
        try:
            return GenerateChunk.model_validate_json(line)
        except ValidationError:
            return error_chunk(self._request_id, self._mode, "replica sent a malformed chunk",
                               "server_error", "bad_upstream_chunk")

    async def _finish(self) -> None:
        """After the last chunk: read to the end so the connection goes back to the pool."""
        self._stop()
        try:
            async with asyncio.timeout(self._timeout):
                if self._tail is not None:
                    await asyncio.shield(self._tail)
                else:
                    async for _ in self._lines:
                        pass
        except (TimeoutError, UpstreamConnectionError):
            pass
        await self._response.aclose()

    def _stop(self) -> None:
        self._done = True
        self._watchdog.cancel()
        self._unbind()
        if self._on_done is not None:
            done, self._on_done = self._on_done, None
            done()

    async def aclose(self) -> None:
        self._stop()
        if self._tail is not None:
            self._tail.cancel()
        await self._response.aclose()


class WholeAnswer:
    """A non-streaming answer: ONE `GenerateChunk` (every token, the text, usage) as a stream."""

    def __init__(self, chunk: GenerateChunk) -> None:
        self._chunk: GenerateChunk | None = chunk

    def __aiter__(self) -> "WholeAnswer":
        return self

    async def __anext__(self) -> GenerateChunk:
        if self._chunk is None:
            raise StopAsyncIteration
        chunk, self._chunk = self._chunk, None
        return chunk

    async def aclose(self) -> None:
        self._chunk = None
