"""OpenAI error envelope: `{"error": {"message", "type", "param", "code"}}` for every failure.

Contract: `GatewayError` is the one exception the gateway raises for a client-visible failure;
`install_error_handlers(app, metrics)` turns it, FastAPI's validation errors (400, never 422;
code `invalid_json`, `invalid_body` or `invalid_value`), Starlette's HTTP errors (404 route,
405 method) and any unexpected exception (500) into the envelope, and counts the ones it
answers for a completion path in `nld_gateway_requests_total{mode="none"}` (a `GatewayError`
is counted where it is raised). `error_response` builds the JSON response outside FastAPI
(middleware, the HTTP protocol). Nothing here logs request bodies or headers. Non-goals:
retry logic.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request

from .metrics import GatewayMetrics
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

log = logging.getLogger("gateway")
COMPLETION_PATHS = ("/v1/completions", "/v1/chat/completions")  # what nld_gateway_requests_total counts

# status -> (type, default code); OpenAI's spelling where OpenAI has one.
ERROR_TYPES: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", "invalid_value"),
    401: ("authentication_error", "invalid_api_key"),
    404: ("not_found_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "overloaded"),
    500: ("server_error", "internal_error"),
    503: ("service_unavailable_error", "no_replica"),
    504: ("timeout_error", "upstream_timeout"),
}


class GatewayError(Exception):
    """A failure with an HTTP status, sent to the client in the OpenAI envelope."""

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        default_type, default_code = ERROR_TYPES.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
        self.status = status
        self.message = message
        self.type = type or default_type
        self.param = param
        self.code = code if code is not None else default_code
        self.retry_after = retry_after
        self.extra_headers: dict[str, str] = {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return self.extra_headers
        return {**self.extra_headers, "retry-after": str(max(0, int(round(self.retry_after))))}


def error_response(err: GatewayError, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(err.body()), status_code=err.status, media_type="application/json",
                    headers={**err.headers(), **(headers or {})})


def param_from_loc(loc: tuple | list) -> str | None:
    """("body", "messages", 0, "role") -> "messages[0].role"; None for the body itself."""
    parts = [p for p in loc if p != "body"]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out or None


def validation_error(exc: RequestValidationError) -> GatewayError:
    errors = exc.errors()
    if not errors:
        return GatewayError(400, "invalid request")
    first = errors[0]
    kind = first.get("type", "")
    if kind == "json_invalid":
        return GatewayError(400, "request body is not valid JSON", code="invalid_json")
    param = _param(first)
    if kind == "missing" and param is None:
        return GatewayError(400, "request body is required and must be a JSON object", code="invalid_body")
    # a union reports one error per member: prefer one about the value over "should be a valid <type>"
    same = [e for e in errors if _param(e) == param or (_param(e) or "").startswith(f"{param}[")]
    best = next((e for e in same if not e.get("type", "").endswith("_type")), first)
    param = _param(best)  # the element at fault, e.g. prompt[1] of a list of prompts
    msg = best.get("msg", "invalid value")
    return GatewayError(400, f"{param}: {msg}" if param else msg, param=param, code="invalid_value")


def _param(error: dict) -> str | None:
    # pydantic appends the union member's tag to the loc ("prompt", "list[str]", 0); drop those
    loc = [p for p in error.get("loc", ()) if not (isinstance(p, str) and (not p.isidentifier() or p in _UNION_TAGS))]
    return param_from_loc(loc)


_UNION_TAGS = {"str", "int", "list", "dict", "float", "bool", "none"}  # field names are never these


def install_error_handlers(app: FastAPI, metrics: GatewayMetrics) -> None:
    def counted(request: Request, err: GatewayError) -> GatewayError:
        if request.scope.get("path") in COMPLETION_PATHS:
            metrics.finished(None, err.status)
        return err

    @app.exception_handler(GatewayError)
    async def _gateway(_: Request, exc: GatewayError) -> Response:
        return error_response(exc)  # counted where it was raised (it may carry the mode)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        return error_response(counted(request, validation_error(exc)))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            err = GatewayError(404, "no such endpoint", code="unknown_url")
        elif exc.status_code == 405:
            err = GatewayError(405, "method not allowed")
        else:
            err = GatewayError(exc.status_code, str(exc.detail))
        return error_response(counted(request, err), headers=dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error")  # traceback only: no request data
        return error_response(counted(request, GatewayError(500, "internal gateway error")))
