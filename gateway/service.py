"""The completion service: OpenAI request -> mode decision -> n upstream generations -> response.

Contract: `CompletionService.plan(request, chat)` validates what the request models cannot
(model id -> 404, config limits and unsupported features -> 400 with `param`), asks the
injected `ModePolicy` for the mode (for `auto` and explicit modes alike) and builds one
`GenerateRequest` per choice (prompt i, sample j -> choice index i*n+j, seed + index).
`check_context(plan)` answers 400 `context_length_exceeded` for what cannot fit the replicas'
context (from their cached `/info`): a token-id prompt over `max_prompt_tokens`, or a prompt
plus `max_tokens` plus one decoding block over `max_seq_len` (a text prompt counts as at least
one token: the replica checks its real length and answers the same error); and 400 for a
`block_length` over the replicas' `max_block_length`.
Errors relayed from the replicas (`replica_error`, `chunk_error`) speak the API's language: the
engine's field names become the API's (`prompt_ids` -> `prompt`, `max_new_tokens` ->
`max_tokens`, ...), a context-length failure is 400 `context_length_exceeded`, and every error
gets a code (the replica's, else one for its status).
`open(plan)` starts every generation concurrently and waits for each first chunk, so any
failure up to there is a `GatewayError` with a real HTTP status; `collect` (non-streaming) and
`sse_events` (streaming) consume the opened streams, and `close` aborts whatever is still
running upstream. The caller (`gateway.app`) owns deadlines, disconnects and metrics.
Non-goals: HTTP routing, auth, tokenization.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator

from policies import ModePolicy, ModeRequest
from replicas.wire import EngineSettings, ErrorInfo, GenerateChunk, GenerateRequest, ReplicaInfo, SSERender

from .config import GatewayConfig
from .errors import GatewayError
from . import render
from .openai_api import ChatCompletionRequest, CompletionRequest
from .plan import Opened, Plan
from .replica_client import ReplicaClient, ReplicaError, ReplicaStream
from .sse import DONE, event

CHUNK_ERROR_STATUS = {"invalid_request_error": 400, "rate_limit_error": 429, "timeout_error": 504,
                      "service_unavailable_error": 503}
CONTEXT_LENGTH = "context_length_exceeded"
# the code of a relayed error that has none, by status (a 400 from the replica is a bad value)
DEFAULT_CODES = {400: "invalid_value", 404: "not_found", 413: "request_too_large", 429: "overloaded",
                 500: "engine_error", 503: "no_replica", 504: "upstream_timeout"}
# engine and wire names -> the API's, in `param` (the replica reports errors in the engine's terms)
API_PARAMS = {"prompt_ids": "prompt", "max_new_tokens": "max_tokens", "threshold": "confidence_threshold",
              "mode": "decoding_mode", "stop_token_ids": "stop"}
# ... and in messages, where only unambiguous identifiers are rewritten
_MESSAGE_TERMS = re.compile(r"\b(prompt_ids|max_new_tokens)\b")


def api_param(param: str | None) -> str | None:
    """A replica's `param` in the API's terms: "max_new_tokens" -> "max_tokens",
    "messages.0.content" -> "messages[0].content"."""
    if not param:
        return param
    parts = param.split(".")
    out = API_PARAMS.get(parts[0], parts[0])
    for p in parts[1:]:
        out += f"[{p}]" if p.isdigit() else f".{p}"
    return out


def api_error(status: int, info: ErrorInfo, retry_after: float | None = None) -> GatewayError:
    """A replica's error as the client sees it: API names, a code, one status for context length."""
    param = api_param(info.param)
    message = _MESSAGE_TERMS.sub(lambda m: API_PARAMS[m.group(1)], info.message)
    code = info.code
    # the engine refuses max_new_tokens only when prompt + max_new_tokens + one block do not fit
    # (the gateway checked >= 1 and the configured limit); a 413 is an older replica's answer
    if status == 413 and code in (None, CONTEXT_LENGTH) or (status == 400 and param == "max_tokens"):
        status, code = 400, CONTEXT_LENGTH
    if code is None:
        code = DEFAULT_CODES.get(status, "internal_error" if status >= 500 else "invalid_value")
    return GatewayError(status, message, type=info.type, param=param, code=code, retry_after=retry_after)


def chunk_error(info: ErrorInfo) -> GatewayError:
    return api_error(CHUNK_ERROR_STATUS.get(info.type, 500), info)


def replica_error(e: ReplicaError, retry_after_s: int) -> GatewayError:
    retry = e.retry_after if e.retry_after is not None else (retry_after_s if e.status in (429, 503) else None)
    return api_error(e.status, e.info, retry)


