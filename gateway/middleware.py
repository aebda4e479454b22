"""The gateway's front door, a pure ASGI middleware: API-key check and request-body limit.

Contract: for HTTP requests, in this order: (1) on `/v1/*` paths, when auth is enabled, a
missing or wrong `Authorization: Bearer <key>` gets 401 before the body is read; (2) a body
larger than `config.max_body_bytes` gets 413, from `Content-Length` alone when present,
otherwise while reading (the body is buffered up to the limit and replayed to the app, whose
later `receive()` calls still see `http.disconnect`). Both answers use the OpenAI envelope and
count in `nld_gateway_requests_total{mode="none"}` for completion paths. Health, readiness and
metrics endpoints stay open. Non-goals: rate limiting per key, CORS.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .auth import ApiKeyAuth
from .config import GatewayConfig
from .errors import COMPLETION_PATHS, GatewayError, error_response
from .metrics import GatewayMetrics


class FrontDoor:
    def __init__(self, app: ASGIApp, config: GatewayConfig, auth: ApiKeyAuth | None, metrics: GatewayMetrics) -> None:
        self.app = app
        self.limit = config.max_body_bytes
        self.auth = auth
        self.metrics = metrics

    async def _reject(self, scope: Scope, receive: Receive, send: Send, err: GatewayError,
                      headers: dict[str, str] | None = None) -> None:
        if scope["path"] in COMPLETION_PATHS:
            self.metrics.finished(None, err.status)
        await error_response(err, headers)(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        content_length = None
        authorization = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
            elif name == b"content-length":
                content_length = value
        if self.auth is not None and scope["path"].startswith("/v1/") and not self.auth.check(authorization):
            msg = "missing API key (Authorization: Bearer ...)" if not authorization else "invalid API key"
            await self._reject(scope, receive, send, GatewayError(401, msg), {"www-authenticate": "Bearer"})
            return
        if content_length is not None:
            try:
                n = int(content_length)
            except ValueError:
                await self._reject(scope, receive, send, GatewayError(400, "invalid Content-Length header"))
                return
            if n > self.limit:
                await self._reject(scope, receive, send, self._too_large())
                return
        if scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left while uploading
            body = message.get("body", b"")
            size += len(body)
            if size > self.limit:
                await self._reject(scope, receive, send, self._too_large())
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _too_large(self) -> GatewayError:
        return GatewayError(413, f"request body exceeds {self.limit} bytes", code="request_too_large")
