"""Fake replicas for tests and benchmarks: an in-process `ReplicaClient` and a wire-protocol server.

(Test code: it lives under tests/, not in the `gateway` package; `benchmarks/gateway_overhead.py`
imports it with the repository root on the path.)

Contract: both fakes produce the same deterministic output from `fake_chunks(request)`: words
from a fixed list (chosen by seed, prompt and position), cut at the first stop string, chunked
per mode (ar 1 token per chunk, diffusion 2, self_spec 4; one chunk = one forward pass), the
last chunk with `finish_reason` and `usage`; a non-streaming request (`stream: false`) gets
ONE chunk, as from a real replica. `FakeReplicaClient` records every request and
every stream (`aborted` when closed before its last chunk) and has knobs for failures:
`generate_error`, `hang_s`, `chunk_delay_s`, `error_after_chunks`, `first_chunk_error`,
`healthy`, `engine_error`; it keeps the pushed engine settings in `engine_updates`.
`fake_replica_app(state)` is a small ASGI app speaking the HTTP wire protocol of
`replicas.wire` (NDJSON `/generate`, `/health`, `/info`, `/stats`, `POST /engine`) with the same knobs on a
`FakeReplicaState`; `instant=True` sends the whole answer in one chunk (benchmarks). Non-goals:
realistic text or timing; tokenization (a "token" is a word).
"""

from __future__ import annotations

import asyncio
import json
import zlib
from dataclasses import dataclass, field

from replicas.wire import (EngineSettings, ErrorBody, ErrorInfo, GenerateChunk, GenerateRequest, ReplicaInfo, Usage,
                          tokens_per_forward)

from gateway.replica_client import ReplicaError

WORDS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu")
TOKENS_PER_CHUNK = {"ar": 1, "diffusion": 2, "self_spec": 4}
FAKE_INFO = ReplicaInfo(model="nld", vocab_size=1000, max_seq_len=2048, max_prompt_tokens=1024, block_size=16,
                        max_block_length=32, has_draft_lora=True, eos_token_ids=[2], device="cpu", dtype="float32")


def _prompt_tokens(r: GenerateRequest) -> int:
    if r.prompt_ids is not None:
        return len(r.prompt_ids)
    if r.messages is not None:
        return sum(3 + len(str(m.content or "").split()) for m in r.messages)
    return max(1, len((r.prompt or "").split()))


def fake_chunks(r: GenerateRequest, instant: bool = False) -> list[GenerateChunk]:
    key = json.dumps([r.prompt, r.prompt_ids, [m.model_dump() for m in r.messages or []]], sort_keys=True)
    tail = (r.request_id or "").rsplit("-", 1)[-1]
    seed = r.seed if r.seed is not None else (int(tail) if tail.isdigit() else 0)  # choice i differs from j
    start = zlib.crc32(key.encode()) + seed
    words = [" " + WORDS[(start + k) % len(WORDS)] for k in range(r.max_tokens)]
    acc, visible_end, n_tokens = "", None, len(words)
    for k, w in enumerate(words):  # decode token by token until a stop string shows up
        acc += w
        hits = [acc.find(s) for s in r.stop if s in acc]
        if hits:
            visible_end, n_tokens = min(hits), k + 1
            break
    full = acc if visible_end is None else acc[:visible_end]
    ends = [len("".join(words[: e])) for e in range(n_tokens + 1)]  # text end after e tokens
    per = n_tokens if instant else TOKENS_PER_CHUNK[r.mode]
    rid = r.request_id or "fake"
    chunks, sent = [], 0
    for k in range(0, n_tokens, per):
        e = min(k + per, n_tokens)
        end = min(ends[e], len(full))
        chunks.append(GenerateChunk(request_id=rid, mode=r.mode, token_ids=list(range(k, e)), text=full[sent:end]))
        sent = end
    chunks[-1].finish_reason = "stop" if visible_end is not None else "length"
    chunks[-1].usage = Usage(prompt_tokens=_prompt_tokens(r), completion_tokens=n_tokens, forward_passes=len(chunks),
                             tokens_per_forward=round(tokens_per_forward(n_tokens, len(chunks)), 4))
    if r.mode == "self_spec":  # like the replica: the algorithm that ran (the engine's default: linear)
        chunks[-1].self_spec_algorithm = r.self_spec_algorithm or "linear"
    if not r.stream:  # the whole answer in one message
        last = chunks[-1]
        return [last.model_copy(update={"token_ids": list(range(n_tokens)), "text": full})]
    return chunks


