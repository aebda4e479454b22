"""One `/generate` request inside a replica: text in, engine run, text out, in one message or a stream.

Contract: `Generations(engine, codec, metrics, max_prompt, stream_interval_s)`.
`start(req)` turns the request into prompt ids and `DecodeParams`, submits it and waits for
its first output; every failure up to there raises `Rejected(status, ErrorInfo)` (400 bad
field with `param`, 400 `context_length_exceeded`, 429 overloaded, 503 engine error), so no
byte is sent for a request that will not run. Then:
- `req.stream` false: `result(started)` is the whole request as ONE `GenerateChunk` (all
  token ids, the full text, `finish_reason`, `usage`); an engine failure is `Rejected` (503). Without stop strings the engine wakes
  this handler once, at the end; with stop strings, once per step, to cut the text and stop
  the engine at the first match.
- `req.stream` true: `ndjson(started)` yields NDJSON lines of `GenerateChunk` text deltas, at
  most one per `stream_interval_s` unless `stream_flush_tokens` tokens are waiting (tokens
  that arrive meanwhile join the next line); tokens made while the handler is busy are merged
  anyway. With `req.sse` set, the lines between the first and the last are the client's
  OpenAI SSE events instead (`wire.SSERender`; empty deltas are skipped), so the gateway
  forwards them without parsing. A failure after the first line is one last chunk with `error`.
  `ndjson(started, emit)` (a request bound to a stream channel, `replicas.channels`): the SSE
  events after the first line go to `emit(line)` straight from the engine's delivery callback
  (an `EventTap` on the request's inbox: no wake-up of this handler per step), and the handler
  yields only the first and the last line; `emit` returning False (the channel closed) ends
  the request. Not with `stream_interval_s` (its merging needs the handler's timing).
Metrics are recorded once per request (first token, inter-token, tokens per forward), not per
chunk. Closing the stream, or cancelling the handler, aborts the engine request.
Non-goals: HTTP routing (see `app`), OpenAI field names (the gateway).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, replace
from typing import AsyncIterator, Callable

from .engine import DecodeParams, EngineError, EngineOverloaded
from .text import ChatTemplateError, Detokenizer, TextCodec
from .wire import ErrorInfo, GenerateChunk, GenerateRequest, Usage, tokens_per_forward

WIRE_TO_FIELD = {"max_new_tokens": "max_tokens"}  # engine field names that differ on the wire


class Rejected(Exception):
    """A request that will not run: the status and error body to answer with."""

    def __init__(self, status: int, info: ErrorInfo) -> None:
        super().__init__(info.message)
        self.status, self.info = status, info


def param_of(message: str) -> str | None:
    """`ValueError`s from the engine start with the field name: 'max_new_tokens: ...'."""
    head = message.split(":", 1)[0].strip()
    return WIRE_TO_FIELD.get(head, head) if head.isidentifier() else None


@dataclass
class Started:
    req: GenerateRequest
    request_id: str
    prompt_tokens: int
    stream: AsyncIterator  # the engine's chunks
    first: object  # its first chunk (already received)
    t0: float


class Generations:
    def __init__(self, engine, codec: TextCodec, metrics, max_prompt: int, stream_interval_s: float = 0.0,
                 stream_flush_tokens: int = 0) -> None:
        self.engine = engine
        self.codec = codec
        self.metrics = metrics
        self.max_prompt = max_prompt
        self.stream_interval_s = stream_interval_s
        self.stream_flush_tokens = stream_flush_tokens

    def prompt_ids(self, req: GenerateRequest) -> list[int]:
        given = [x is not None for x in (req.prompt, req.prompt_ids, req.messages)]
        if sum(given) != 1:
            raise ValueError("prompt: give exactly one of prompt, prompt_ids, messages")
        if req.prompt_ids is not None:
            return req.prompt_ids
        if req.prompt is not None:
            return self.codec.encode(req.prompt)
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        return self.codec.encode_chat(messages, req.add_generation_prompt)

    async def start(self, req: GenerateRequest) -> Started:
        t0 = time.perf_counter()
        try:
            ids = self.prompt_ids(req)
            if len(ids) > self.max_prompt:
                raise Rejected(400, ErrorInfo(
                    message=f"the prompt has {len(ids)} tokens; this model accepts at most {self.max_prompt}",
                    type="invalid_request_error", param="messages" if req.messages else "prompt",
                    code="context_length_exceeded"))
            params = DecodeParams(
                mode=req.mode, max_new_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p,
                top_k=req.top_k, seed=req.seed, stop_token_ids=tuple(req.stop_token_ids), ignore_eos=req.ignore_eos,
                block_length=req.block_length, threshold=0.9 if req.threshold is None else req.threshold,
                draft_lora=req.draft_lora, denoise_lora=req.denoise_lora, spec_algorithm=req.self_spec_algorithm,
            )
            rid = req.request_id or uuid.uuid4().hex
            # one wake-up per request unless text must be watched as it grows
            wake = "each" if req.stream or req.stop else "final"
            interval = self.stream_interval_s if req.stream else 0.0
            stream = self.engine.stream(ids, params, request_id=rid, wake=wake, min_interval_s=interval,
                                        flush_tokens=self.stream_flush_tokens)
            first = await anext(stream)  # submits: request errors surface here, before any byte
        except Rejected:
            raise
        except ChatTemplateError as e:
            raise Rejected(400, ErrorInfo(message=str(e), type="invalid_request_error", param="messages")) from e
        except ValueError as e:
            raise Rejected(400, ErrorInfo(message=str(e), type="invalid_request_error", param=param_of(str(e)))) from e
        except EngineOverloaded as e:
            raise Rejected(429, ErrorInfo(message=str(e), type="overloaded_error", code="engine_overloaded")) from e
        except EngineError as e:
            self.metrics.observe_request(req.mode, "error", None, [])
            raise Rejected(503, ErrorInfo(message=str(e), type="server_error", code="engine_error")) from e
        if req.stream:
            self.metrics.observe_first_token(req.mode, time.perf_counter() - t0)
        return Started(req, rid, len(ids), stream, first, t0)

    async def result(self, s: Started) -> GenerateChunk:
        """Non-streaming: the whole request as one chunk; an engine failure raises `Rejected`
        (503 `engine_error`: nothing was sent yet, so the status says it)."""
        detok = Detokenizer(self.codec, stop=list(s.req.stop))
        tokens: list[int] = []
        parts: list[str] = []  # text deltas, when stop strings are watched
        chunk = s.first
        try:
            while True:
                tokens += chunk.token_ids
                final = chunk.finish_reason is not None
                if s.req.stop:
                    parts.append(detok.push(chunk.token_ids, final=final))
                if final or detok.stopped:
                    break
                chunk = await anext(s.stream)
        except EngineError as e:
            self._failed(s, e)
            raise Rejected(503, ErrorInfo(message=str(e), type="server_error", code="engine_error")) from e
        finally:
            await s.stream.aclose()  # aborts the engine request if a stop string ended it early
        text = "".join(parts) if s.req.stop else self.codec.decode(tokens)
        return self._last(s, chunk, tokens, text, "stop" if detok.stopped else chunk.finish_reason)

    async def ndjson(self, s: Started, emit: Callable[[bytes], bool] | None = None) -> AsyncIterator[bytes]:
        detok = Detokenizer(self.codec, stop=list(s.req.stop))
        # with `sse`, chunks after the first are the client's events, ready to forward
        head, tail = s.req.sse.event_parts() if s.req.sse is not None else (None, None)
        tap = None
        chunk = s.first
        first = True
        try:
            while True:
                final = chunk.finish_reason is not None
                text = detok.push(chunk.token_ids, final=final)
                if tap is not None:
                    if tap.closed:
                        return  # nobody reads this request's events any more
                    if tap.held_ids:  # the chunk that met a stop string: its ids are this chunk's
                        chunk = replace(chunk, token_ids=tap.held_ids + chunk.token_ids)
                    text, tap.held, tap.held_ids = tap.held + text, "", []
                if final or detok.stopped:
                    out = self._last(s, chunk, detok.ids, text, "stop" if detok.stopped else chunk.finish_reason)
                    yield out.model_dump_json(exclude_none=True).encode() + b"\n"
                    return
                if head is None or first:
                    out = GenerateChunk(request_id=s.request_id, mode=chunk.mode or s.req.mode,
                                        token_ids=chunk.token_ids, text=text, forward_passes=chunk.forward_passes)
                    yield out.model_dump_json(exclude_none=True).encode() + b"\n"
                    first = False
                    if emit is not None and head is not None and not self.stream_interval_s:
                        tap = EventTap(detok, head, tail, emit)
                        self.engine.tap(s.request_id, tap)
                elif text:  # an empty delta is no event
                    yield head + json.dumps(text).encode() + tail
                chunk = await anext(s.stream)
        except EngineError as e:
            yield self._failed(s, e).model_dump_json(exclude_none=True).encode() + b"\n"
        finally:
            await s.stream.aclose()  # aborts the engine request if it is still running

    def _failed(self, s: Started, e: EngineError) -> GenerateChunk:
        self.metrics.observe_request(s.req.mode, "error", None, [])
        return GenerateChunk(request_id=s.request_id, mode=s.req.mode, finish_reason="error",
                             error=ErrorInfo(message=str(e), type="server_error", code="engine_error"))

    def _last(self, s: Started, chunk, tokens: list[int], text: str, reason: str) -> GenerateChunk:
        """The request's last chunk (usage, accepted lengths), and its metrics, once."""
        passes = chunk.forward_passes
        n = len(tokens)
        usage = Usage(prompt_tokens=s.prompt_tokens, completion_tokens=n, forward_passes=passes,
                      tokens_per_forward=tokens_per_forward(n, passes))
        stats = chunk.stats or {}
        accepted = stats.get("accepted_lengths", [])
        mode = chunk.mode or s.req.mode
        self.metrics.observe_request(mode, reason, usage.tokens_per_forward, accepted)
        first, total = stats.get("first_token_seconds"), stats.get("seconds")
        if first is not None and not s.req.stream:
            self.metrics.observe_first_token(s.req.mode, first)
        if first is not None and total is not None and n > 1:
            self.metrics.observe_inter_token(mode, (total - first) / (n - 1))
        return GenerateChunk(request_id=s.request_id, mode=mode, token_ids=tokens if not s.req.stream else
                             chunk.token_ids, text=text, finish_reason=reason, forward_passes=passes, usage=usage,
                             accepted_lengths=accepted or None, self_spec_algorithm=stats.get("spec_algorithm"))


class EventTap:
    """A streamed request's middle chunks as SSE events, rendered in the engine's delivery
    callback and handed to `emit` (an inbox tap, `StreamingFrontend.tap`). It stops (returns
    False, the handler wakes) on a stop string, keeping the text before it in `held` for the
    last chunk, or when `emit` refuses a line (`closed`)."""

    __slots__ = ("detok", "head", "tail", "emit", "held", "held_ids", "closed")

    def __init__(self, detok: Detokenizer, head: bytes, tail: bytes, emit: Callable[[bytes], bool]) -> None:
        self.detok, self.head, self.tail, self.emit = detok, head, tail, emit
        self.held = ""  # text made by a push whose event was not emitted (it goes in the last chunk)
        self.held_ids: list[int] = []  # ... and that push's ids
        self.closed = False

    def __call__(self, chunk) -> bool:
        text = self.detok.push(chunk.token_ids)
        if self.detok.stopped:
            self.held, self.held_ids = text, list(chunk.token_ids)
            return False
        if text and not self.emit(self.head + json.dumps(text).encode() + self.tail):
            self.closed = True
            return False
        return True
