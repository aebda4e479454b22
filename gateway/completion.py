"""`CompletionHandler`: one OpenAI completion request from validated body to HTTP response.

Contract: `CompletionHandler(config, service, metrics)`; `await handle(body, chat, receive)`
returns a starlette `Response` (JSON, or `SSEResponse` for `stream: true`) or raises a
`GatewayError` (the app's handlers turn it into the OpenAI envelope). It owns what the app used
to do inline: the in-flight limit (429), planning (via `CompletionService.plan`), the deadline
`config.request_timeout_s` (504 before the first byte), client disconnects at any point (`receive`
is the ASGI receive channel; a disconnect aborts the upstream requests and answers 499), the
in-flight count and the request metrics, and the `x-nld-decoding-mode` / `x-nld-mode-reason` /
`x-request-id` headers. A plain class: tests drive it with a fake `receive`, no FastAPI app.
Non-goals: routing, auth, the body's schema validation (FastAPI's, before this).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from starlette.responses import JSONResponse, Response
from starlette.types import Receive

from .config import GatewayConfig
from .errors import GatewayError
from .metrics import GatewayMetrics
from .openai_api import ChatCompletionRequest, CompletionRequest
from .plan import Plan
from .service import CompletionService
from .sse import ClientGone, SSEResponse, run_until_disconnect

log = logging.getLogger("gateway")


class CompletionHandler:
    def __init__(self, config: GatewayConfig, service: CompletionService, metrics: GatewayMetrics) -> None:
        self.config, self.service, self.metrics = config, service, metrics

    async def handle(self, body: CompletionRequest | ChatCompletionRequest, chat: bool, receive: Receive) -> Response:
        config, service, metrics = self.config, self.service, self.metrics
        inflight = metrics.inflight
        t0 = time.perf_counter()
        if config.max_inflight_requests is not None and inflight.value >= config.max_inflight_requests:
            metrics.finished(None, 429)
            raise GatewayError(429, "the gateway is at its in-flight request limit; retry later",
                               retry_after=config.retry_after_s)
        try:
            plan = service.plan(body, chat)
        except GatewayError as e:
            metrics.finished(None, e.status)
            raise
        inflight.enter()
        handed_off = False
        try:
            opened, result = await run_until_disconnect(self._run(plan, t0), receive)
            headers = {"x-nld-decoding-mode": opened.mode, "x-nld-mode-reason": plan.reason, "x-request-id": plan.id}
            if result is not None:
                metrics.finished(opened.mode, 200, time.perf_counter() - t0)
                return JSONResponse(result, headers=headers)

            async def on_close(disconnected: bool) -> None:
                await service.close(opened)
                inflight.exit()
                status = 499 if disconnected else opened.status
                metrics.finished(opened.mode, status, time.perf_counter() - t0)

            handed_off = True
            return SSEResponse(service.sse_events(plan, opened), on_close, headers)
        except ClientGone:
            metrics.finished(plan.mode, 499, time.perf_counter() - t0)
            return Response(status_code=499)
        except Exception as e:
            if isinstance(e, TimeoutError):
                err = GatewayError(504, f"no answer from the replicas within {config.request_timeout_s:g} s",
                                   code="upstream_timeout")
            elif isinstance(e, GatewayError):
                err = e
            else:
                log.exception("completion %s failed", plan.id)  # traceback only: no request data
                err = GatewayError(500, "internal gateway error")
            metrics.finished(plan.mode, err.status, time.perf_counter() - t0)
            # the mode was decided, though nothing ran in it
            err.extra_headers.update({"x-nld-decoding-mode": plan.mode, "x-request-id": plan.id})
            raise err from None
        finally:
            if not handed_off:
                inflight.exit()

    async def _run(self, plan: Plan, t0: float) -> tuple[Any, dict | None]:
        """Open the upstream generations (and, not streaming, collect them) within the deadline."""
        service = self.service
        async with asyncio.timeout(self.config.request_timeout_s):
            await service.check_context(plan)
            opened = await service.open(plan)
            self.metrics.first_token(opened.mode, time.perf_counter() - t0)
            if plan.stream:
                return opened, None
            try:
                return opened, await service.collect(plan, opened)
            finally:
                await service.close(opened)
