"""Server-sent events and client-disconnect detection for the gateway's ASGI responses.

Contract: `SSEResponse(events, on_close)` sends `events` (already-encoded `data: ...\\n\\n`
bytes) as `text/event-stream` while a watcher listens for `http.disconnect`; when the client
goes away the event producer is cancelled at once (even while it waits for the replica), and
`on_close(disconnected: bool)` is awaited exactly once in every case (normal end, error,
disconnect, cancellation), so the caller can close upstream streams and record metrics there.
`run_until_disconnect(coro, receive)` does the same for non-streaming handlers: it returns the
coroutine's result, or raises `ClientGone` (after cancelling the coroutine) if the client
disconnected first. Non-goals: SSE `event:`/`id:` fields (OpenAI uses bare `data:` lines).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

T = TypeVar("T")
DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


class ClientGone(Exception):
    """The client disconnected before the response was complete."""


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def run_until_disconnect(coro: Awaitable[T], receive: Receive) -> T:
    work = asyncio.ensure_future(coro)
    watch = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        await asyncio.wait((work, watch), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        work.cancel()
        raise
    finally:
        watch.cancel()
    if work.done():
        return work.result()
    work.cancel()
    try:
        await work
    except BaseException:
        pass
    raise ClientGone()


class SSEResponse(Response):
    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[bool], Awaitable[None]],
                 headers: dict[str, str] | None = None) -> None:
        self.events = events
        self.on_close = on_close
        self.status_code = 200
        self.background = None
        self.init_headers({**SSE_HEADERS, **(headers or {})})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        disconnected = False
        pump = asyncio.ensure_future(self._pump(send))
        watch = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait((pump, watch), return_when=asyncio.FIRST_COMPLETED)
            if not pump.done():
                disconnected = True
                pump.cancel()
            try:
                await pump
            except (asyncio.CancelledError, OSError):
                disconnected = True
        finally:
            watch.cancel()
            if not pump.done():
                pump.cancel()
            closer = getattr(self.events, "aclose", None)
            try:
                if closer is not None:
                    await asyncio.shield(closer())
            except Exception:
                pass
            await asyncio.shield(self.on_close(disconnected))

    async def _pump(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        async for chunk in self.events:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
