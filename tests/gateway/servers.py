"""Test helpers: an httpx client over ASGI, a uvicorn server on a loopback port in a thread,
raw ASGI calls with a scripted disconnect, and SSE parsing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time

import httpx
import uvicorn


def asgi_client(app, **kw) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gateway", **kw)


@contextlib.contextmanager
def serve_in_thread(app):
    """Run `app` with uvicorn on 127.0.0.1:<free port>; yields the base URL."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def sse_events(text: str) -> list:
    """`data:` payloads of an SSE body, JSON-decoded except the literal [DONE]."""
    out = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


async def call_with_disconnect(app, path: str, body: dict, disconnect_after_bodies: int,
                               timeout: float = 5.0) -> list[dict]:
    """POST `body` to `app` over raw ASGI; the client disconnects after it got
    `disconnect_after_bodies` body messages (0: before any). Returns the messages sent."""
    raw = json.dumps(body).encode()
    sent: list[dict] = []
    got_bodies = asyncio.Event() if disconnect_after_bodies else None
    body_given = False

    async def receive():
        nonlocal body_given
        if not body_given:
            body_given = True
            return {"type": "http.request", "body": raw, "more_body": False}
        if got_bodies is not None:
            await got_bodies.wait()
        else:
            await asyncio.sleep(0.05)
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)
        if got_bodies is not None and message["type"] == "http.response.body":
            if sum(1 for m in sent if m["type"] == "http.response.body") >= disconnect_after_bodies:
                got_bodies.set()

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": [(b"content-type", b"application/json"),
                                          (b"content-length", str(len(raw)).encode())],
             "client": ("127.0.0.1", 1), "server": ("gateway", 80), "state": {}}
    await asyncio.wait_for(app(scope, receive, send), timeout)
    return sent