class CompletionService:
    def __init__(self, config: GatewayConfig, client: ReplicaClient, policy: ModePolicy) -> None:
        self.config = config
        self.client = client
        self.policy = policy
        self._settings_raw: dict | None = None
        self._settings: EngineSettings | None = None

    # ---- planning ----------------------------------------------------------------------------

    def plan(self, req: CompletionRequest | ChatCompletionRequest, chat: bool) -> Plan:
        cfg = self.config
        if req.model != cfg.model_name:
            raise GatewayError(404, f"model {req.model!r} does not exist (served: {cfg.model_name!r})",
                               type="invalid_request_error", param="model", code="model_not_found")
        bad = req.unsupported_features()
        if bad is not None:
            raise GatewayError(400, bad[1], param=bad[0], code="unsupported_parameter")
        if req.n > cfg.max_n:
            raise GatewayError(400, f"n must be at most {cfg.max_n}", param="n", code="invalid_value")
        stops = req.stop_list()
        if len(stops) > cfg.max_stop:
            raise GatewayError(400, f"at most {cfg.max_stop} stop strings", param="stop", code="invalid_value")
        if any(not s for s in stops):
            raise GatewayError(400, "stop strings must not be empty", param="stop", code="invalid_value")
        for name in ("max_tokens", "max_completion_tokens"):
            value = getattr(req, name)
            if value is not None and value > cfg.max_tokens_limit:
                raise GatewayError(400, f"{name} must be at most {cfg.max_tokens_limit}", param=name,
                                   code="invalid_value")
        asked = req.requested_max_tokens()
        max_tokens = asked if asked is not None else cfg.default_max_tokens

        temperature = cfg.default_temperature if req.temperature is None else req.temperature
        top_p = 1.0 if req.top_p is None else req.top_p
        if top_p == 0.0:  # OpenAI allows it; it means "the top token": greedy
            temperature, top_p = 0.0, 1.0

        sources: list[dict] = []
        if chat:
            assert isinstance(req, ChatCompletionRequest)
            sources.append({"messages": req.wire_messages()})
        else:
            assert isinstance(req, CompletionRequest)
            prompts = req.prompts()
            if not prompts:
                raise GatewayError(400, "prompt must not be empty", param="prompt", code="invalid_value")
            if len(prompts) > cfg.max_prompts:
                raise GatewayError(400, f"at most {cfg.max_prompts} prompts per request", param="prompt",
                                   code="invalid_value")
            for p in prompts:
                if isinstance(p, str):
                    sources.append({"prompt": p})
                elif not p or any(t < 0 for t in p):
                    raise GatewayError(400, "token-id prompts must be non-empty lists of ids >= 0", param="prompt",
                                       code="invalid_value")
                else:
                    sources.append({"prompt_ids": p})
        # every check passed: only now ask the policy (it may count decisions)
        decision = self.policy.decide(ModeRequest(requested_mode=req.decoding_mode, model=req.model,
                                                  max_tokens=max_tokens))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        common = dict(mode=decision.mode, max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stops,
                      block_length=req.block_length, threshold=req.confidence_threshold, draft_lora=req.draft_lora,
                      denoise_lora=req.denoise_lora,
                      self_spec_algorithm=req.self_spec_algorithm or decision.spec_algorithm,
                      top_k=req.top_k or 0, ignore_eos=bool(req.ignore_eos), engine=self.engine_settings(),
                      stream=bool(req.stream))
        created = int(time.time())
        include_usage = req.wants_usage_chunk()
        requests = []
        for i, src in enumerate(sources):
            for j in range(req.n):
                index = i * req.n + j
                seed = None if req.seed is None else req.seed + index
                # streamed: the replica renders the middle chunks as this choice's SSE events
                sse = SSERender(id=rid, created=created, model=cfg.model_name, index=index, chat=chat,
                                include_usage=include_usage) if req.stream else None
                requests.append(GenerateRequest(request_id=f"{rid}-{index}", seed=seed, sse=sse, **src, **common))
        return Plan(id=rid, created=created, chat=chat, model=cfg.model_name, mode=decision.mode,
                    reason=decision.reason, n=req.n, requests=requests, stream=bool(req.stream),
                    include_usage=include_usage,
                    max_tokens_param="max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens")

    def engine_settings(self) -> EngineSettings | None:
        """The policy's engine settings, carried by every request so every replica follows them
        (validated once per distinct value, not per request)."""
        raw = self.policy.engine_settings()  # None until the policy has evaluated fresh signals once (it has no view yet)
        if raw != self._settings_raw:
            self._settings_raw, self._settings = raw, None if raw is None else EngineSettings.model_validate(raw)
        return self._settings

    async def check_context(self, plan: Plan) -> None:
        """400 `context_length_exceeded` for what cannot fit the replicas' context (see the
        module contract); nothing is checked when `/info` is unavailable (the replica checks)."""
        try:
            info: ReplicaInfo = await self.client.info()
        except ReplicaError:
            return
        for r in plan.requests:
            if r.prompt_ids is not None and len(r.prompt_ids) > info.max_prompt_tokens:
                raise GatewayError(400, f"the prompt has {len(r.prompt_ids)} tokens; this model accepts at most "
                                   f"{info.max_prompt_tokens}", param="prompt", code=CONTEXT_LENGTH)
            if r.block_length is not None and r.block_length > info.max_block_length:
                raise GatewayError(400, f"block_length {r.block_length} is above this model's limit of "
                                   f"{info.max_block_length}", param="block_length", code="invalid_value")
            prompt = len(r.prompt_ids) if r.prompt_ids is not None else 1
            block = r.block_length or min(info.block_size, info.max_block_length)
            if prompt + r.max_tokens + block > info.max_seq_len:
                name = "max_completion_tokens" if plan.max_tokens_param == "max_completion_tokens" else "max_tokens"
                known = f"the prompt ({prompt} tokens)" if r.prompt_ids is not None else "the prompt (at least 1 token)"
                raise GatewayError(400, f"{name} ({r.max_tokens}) does not fit this model's context: {known}, "
                                   f"{name} and one decoding block ({block}) must fit in {info.max_seq_len} tokens",
                                   param=name, code=CONTEXT_LENGTH)

    # ---- upstream ----------------------------------------------------------------------------

    async def open(self, plan: Plan) -> Opened:
        tasks = [asyncio.ensure_future(self._open_one(r)) for r in plan.requests]
        try:
            await gather_or_cancel(tasks)
        except BaseException as e:
            ok = [t.result()[0] for t in tasks if t.done() and not t.cancelled() and t.exception() is None]
            await asyncio.gather(*(s.aclose() for s in ok), return_exceptions=True)
            if isinstance(e, ReplicaError):
                raise replica_error(e, self.config.retry_after_s) from e
            raise
        opened = Opened(streams=[t.result()[0] for t in tasks], firsts=[t.result()[1] for t in tasks], mode=plan.mode)
        opened.mode = opened.firsts[0].mode
        opened.done = [c.finish_reason is not None for c in opened.firsts]
        return opened

    async def _open_one(self, request: GenerateRequest) -> tuple[ReplicaStream, GenerateChunk]:
        stream = await self.client.generate(request)
        try:
            first = await anext(aiter(stream))
            if first.error is not None:
                raise chunk_error(first.error)
        except BaseException:
            await stream.aclose()
            raise
        return stream, first

    async def close(self, opened: Opened) -> None:
        if opened.closed:
            return
        opened.closed = True
        await asyncio.gather(*(s.aclose() for s in opened.streams), return_exceptions=True)

    # ---- non-streaming -----------------------------------------------------------------------

    async def collect(self, plan: Plan, opened: Opened) -> dict:
        async def one(i: int) -> tuple[str, GenerateChunk]:
            texts, last = [opened.firsts[i].text], opened.firsts[i]
            if last.finish_reason is None:
                async for c in opened.streams[i]:  # the first chunk was consumed by `open`
                    texts.append(c.text)
                    last = c
                    if c.finish_reason is not None:
                        break
            if last.error is not None:
                raise chunk_error(last.error)
            return "".join(texts), last

        results = await gather_or_cancel([asyncio.ensure_future(one(i)) for i in range(len(opened.streams))])
        opened.mode = results[0][1].mode
        return render.completion_body(plan, results)

    # ---- streaming ---------------------------------------------------------------------------

    async def sse_events(self, plan: Plan, opened: Opened) -> AsyncIterator[bytes]:
        base = {"id": plan.id, "object": "chat.completion.chunk" if plan.chat else "text_completion",
                "created": plan.created, "model": plan.model}
        lasts: list[GenerateChunk | None] = [None] * len(opened.streams)
        started: set[int] = set()
        merged = self._merged(opened)
        try:
            async for index, c in merged:
                if type(c) is bytes:  # an event the replica rendered: forwarded as it is
                    yield c
                    continue
                if c.error is not None:
                    err = chunk_error(c.error)
                    opened.status = err.status
                    yield event(err.body())
                    yield DONE
                    return
                payload = render.stream_chunk(plan, base, index, c, lasts, started)
                if payload is not None:
                    yield event(payload)
        finally:
            await merged.aclose()
        if plan.include_usage:
            yield event({**base, "choices": [], "usage": render.usage(plan, lasts)})
        yield DONE

    async def _merged(self, opened: Opened) -> AsyncIterator[tuple[int, GenerateChunk | bytes]]:
        """(choice index, chunk or ready event) from every stream, first chunks first, then as they arrive."""
        for i, c in enumerate(opened.firsts):
            yield i, c
        live = [i for i, d in enumerate(opened.done) if not d]
        if not live:
            return
        iters = {i: aiter(opened.streams[i]) for i in live}
        if len(live) == 1:  # n = 1: no tasks
            i = live[0]
            async for c in iters[i]:
                yield i, c
                if type(c) is not bytes and c.finish_reason is not None:
                    return
            return
        pending = {asyncio.ensure_future(anext(iters[i], None)): i for i in live}
        try:
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in sorted(done, key=lambda t: pending[t]):
                    i = pending.pop(task)
                    c = task.result()
                    if c is None:
                        continue
                    yield i, c
                    if type(c) is bytes or c.finish_reason is None:
                        pending[asyncio.ensure_future(anext(iters[i], None))] = i
        finally:
            for task in pending:
                task.cancel()


async def gather_or_cancel(tasks: list[asyncio.Future]) -> list:
    """Results of all tasks; on the first failure (or cancellation) cancel the rest, wait, re-raise."""
    try:
        if len(tasks) == 1:
            return [await tasks[0]]
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
