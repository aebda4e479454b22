"""`create_app(config, replica_client, policy)`: the gateway's FastAPI application.

Contract: every collaborator is injected: the typed `GatewayConfig`, a `ReplicaClient`
(`HttpReplicaClient` in production, a fake in tests; the app closes it on shutdown), a
`policies.ModePolicy`, and optionally the `GatewayMetrics` (whose `InflightCounter` a policy
may read; `app.state.inflight`). Endpoints: `GET /v1/models[/{id}]`, `POST /v1/completions`,
`POST /v1/chat/completions` (JSON or SSE), `GET /v1/nld/policy`, `GET /health` (liveness),
`GET /ready` (a replica answers), `GET /metrics` (Prometheus; left out with
`metrics_route=False` when `gateway.listeners` serves it on its own port). `app.state.auth` is
the `ApiKeyAuth` the front door checks (None with auth off), for key rotation. Every completion response
carries `x-nld-decoding-mode` (the mode used), `x-nld-mode-reason` and `x-request-id`; every
error is an OpenAI envelope. A completion request's deadline is `config.request_timeout_s`
(504 before the first byte); a client disconnect at any point aborts its upstream requests.
Non-goals: process management (see `gateway.cli`), the policy's own signals.
"""

from __future__ import annotations

import asyncio
import signal
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from starlette.responses import Response

from policies import ModePolicy

from .auth import ApiKeyAuth
from .config import GatewayConfig
from .engine_push import EngineSettingsPusher
from .errors import GatewayError, install_error_handlers
from .metrics import GatewayMetrics, InflightCounter
from .middleware import FrontDoor
from .openai_api import (SCHEMA_OVERRIDES, ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
                         CompletionResponse, ErrorResponse, ModelCard, ModelList)
from .replica_client import ReplicaClient
from .completion import CompletionHandler
from .service import CompletionService

ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 404, 413, 429, 500, 503, 504)}
MODE_HEADERS = {
    "x-nld-decoding-mode": {"description": "decoding mode used: ar, diffusion or self_spec", "schema": {"type": "string"}},
    "x-nld-mode-reason": {"description": "why: client, policy:<why>, override:<how>", "schema": {"type": "string"}},
    "x-request-id": {"description": "the completion id", "schema": {"type": "string"}},
}


def _completion_doc(model: type) -> dict:
    # One server-sent event. OpenAPI 3.2 would put it under `itemSchema`, which a 3.1 document may
    # not use; under 3.1's `schema`, event-stream tools (schemathesis among them) read it per event.
    event = {"type": "object", "required": ["data"], "properties": {"data": {
        "type": "string", "description": "a JSON chunk, a final JSON {\"error\": ...}, or the literal [DONE]"}}}
    return {200: {"model": model, "headers": MODE_HEADERS, "description": "JSON, or with stream=true server-sent events",
                  "content": {"text/event-stream": {"schema": event}}}, **ERRORS}


async def watch_policy(policy: ModePolicy, interval_s: float) -> None:
    """Re-read the policy's file when it changes (a bad file keeps the old policy; a policy
    without a file does nothing)."""
    while True:
        await asyncio.sleep(interval_s)
        policy.reload()


