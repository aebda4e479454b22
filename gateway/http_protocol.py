"""uvicorn's HTTP protocol with the OpenAI error envelope on the answers uvicorn gives itself.

uvicorn answers two kinds of request without the ASGI app: one its HTTP parser rejects (a
malformed `Content-Length`, request line or header, a body that does not match its framing)
gets `400 Invalid HTTP request received.` as plain text, and a request whose app fails before
it starts a response gets `500 Internal Server Error` as plain text. `EnvelopeHttpToolsProtocol`
and `EnvelopeH11Protocol` subclass uvicorn's two HTTP/1.1 implementations and send both as
`{"error": {...}}` JSON instead (`invalid_http_request`, `internal_error`); everything else is
uvicorn's. `HTTP_PROTOCOL` is the one uvicorn would pick itself (httptools when installed), to
pass as `uvicorn.Config(http=...)`; `nld-gateway serve` and `up` use it. The connection is
closed after a 400, as uvicorn does: the request's framing cannot be trusted. Such a request
never reaches the app, so it is not counted in the gateway's metrics (uvicorn logs a warning).
Non-goals: `limit_concurrency`'s 503 (the gateway does not set it; `max_inflight_requests`
answers 429 with the envelope instead), HTTP/2.
"""

from __future__ import annotations

import asyncio
import json

from uvicorn.protocols.http.h11_impl import H11Protocol

from .errors import GatewayError

BAD_REQUEST = GatewayError(400, "invalid HTTP request: it could not be parsed (request line, a header such as "
                           "Content-Length, or the body's framing)", code="invalid_http_request")
SERVER_ERROR = GatewayError(500, "internal gateway error", code="internal_error")


def _json(err: GatewayError) -> bytes:
    return json.dumps(err.body()).encode()


def _raw_400(protocol) -> None:
    """Write the 400 envelope straight to the transport and close it (both implementations)."""
    body = _json(BAD_REQUEST)
    head = [b"HTTP/1.1 400 Bad Request\r\n"]
    for name, value in protocol.server_state.default_headers:
        head += [name, b": ", value, b"\r\n"]
    head += [b"content-type: application/json\r\n", b"content-length: %d\r\n" % len(body),
             b"connection: close\r\n\r\n"]
    protocol.transport.write(b"".join(head) + body)
    protocol.transport.close()


async def _send_500(cycle) -> None:
    body = _json(SERVER_ERROR)
    await cycle.send({"type": "http.response.start", "status": 500,
                      "headers": [(b"content-type", b"application/json"),
                                  (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
    await cycle.send({"type": "http.response.body", "body": body, "more_body": False})


class EnvelopeH11Protocol(H11Protocol):
    def send_400_response(self, msg: str) -> None:
        _raw_400(self)

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None:
            _patch_cycle(self.cycle)


def _patch_cycle(cycle) -> None:
    """The request cycle's 500: uvicorn builds one cycle object per request."""
    if not getattr(cycle, "_nld_envelope", False):
        cycle.send_500_response = lambda: _send_500(cycle)
        cycle._nld_envelope = True


try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools not installed: uvicorn would use h11
    HTTP_PROTOCOL: type[asyncio.Protocol] = EnvelopeH11Protocol
else:
    class EnvelopeHttpToolsProtocol(HttpToolsProtocol):
        def send_400_response(self, msg: str) -> None:
            _raw_400(self)

        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            if self.cycle is not None:
                _patch_cycle(self.cycle)

    HTTP_PROTOCOL = EnvelopeHttpToolsProtocol
