"""`AsyncEngine`: the batched engine on its own thread, streamed to asyncio consumers.

Contract: one daemon thread runs `BatchEngine.step()` whenever there is work, so the event
loop that serves HTTP never blocks on a forward. `stream(prompt_ids, params)` is an async
iterator of `StreamChunk`s (tokens made final at each step; the last one carries
`finish_reason` and the request's stats). Cancelling the consuming task, or closing the
iterator early, aborts the request: its KV slot is freed at the start of the next step.
Submission errors raise at once (`ValueError`, `EngineOverloaded`); a failed forward raises
`EngineError` in the affected streams only. `shutdown()` stops the thread and fails open
streams. Non-goals: HTTP, tokenisation, Ray.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import uuid
from pathlib import Path
from typing import AsyncIterator

from .batch_engine import BatchEngine, StreamChunk
from .engine_config import EngineConfig
from .params import DecodeParams, GenerationOutput


def merge(a: StreamChunk, b: StreamChunk) -> StreamChunk:
    """`a` then `b` as one chunk: b's tokens appended, b's end state (finish, stats, mode)."""
    return StreamChunk(a.request_id, a.token_ids + b.token_ids, finish_reason=b.finish_reason, stats=b.stats,
                       error=b.error, forward_passes=b.forward_passes, mode=b.mode)


class EngineError(RuntimeError):
    """A request failed inside the engine (its forward raised, or the engine shut down)."""


class AsyncEngine:
    def __init__(self, core: BatchEngine) -> None:
        self.core = core
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._streams_lock = threading.Lock()
        self._wake = threading.Condition()
        self._stopping = False
        self._prefix = uuid.uuid4().hex[:8]
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._loop, name="nld-engine-loop", daemon=True)
        self._thread.start()

    @classmethod
    def from_pretrained(cls, path: str | Path, config: EngineConfig | None = None, **load_kw) -> "AsyncEngine":
        return cls(BatchEngine.from_pretrained(path, config, **load_kw))

    @property
    def config(self) -> EngineConfig:
        return self.core.config

    @property
    def model_config(self):
        return self.core.engine.config

    # ---- public API ----------------------------------------------------------------------
    async def stream(
        self, prompt_ids, params: DecodeParams | None = None, request_id: str | None = None,
        coalesce: bool = False,
    ) -> AsyncIterator[StreamChunk]:
        """Chunks of final tokens; with `coalesce`, chunks that queued up while the consumer was
        busy arrive merged (fewer, larger chunks; the same tokens)."""
        if self._stopping:
            raise EngineError("the engine is shut down")
        rid = request_id or f"{self._prefix}-{next(self._ids)}"
        queue: asyncio.Queue = asyncio.Queue()
        with self._streams_lock:
            if rid in self._streams:
                raise ValueError(f"request_id: {rid!r} is already in flight")
            self._streams[rid] = (asyncio.get_running_loop(), queue)
        try:
            self.core.submit(prompt_ids, params, request_id=rid)
        except BaseException:
            self._forget(rid)
            raise
        self._notify()
        finished = False
        try:
            while True:
                chunk: StreamChunk = await queue.get()
                while coalesce and chunk.finish_reason is None and not queue.empty():
                    chunk = merge(chunk, queue.get_nowait())  # the consumer fell behind: one chunk
                if chunk.finish_reason == "error":
                    finished = True
                    raise EngineError(chunk.error or "engine error")
                if chunk.finish_reason == "abort":
                    finished = True
                    raise EngineError("request aborted")
                finished = chunk.finish_reason is not None
                yield chunk
                if finished:
                    return
        finally:
            self._forget(rid)
            if not finished:
                self.abort(rid)

    async def generate(self, prompt_ids, params: DecodeParams | None = None,
                       request_id: str | None = None) -> GenerationOutput:
        tokens: list[int] = []
        last: StreamChunk | None = None
        async for chunk in self.stream(prompt_ids, params, request_id):
            tokens.extend(chunk.token_ids)
            last = chunk
        st = last.stats
        return GenerationOutput(token_ids=tokens, finish_reason=last.finish_reason,
                                forward_passes=st["forward_passes"], mode=st["mode"],
                                prompt_tokens=st["prompt_tokens"], accepted_lengths=st["accepted_lengths"],
                                denoise_passes=st["denoise_passes"])

    def abort(self, request_id: str) -> None:
        self.core.abort(request_id)
        self._notify()

    def set_mode(self, request_id: str, mode: str) -> None:
        self.core.set_mode(request_id, mode)
        self._notify()

    def stats(self) -> dict:
        return self.core.stats_snapshot()

    def update_draft_tiers(self, tiers) -> None:
        self.core.update_draft_tiers(tiers)

    def downgrade_self_spec(self, on: bool) -> list[str]:
        """See `BatchEngine.downgrade_self_spec`; wakes the loop so switches apply promptly."""
        moved = self.core.downgrade_self_spec(on)
        self._notify()
        return moved

    def shutdown(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        self._thread.join(timeout=30)
        with self._streams_lock:
            streams = list(self._streams.items())
        for rid, _ in streams:
            self._deliver(StreamChunk(rid, [], finish_reason="error", error="the engine shut down"))

    # ---- loop thread ---------------------------------------------------------------------
    def _notify(self) -> None:
        with self._wake:
            self._wake.notify_all()

    def _forget(self, rid: str) -> None:
        with self._streams_lock:
            self._streams.pop(rid, None)

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self.core.has_work():
                    self._wake.wait(timeout=1.0)
                if self._stopping:
                    return
            for chunk in self.core.step():
                self._deliver(chunk)

    def _deliver(self, chunk: StreamChunk) -> None:
        with self._streams_lock:
            entry = self._streams.get(chunk.request_id)
        if entry is None:
            return
        loop, queue = entry
        try:
            loop.call_soon_threadsafe(queue.put_nowait, chunk)
        except RuntimeError:  # the consumer's loop is closed: nobody will read this stream
            self.core.abort(chunk.request_id)