def as_wire(r: GenerateRequest, chunks: list[GenerateChunk]) -> list[GenerateChunk | bytes]:
    """What a replica sends for `chunks`: with `sse`, the middle chunks as ready SSE events
    (empty deltas dropped), as `replicas.generation` does; else the chunks themselves."""
    if r.sse is None or not r.stream or len(chunks) < 3:
        return list(chunks)
    head, tail = r.sse.event_parts()
    middle = [head + json.dumps(c.text).encode() + tail for c in chunks[1:-1] if c.text]
    return [chunks[0], *middle, chunks[-1]]


def engine_failed(like: GenerateChunk) -> GenerateChunk:
    return GenerateChunk(request_id=like.request_id, mode=like.mode, finish_reason="error",
                         error=ErrorInfo(message="engine failed", type="server_error", code="engine_error"))


class FakeStream:
    def __init__(self, owner: "FakeReplicaClient", request: GenerateRequest, chunks: list[GenerateChunk]) -> None:
        self.owner, self.request = owner, request
        self.chunks = as_wire(request, chunks) if owner.render_sse else list(chunks)
        self.sent = 0
        self.closed = False
        self.finished = False

    @property
    def aborted(self) -> bool:
        return self.closed and not self.finished

    def __aiter__(self) -> "FakeStream":
        return self

    async def __anext__(self) -> GenerateChunk | bytes:
        if self.closed or self.finished:
            raise StopAsyncIteration
        o = self.owner
        if self.sent and o.chunk_delay_s:
            await asyncio.sleep(o.chunk_delay_s)
        if self.sent == 0 and o.first_chunk_error is not None:
            self.finished = True
            return GenerateChunk(request_id=self.request.request_id or "", mode=self.request.mode,
                                 finish_reason="error", error=o.first_chunk_error)
        if o.error_after_chunks is not None and self.sent >= o.error_after_chunks and self.request.stream:
            self.finished = True
            return engine_failed(self.chunks[0])
        chunk = self.chunks[self.sent]
        self.sent += 1
        if type(chunk) is not bytes and chunk.finish_reason is not None:
            self.finished = True
        return chunk

    async def aclose(self) -> None:
        self.closed = True


class FakeReplicaClient:
    """In-process `ReplicaClient` with failure knobs; see the module contract."""

    def __init__(self, info: ReplicaInfo = FAKE_INFO) -> None:
        self._info = info
        self.requests: list[GenerateRequest] = []
        self.streams: list[FakeStream] = []
        self.generate_error: ReplicaError | None = None
        self.hang_s = 0.0
        self.chunk_delay_s = 0.0
        self.error_after_chunks: int | None = None
        self.first_chunk_error: ErrorInfo | None = None
        self.healthy = True
        self.closed = False
        self.engine_updates: list[EngineSettings] = []
        self.engine_error: ReplicaError | None = None
        self.render_sse = True  # False: ignore `sse`, send every chunk as a GenerateChunk (the gateway renders)

    async def generate(self, request: GenerateRequest) -> FakeStream:
        self.requests.append(request)
        if self.hang_s:
            await asyncio.sleep(self.hang_s)
        if self.generate_error is not None:
            raise self.generate_error
        chunks = fake_chunks(request)
        passes = chunks[-1].usage.forward_passes
        if not request.stream and self.error_after_chunks is not None and self.error_after_chunks < passes:
            # the engine failed before the answer was complete: a real replica answers 503
            raise ReplicaError(503, engine_failed(chunks[0]).error)
        stream = FakeStream(self, request, chunks)
        self.streams.append(stream)
        if not request.stream and self.chunk_delay_s:  # the replica answers once it has everything
            try:
                await asyncio.sleep(self.chunk_delay_s * (passes - 1))
            except asyncio.CancelledError:
                await stream.aclose()  # the connection closes: the replica aborts
                raise
        return stream

    async def info(self) -> ReplicaInfo:
        if not self.healthy:
            raise ReplicaError(503, ErrorInfo(message="down", type="service_unavailable_error"))
        return self._info

    async def health(self) -> bool:
        return self.healthy

    async def stats(self) -> dict:
        return {"running": sum(1 for s in self.streams if not (s.closed or s.finished))}

    async def update_engine(self, settings: EngineSettings) -> dict:
        if self.engine_error is not None:
            raise self.engine_error
        self.engine_updates.append(settings)
        return {"moved": []}

    async def aclose(self) -> None:
        self.closed = True


