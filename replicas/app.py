"""The Ray Serve deployment: one `NLDReplica` loads the weights once and serves every mode.

Contract: `build_app(args)` (Serve's application builder: `import_path: replicas.app:build_app`,
`args` = a `ReplicaConfig` dict) and `bind_app(config, options)` (the same with deployment
options, for in-process launchers) are the only places that call `serve.deployment`. The replica
speaks the wire protocol of `replicas.wire` over Ray Serve HTTP (`/generate`, `/health`,
`/info`, `/stats`, `/engine`): it turns text or chat messages into token ids, runs the
`AsyncEngine`, and streams NDJSON `GenerateChunk`s with text deltas. Errors before the stream
are `ErrorBody` JSON with 400 / 404 / 429 status; after it, a last chunk with `error`. A client
that goes away cancels the handler, which aborts the engine request and frees its KV slot.
Non-goals: the OpenAI API (the gateway), choosing modes (the policy).
"""

from __future__ import annotations

import json
import time
import uuid

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from .config import ReplicaConfig
from .text import ChatTemplateError, Detokenizer, TextCodec
from .wire import EngineSettings, ErrorBody, ErrorInfo, GenerateChunk, GenerateRequest, ReplicaInfo, Usage

WIRE_TO_FIELD = {"max_new_tokens": "max_tokens"}  # engine field names that differ on the wire