def create_app(config: GatewayConfig, replica_client: ReplicaClient, policy: ModePolicy, *,
               metrics: GatewayMetrics | None = None, reload_interval_s: float = 1.0,
               engine_push_interval_s: float = 0.1, metrics_route: bool = True) -> FastAPI:
    metrics = metrics or GatewayMetrics(InflightCounter())
    inflight = metrics.inflight
    service = CompletionService(config, replica_client, policy)
    handler = CompletionHandler(config, service, metrics)
    started = int(time.time())
    # the policy's engine settings (None while it has none) are pushed to the replicas when they change
    pusher = EngineSettingsPusher(service.engine_settings, replica_client, interval_s=engine_push_interval_s,
                                  on_push=metrics.engine_pushed)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        # a policy with signals polls them in the background; a policy file is watched for changes
        policy.start()
        watcher = asyncio.create_task(watch_policy(policy, reload_interval_s))
        try:  # SIGHUP reloads at once (only possible in the main thread)
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, lambda: policy.reload(force=True))
        except (ValueError, RuntimeError, NotImplementedError):
            pass
        pusher.start()
        yield
        watcher.cancel()
        await pusher.stop()
        await policy.stop()
        await replica_client.aclose()

    app = FastAPI(title="nld-gateway", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible front door of nld-gateway (see docs/GATEWAY.md)")
    app.state.config, app.state.metrics, app.state.inflight, app.state.policy = config, metrics, inflight, policy
    install_error_handlers(app, metrics)
    auth = ApiKeyAuth(config.api_keys) if config.auth_enabled else None
    app.state.auth = auth
    app.add_middleware(FrontDoor, config=config, auth=auth, metrics=metrics)

    @app.post("/v1/completions", response_model=None, responses=_completion_doc(CompletionResponse),
              summary="Text completion (OpenAI); stream=true for SSE")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await handler.handle(body, chat=False, receive=request.receive)

    @app.post("/v1/chat/completions", response_model=None, responses=_completion_doc(ChatCompletionResponse),
              summary="Chat completion (OpenAI); the replica applies the checkpoint's chat template")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await handler.handle(body, chat=True, receive=request.receive)

    def card() -> dict:
        return {"id": config.model_name, "object": "model", "created": started, "owned_by": "nld-gateway"}

    @app.get("/v1/models", response_model=ModelList, responses={401: ERRORS[401]})
    async def models() -> dict:
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses={401: ERRORS[401], 404: ERRORS[404]})
    async def model(model_id: str) -> dict:
        if model_id != config.model_name:
            raise GatewayError(404, f"model {model_id!r} does not exist", type="invalid_request_error",
                               param="model", code="model_not_found")
        return card()

    @app.get("/v1/nld/policy", responses={401: ERRORS[401]}, summary="The mode policy's state")
    async def policy_state() -> dict:
        return {**policy.snapshot(), "gateway_inflight": inflight.value}

    @app.get("/health", summary="Liveness: the gateway process answers")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready", responses={503: ERRORS[503]}, summary="Readiness: a replica answers")
    async def ready() -> dict:
        try:
            ok = await asyncio.wait_for(replica_client.health(), config.ready_timeout_s)
        except (TimeoutError, Exception):
            ok = False
        if not ok:
            raise GatewayError(503, "no replica answers", retry_after=config.retry_after_s)
        return {"status": "ready"}

    if metrics_route:
        @app.get("/metrics", response_class=Response, summary="Prometheus metrics",
                 responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
        async def prometheus() -> Response:
            return Response(metrics.render(), media_type=metrics.content_type)

    app.openapi = lambda: _openapi(app, config)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI, config: GatewayConfig) -> dict:
    """FastAPI's schema, with 400 instead of 422 and the limits that come from the config."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    for path, ops in schema["paths"].items():
        for op in ops.values():
            op["responses"].pop("422", None)
            if config.auth_enabled and path.startswith("/v1/"):
                op["security"] = [{"bearer": []}]
    comps = schema.setdefault("components", {})
    schemas = comps.setdefault("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    if config.auth_enabled:
        comps["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for name, overrides in SCHEMA_OVERRIDES.items():
        targets = ("CompletionRequest", "ChatCompletionRequest") if name == "_common" else (name,)
        for target in targets:
            props = schemas[target]["properties"]
            for key, sub in overrides.items():
                props[key] = {**sub, **{k: props[key][k] for k in ("description", "title") if k in props[key]}}
    schemas["ContentPart"]["required"] = ["type", "text"]
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        props = schemas[name]["properties"]
        props["n"]["maximum"] = config.max_n
        props["model"]["examples"] = [config.model_name]
        for key in ("max_tokens", "max_completion_tokens"):
            _limit(props[key], "maximum", config.max_tokens_limit)
        _limit(props["stop"], "maxItems", config.max_stop)
    for branch in schemas["CompletionRequest"]["properties"]["prompt"].get("anyOf", []):
        if branch.get("type") == "array":
            branch["maxItems"] = config.max_prompts if branch["items"].get("type") != "integer" else branch.get("maxItems")
            if branch["maxItems"] is None:
                del branch["maxItems"]
    app.openapi_schema = schema
    return schema


def _limit(prop: dict, key: str, value: int) -> None:
    for branch in prop.get("anyOf", [prop]):
        if branch.get("type") in ("integer", "array"):
            branch[key] = value