# ---- the wire-protocol server ------------------------------------------------------------------

@dataclass
class FakeReplicaState:
    instant: bool = False
    chunk_delay_s: float = 0.0
    error_status: int | None = None  # answer /generate with this status and an ErrorBody
    error_after_chunks: int | None = None
    info: ReplicaInfo = field(default_factory=lambda: FAKE_INFO.model_copy())
    requests: list[GenerateRequest] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)  # request ids whose client went away mid-stream
    completed: list[str] = field(default_factory=list)
    engine_updates: list[EngineSettings] = field(default_factory=list)  # bodies of POST /engine


def fake_replica_app(state: FakeReplicaState):
    """A minimal ASGI app speaking the replica wire protocol (no framework: fast and explicit)."""

    async def respond(send, status: int, body: bytes, ctype: bytes = b"application/json") -> None:
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", ctype)]})
        await send({"type": "http.response.body", "body": body})

    async def app(scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while (msg := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        path, method = scope["path"], scope["method"]
        if method == "GET" and path in ("/health", "/info", "/stats"):
            body = {"/health": {"status": "ok"}, "/info": state.info.model_dump(),
                    "/stats": {"requests": len(state.requests)}}[path]
            await respond(send, 200, json.dumps(body).encode())
            return
        if not (method == "POST" and path in ("/generate", "/engine")):
            await respond(send, 404, b'{"detail": "not found"}')
            return
        raw = b""
        while True:
            msg = await receive()
            raw += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        if path == "/engine":
            state.engine_updates.append(EngineSettings.model_validate_json(raw))
            await respond(send, 200, b'{"moved": []}')
            return
        request = GenerateRequest.model_validate_json(raw)
        state.requests.append(request)
        if state.error_status is not None:
            err = ErrorBody(error=ErrorInfo(message="fake replica error", type="fake_error", code="fake"))
            await respond(send, state.error_status, err.model_dump_json().encode())
            return
        chunks = as_wire(request, fake_chunks(request, instant=state.instant))
        if not request.stream:  # one message, as a real replica answers it
            await respond(send, 200, chunks[0].model_dump_json(exclude_none=True).encode())
            state.completed.append(request.request_id or "")
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/x-ndjson")]})
        disconnected = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            disconnected.set()

        watcher = asyncio.ensure_future(watch())
        try:
            for k, c in enumerate(chunks):
                if state.error_after_chunks is not None and k >= state.error_after_chunks:
                    c = GenerateChunk(request_id=chunks[0].request_id, mode=chunks[0].mode, finish_reason="error",
                                      error=ErrorInfo(message="engine failed", type="server_error"))
                if k and state.chunk_delay_s:
                    try:
                        await asyncio.wait_for(disconnected.wait(), state.chunk_delay_s)
                    except TimeoutError:
                        pass
                if disconnected.is_set():
                    state.aborted.append(request.request_id or "")
                    return
                if type(c) is bytes:  # a ready SSE event
                    await send({"type": "http.response.body", "body": c, "more_body": True})
                    continue
                last = c.finish_reason is not None
                await send({"type": "http.response.body", "body": c.model_dump_json(exclude_none=True).encode() + b"\n",
                            "more_body": not last})
                if last:
                    state.completed.append(request.request_id or "")
                    return
        except OSError:
            state.aborted.append(request.request_id or "")
        finally:
            watcher.cancel()

    return app
