"""Routing engine output to asyncio consumers: one `Inbox` per request, one wake-up per need.

Contract: the engine (a thread or a process) produces, per step, a list of `StreamChunk`s.
`OutputRouter.deliver(chunks)` runs on the consumers' event loop, once per step (never once
per chunk), and appends each chunk to its request's `Inbox`. An inbox wakes its consumer:
- `wake="each"` (streaming, or stop strings to check): whenever it holds unread tokens;
- `wake="final"` (non-streaming without stop strings): only on the request's last chunk, so
  a 64-token request costs its consumer ONE wake-up, not 64.
`Inbox.take()` waits for a wake-up and returns everything unread as ONE merged chunk (tokens
in order, the newest end state). `fail(rid, exc)` / `fail_all(exc)` make the next `take` raise
`exc` at once: a rejected request or a dead engine never leaves a consumer waiting.
A tap (`StreamingFrontend.tap(rid, fn)`) takes a request's middle chunks in the delivery
callback itself, in place of a wake-up: while nothing is unread, each chunk without
`finish_reason` goes to `fn(chunk)` and its consumer sleeps on; the last chunk, failures and
anything that arrived while the consumer still had unread output wake it as before (so output
keeps its order). `fn` returning False, or raising, removes the tap and wakes the consumer
(with an empty chunk, or the exception at its next `take`).
Imports no torch: the serving process that consumes a separate engine process stays light.
Non-goals: transport (see `async_engine` and `process`), text, HTTP.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Callable, Literal

from .errors import EngineError, EngineOverloaded
from .params import DecodeParams, GenerationOutput

Wake = Literal["each", "final"]
Tap = Callable[["StreamChunk"], bool]  # a middle chunk, handled at delivery; False: stop, wake the consumer


@dataclass
class StreamChunk:
    request_id: str
    token_ids: list[int]  # tokens this step made final
    finish_reason: str | None = None  # a replicas.wire.FinishReason, on the last chunk
    stats: dict | None = field(default=None)  # on the last chunk: the request's own numbers
    error: str | None = None
    forward_passes: int = 0  # forward passes the request has taken part in so far
    mode: str = ""  # the mode the request is in after this step


def pack(chunk: StreamChunk) -> tuple:
    """A compact, picklable form of a chunk (a tuple pickles several times faster than a dataclass)."""
    return (chunk.request_id, chunk.token_ids, chunk.finish_reason, chunk.stats, chunk.error,
            chunk.forward_passes, chunk.mode)


def unpack(t: tuple) -> StreamChunk:
    return StreamChunk(*t)


def merge(a: StreamChunk, b: StreamChunk) -> StreamChunk:
    """`a` then `b` as one chunk: b's tokens appended, b's end state (finish, stats, mode)."""
    return StreamChunk(a.request_id, a.token_ids + b.token_ids, finish_reason=b.finish_reason, stats=b.stats,
                       error=b.error, forward_passes=b.forward_passes, mode=b.mode)


class Inbox:
    """Unread output of one request (event-loop side only; not thread-safe)."""

    __slots__ = ("request_id", "wake", "tap", "_tokens", "_last", "_error", "_event", "first_token_at")

    def __init__(self, request_id: str, wake: Wake) -> None:
        self.request_id = request_id
        self.wake = wake
        self.tap: Tap | None = None  # takes middle chunks at delivery while nothing is unread
        self._tokens: list[int] = []
        self._last: StreamChunk | None = None  # the newest chunk (its end state)
        self._error: BaseException | None = None  # raised by the next take
        self._event = asyncio.Event()
        self.first_token_at: float | None = None  # perf_counter() when the first token arrived

    def put(self, chunk: StreamChunk) -> None:
        # an engine process that held a quiet request's tokens says when they began (core_loop)
        held = chunk.stats.pop("first_token_at", None) if chunk.stats else None
        if chunk.token_ids and self.first_token_at is None:
            self.first_token_at = time.perf_counter() if held is None else held
        if self.tap is not None and chunk.finish_reason is None and self._last is None and self._error is None:
            try:
                if self.tap(chunk):
                    return  # handled here: the consumer sleeps on
            except Exception as e:  # the tap's failure is the request's, not the delivery's
                self.tap = None
                self.fail(e)
                return
            self.tap = None  # the tap took the chunk but stops: wake the consumer (nothing unread)
            chunk = StreamChunk(chunk.request_id, [], forward_passes=chunk.forward_passes, mode=chunk.mode)
        self._tokens.extend(chunk.token_ids)
        self._last = chunk
        if self.wake == "each" or chunk.finish_reason is not None:
            self._event.set()

    def fail(self, error: BaseException) -> None:
        """End the request with `error` (raised by the consumer's next `take`)."""
        if self._error is None:
            self._error = error
        self._event.set()

    async def take(self) -> StreamChunk:
        """Everything unread as one chunk, once the inbox wakes."""
        await self._event.wait()
        return self.take_now()

    async def take_within(self, timeout_s: float, tokens: int) -> StreamChunk:
        """What arrives within `timeout_s`, returned early once `tokens` unread tokens (or the
        last chunk, or a failure) are here."""
        deadline = time.monotonic() + timeout_s
        while len(self._tokens) < tokens and self._error is None and (
                self._last is None or self._last.finish_reason is None):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._event.clear()
            try:
                await asyncio.wait_for(self._event.wait(), left)
            except TimeoutError:
                break
        return self.take_now()

    def take_now(self) -> StreamChunk:
        """Everything unread as one chunk (an empty one if nothing arrived); raises the error
        set by `fail`."""
        if self._error is not None:
            raise self._error
        last, tokens = self._last, self._tokens
        self._tokens, self._last = [], None
        self._event.clear()
        if last is None:
            return StreamChunk(self.request_id, tokens)
        return StreamChunk(self.request_id, tokens, finish_reason=last.finish_reason, stats=last.stats,
                           error=last.error, forward_passes=last.forward_passes, mode=last.mode)


class OutputRouter:
    """Request id -> `Inbox`, fed one step at a time on the consumers' loop."""

    def __init__(self) -> None:
        self._inboxes: dict[str, Inbox] = {}

    def __len__(self) -> int:
        return len(self._inboxes)

    def request_ids(self) -> list[str]:
        return list(self._inboxes)

    def open(self, request_id: str, wake: Wake) -> Inbox:
        if request_id in self._inboxes:
            raise ValueError(f"request_id: {request_id!r} is already in flight")
        inbox = self._inboxes[request_id] = Inbox(request_id, wake)
        return inbox

    def close(self, request_id: str) -> None:
        self._inboxes.pop(request_id, None)

    def tap(self, request_id: str, fn: Tap | None) -> bool:
        """Set (or, with None, remove) a request's tap; False when it is not in flight."""
        inbox = self._inboxes.get(request_id)
        if inbox is None:
            return False
        inbox.tap = fn
        return True

    def wake_of(self, request_id: str) -> Wake | None:
        inbox = self._inboxes.get(request_id)
        return None if inbox is None else inbox.wake

    def deliver(self, chunks: list[StreamChunk]) -> list[str]:
        """Append each chunk to its inbox; returns the ids nobody listens to (to abort)."""
        orphans = []
        for chunk in chunks:
            inbox = self._inboxes.get(chunk.request_id)
            if inbox is None:
                if chunk.finish_reason is None:
                    orphans.append(chunk.request_id)
                continue
            inbox.put(chunk)
        return orphans

    def fail(self, request_id: str, error: BaseException) -> None:
        inbox = self._inboxes.get(request_id)
        if inbox is not None:
            inbox.fail(error)

    def fail_all(self, error: BaseException) -> None:
        for inbox in self._inboxes.values():
            inbox.fail(error)


class StreamingFrontend:
    """What `AsyncEngine` (a thread) and `EngineProcess` (a process) share: per-request inboxes
    on ONE event loop, and `stream` / `generate` over them. Subclasses submit and abort."""

    def __init__(self) -> None:
        self._router = OutputRouter()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._prefix = uuid.uuid4().hex[:8]
        self._ids = itertools.count()

    def _submit(self, request_id: str, prompt_ids: list[int], params: DecodeParams) -> None:
        raise NotImplementedError

    def abort(self, request_id: str) -> None:
        raise NotImplementedError

    def _check_alive(self) -> None:
        """Raise `EngineError` when no new request can be served."""

    def _bind_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is None or self._loop.is_closed():
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError(f"{type(self).__name__} serves one event loop")

    def tap(self, request_id: str, fn: Tap | None) -> bool:
        """Hand the request's middle chunks to `fn` as they are delivered, on this loop, instead
        of waking its consumer for each (see `Inbox`); False when the request is not in flight."""
        return self._router.tap(request_id, fn)

    def _deliver(self, chunks: list[StreamChunk]) -> None:
        """On the loop: one step's chunks to their inboxes; abort what nobody reads any more."""
        for rid in self._router.deliver(chunks):
            self.abort(rid)

    async def stream(self, prompt_ids, params: DecodeParams | None = None, request_id: str | None = None, *,
                     wake: Wake = "each", min_interval_s: float = 0.0,
                     flush_tokens: int = 0) -> AsyncIterator[StreamChunk]:
        """Chunks of final tokens, merged while the consumer was busy; the last one has
        `finish_reason` and the request's stats (with `seconds` and `first_token_seconds`
        since the call, as seen here). `wake="final"`: one wake-up for the whole
        request (nobody streams, no stop strings to check); `min_interval_s`: at most one chunk
        per interval (tokens that arrive meanwhile join it), unless `flush_tokens` (> 0) tokens
        are waiting, which go at once. Submission errors raise at the
        first `anext`; closing the iterator early aborts the request."""
        self._bind_loop()
        self._check_alive()
        rid = request_id or f"{self._prefix}-{next(self._ids)}"
        inbox = self._router.open(rid, wake)
        opened = time.perf_counter()
        finished = False
        try:
            self._submit(rid, list(prompt_ids), params or DecodeParams())
            last_yield = 0.0
            while True:
                chunk = await inbox.take()
                if min_interval_s and chunk.finish_reason is None:
                    delay = last_yield + min_interval_s - time.monotonic()
                    short = flush_tokens - len(chunk.token_ids) if flush_tokens else 1 << 30
                    if delay > 0 and short > 0:  # gather what arrives until the interval is up: one chunk
                        chunk = merge(chunk, await inbox.take_within(delay, short))
                finished = chunk.finish_reason is not None
                if chunk.finish_reason in ("error", "abort"):
                    raise EngineError(chunk.error or "request aborted")
                if finished and chunk.stats is not None:  # timings as this consumer saw them
                    first = inbox.first_token_at
                    chunk.stats["seconds"] = time.perf_counter() - opened
                    chunk.stats["first_token_seconds"] = None if first is None else first - opened
                last_yield = time.monotonic()
                yield chunk
                if finished:
                    return
        except (ValueError, EngineOverloaded, EngineError):
            finished = True  # rejected, or already ended by the engine
            raise
        finally:
            self._router.close(rid)
            if not finished:
                self.abort(rid)

    async def generate(self, prompt_ids, params: DecodeParams | None = None,
                       request_id: str | None = None) -> GenerationOutput:
        """One request to the end, with one wake-up."""
        async for last in self.stream(prompt_ids, params, request_id, wake="final"):
            if last.finish_reason is not None:
                return output_of(last)
        raise EngineError("the stream ended without a last chunk")


def output_of(last: StreamChunk, tokens: list[int] | None = None) -> GenerationOutput:
    st = last.stats
    return GenerationOutput(token_ids=last.token_ids if tokens is None else tokens, finish_reason=last.finish_reason,
                            forward_passes=st["forward_passes"], mode=st["mode"], prompt_tokens=st["prompt_tokens"],
                            accepted_lengths=st["accepted_lengths"], denoise_passes=st["denoise_passes"],
                            seconds=st.get("seconds", 0.0))
