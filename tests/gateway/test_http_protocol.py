"""What uvicorn answers by itself (a request its HTTP parser rejects, an app that fails before
its response starts) uses the OpenAI envelope too: checked over a raw socket against uvicorn
with the gateway's protocol, for both of uvicorn's HTTP/1.1 implementations."""

from __future__ import annotations

import json
import socket

import pytest

from gateway import GatewayConfig, create_app
from gateway.http_protocol import HTTP_PROTOCOL, EnvelopeH11Protocol
from tests.gateway.fakes import FakeReplicaClient
from policies import FixedModePolicy

from .servers import serve_in_thread

PROTOCOLS = [EnvelopeH11Protocol] + ([HTTP_PROTOCOL] if HTTP_PROTOCOL is not EnvelopeH11Protocol else [])
BODY = b'{"model": "nld", "prompt": "x", "max_tokens": 2}'


def exchange(url: str, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read until the server closes (or one response with a Content-Length)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(raw)
        data = b""
        while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < _length(data):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def _length(data: bytes) -> int:
    for line in data.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 1 << 30


def envelope(status: int, headers: dict, body: bytes, code: str) -> dict:
    assert headers["content-type"].startswith("application/json"), headers
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code
    return err


@pytest.fixture(params=PROTOCOLS, ids=lambda p: p.__name__)
def gateway_url(request):
    app = create_app(GatewayConfig(), FakeReplicaClient(), FixedModePolicy())
    with serve_in_thread(app, http=request.param) as url:
        yield url


@pytest.mark.parametrize("raw", [
    b"POST /v1/completions HTTP/1.1\r\nHost: g\r\nContent-Type: application/json\r\nContent-Length: abc\r\n\r\n" + BODY,
    b"POST /v1/completions HTTP/1.1\r\nHost: g\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\n" + BODY,
    b"POST /v1/completions HTTP/1.1\r\nHost: g\r\nContent-Length: -1\r\n\r\n" + BODY,
    b"GET /health HTTP/1.1\r\nHost: g\r\nBad Header Name: x\r\n\r\n",
    b"NOT-HTTP\r\n\r\n",
])
def test_a_request_the_parser_rejects_gets_the_envelope(gateway_url, raw):
    status, headers, body = exchange(gateway_url, raw)
    assert status == 400
    envelope(status, headers, body, "invalid_http_request")
    assert headers["connection"] == "close"
    # the server still serves
    ok = exchange(gateway_url, b"POST /v1/completions HTTP/1.1\r\nHost: g\r\nContent-Type: application/json\r\n"
                  b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY))
    assert ok[0] == 200 and json.loads(ok[2])["choices"]


@pytest.mark.parametrize("protocol", PROTOCOLS, ids=lambda p: p.__name__)
def test_an_app_failing_before_its_response_gets_the_envelope(protocol):
    async def broken(scope, receive, send):
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        raise RuntimeError("boom")

    with serve_in_thread(broken, http=protocol) as url:
        status, headers, body = exchange(url, b"GET /x HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n")
    assert status == 500
    assert "boom" not in envelope(status, headers, body, "internal_error")["message"]