def error(status: int, message: str, type_: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    body = ErrorBody(error=ErrorInfo(message=message, type=type_, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


def param_of(message: str) -> str | None:
    """`ValueError`s from the engine start with the field name: 'max_new_tokens: ...'."""
    head = message.split(":", 1)[0].strip()
    return WIRE_TO_FIELD.get(head, head) if head.isidentifier() else None


class NLDReplica:
    def __init__(self, config: dict) -> None:
        import torch  # noqa: PLC0415 - the engine and torch load in the replica process only

        from .engine import AsyncEngine, EngineOverloaded
        from .metrics import ReplicaMetrics

        self.config = ReplicaConfig.model_validate(config)
        cfg = self.config
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        lora = False if not cfg.use_lora else (cfg.lora_path or None)
        self.engine = AsyncEngine.from_pretrained(cfg.model_path, cfg.engine_config(), lora=lora)
        self.overloaded = EngineOverloaded
        self.codec = TextCodec.from_dir(cfg.model_path)
        core = self.engine.core
        self.max_block = core.engine.max_block_length
        self.max_prompt = cfg.max_prompt_tokens or cfg.engine.max_seq_len - self.max_block - 1
        self.downgraded = False  # running self_spec requests continue in ar (policy: loaded)
        self.settings_since: float | None = None  # `since` of the engine settings applied last
        self.metrics = ReplicaMetrics(cfg.model_name)
        self.metrics.start(self.engine.stats)
        self.routes = {
            ("GET", "/health"): self.health,
            ("GET", "/info"): self.info,
            ("GET", "/stats"): self.stats,
            ("POST", "/generate"): self.generate,
            ("POST", "/engine"): self.update_engine,
        }

    async def __call__(self, request: Request) -> Response:
        path = request.url.path
        root = request.scope.get("root_path", "")
        if root and path.startswith(root):  # an application under a route prefix
            path = path[len(root):]
        path = "/" + path.strip("/")
        handler = self.routes.get((request.method, path))
        if handler is None:
            return error(404, f"no route {request.method} {path}", "not_found_error")
        return await handler(request)

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def info(self, request: Request) -> Response:
        m = self.engine.model_config
        core = self.engine.core
        return JSONResponse(ReplicaInfo(
            model=self.config.model_name, vocab_size=m.vocab_size, max_seq_len=self.config.engine.max_seq_len,
            max_prompt_tokens=self.max_prompt, block_size=m.block_size, max_block_length=self.max_block,
            has_draft_lora=core.engine.has_lora, eos_token_ids=list(m.eos_token_ids),
            device=self.config.device, dtype=self.config.dtype,
        ).model_dump())

    async def stats(self, request: Request) -> Response:
        return JSONResponse({**self.engine.stats(), "downgraded": self.downgraded})

    async def update_engine(self, request: Request) -> Response:
        try:
            settings = EngineSettings.model_validate_json(await request.body())
        except ValidationError as e:
            return validation_error(e)
        moved = self.apply_settings(settings)
        tiers = [vars(t) for t in self.engine.config.draft_tiers]
        return JSONResponse({"draft_tiers": tiers, "moved": moved, "downgraded": self.downgraded,
                             "since": self.settings_since})

    def apply_settings(self, settings: EngineSettings) -> list[str]:
        """Apply what differs from the current settings, unless they are older than the settings
        applied last (`since`); returns the requests moved between modes."""
        from .engine import DraftTier

        if settings.since is not None:
            if self.settings_since is not None and settings.since < self.settings_since:
                return []  # decided before a newer switch (e.g. a request overtaken by a push)
            self.settings_since = settings.since
        if settings.draft_tiers is not None:
            tiers = tuple(DraftTier(t.max_running, t.block_length) for t in settings.draft_tiers)
            if tiers != self.engine.config.draft_tiers:
                self.engine.update_draft_tiers(tiers)
        moved: list[str] = []
        if settings.downgrade_self_spec is not None and settings.downgrade_self_spec != self.downgraded:
            self.downgraded = settings.downgrade_self_spec
            moved = self.engine.downgrade_self_spec(self.downgraded)
        return moved

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

    async def generate(self, request: Request) -> Response:
        from .engine import DecodeParams, EngineError

        t0 = time.perf_counter()
        try:
            req = GenerateRequest.model_validate_json(await request.body())
        except ValidationError as e:
            return validation_error(e)
        if req.engine is not None:
            self.apply_settings(req.engine)
        try:
            ids = self.prompt_ids(req)
            if len(ids) > self.max_prompt:
                return error(400, f"the prompt has {len(ids)} tokens; this model accepts at most {self.max_prompt}",
                             "invalid_request_error", "messages" if req.messages else "prompt",
                             "context_length_exceeded")
            params = DecodeParams(
                mode=req.mode, max_new_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p,
                top_k=req.top_k, seed=req.seed, stop_token_ids=tuple(req.stop_token_ids), ignore_eos=req.ignore_eos,
                block_length=req.block_length, threshold=0.9 if req.threshold is None else req.threshold,
                draft_lora=req.draft_lora,
            )
            rid = req.request_id or uuid.uuid4().hex
            # coalesce: each chunk is one object through Ray Serve's stream, a cost per chunk
            # that AR (one token per step) would otherwise pay per token
            stream = self.engine.stream(ids, params, request_id=rid, coalesce=True)
            first = await anext(stream)  # submits: request errors surface here, before any byte
        except ChatTemplateError as e:
            return error(400, str(e), "invalid_request_error", "messages")
        except ValueError as e:
            return error(400, str(e), "invalid_request_error", param_of(str(e)))
        except self.overloaded as e:
            return error(429, str(e), "overloaded_error", code="engine_overloaded")
        except EngineError as e:
            return error(503, str(e), "server_error", code="engine_error")
        self.metrics.observe_first_token(req.mode, time.perf_counter() - t0)
        body = self.ndjson(rid, req, len(ids), first, stream)
        return StreamingResponse(body, media_type="application/x-ndjson")

    async def ndjson(self, rid: str, req: GenerateRequest, prompt_tokens: int, first, stream):
        from .engine import EngineError

        detok = Detokenizer(self.codec, stop=list(req.stop))
        tokens = 0
        last = time.perf_counter()
        chunk = first
        try:
            while True:
                tokens += len(chunk.token_ids)
                final = chunk.finish_reason is not None
                text = detok.push(chunk.token_ids, final=final)
                now = time.perf_counter()
                if chunk is not first and chunk.token_ids:
                    self.metrics.observe_inter_token(req.mode, (now - last) / len(chunk.token_ids))
                last = now
                reason = "stop" if detok.stopped else chunk.finish_reason
                out = GenerateChunk(request_id=rid, mode=chunk.mode or req.mode, token_ids=chunk.token_ids,
                                    text=text, finish_reason=reason, forward_passes=chunk.forward_passes)
                if reason is not None:
                    out.usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=tokens,
                                      forward_passes=chunk.forward_passes,
                                      tokens_per_forward=tokens / max(chunk.forward_passes, 1))
                    accepted = (chunk.stats or {}).get("accepted_lengths", [])
                    out.accepted_lengths = accepted or None
                    self.metrics.observe_request(out.mode, reason, out.usage.tokens_per_forward, accepted)
                    yield out.model_dump_json(exclude_none=True) + "\n"
                    return
                yield out.model_dump_json(exclude_none=True) + "\n"
                chunk = await anext(stream)
        except EngineError as e:
            err = ErrorInfo(message=str(e), type="server_error", code="engine_error")
            self.metrics.observe_request(req.mode, "error", None, [])
            yield GenerateChunk(request_id=rid, mode=req.mode, finish_reason="error",
                                error=err).model_dump_json(exclude_none=True) + "\n"
        finally:
            await stream.aclose()  # aborts the engine request if it is still running


def validation_error(e: ValidationError) -> JSONResponse:
    first = e.errors()[0]
    loc = ".".join(str(x) for x in first.get("loc", ())) or None
    return error(400, f"{loc}: {first.get('msg')}" if loc else str(first.get("msg")), "invalid_request_error", loc)


def build_app(args: dict | ReplicaConfig):
    """Serve application builder (`import_path: replicas.app:build_app`; Serve passes `args`).

    A Serve config file's `deployments:` entry for NLDReplica sets autoscaling_config and
    ray_actor_options on top of what `bind_app` chooses."""
    return bind_app(args)


def bind_app(args: dict | ReplicaConfig, options: dict | None = None):
    """Validate the config and bind one `NLDReplica` deployment with `serve.deployment` options."""
    from ray import serve

    config = args if isinstance(args, ReplicaConfig) else ReplicaConfig.model_validate(args or {})
    # The engine batches and queues; Serve must pass it more than it can hold (Serve's default is
    # 5) so that the engine, not Serve's router, decides overload and answers 429.
    capacity = config.engine.max_batch_size + config.engine.max_waiting
    opts = {"max_ongoing_requests": 2 * capacity + 8, **(options or {})}
    deployment = serve.deployment(name="NLDReplica", **opts)(NLDReplica)
    return deployment.bind(config.model_dump())
