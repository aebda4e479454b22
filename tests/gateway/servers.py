"""Test helpers: an httpx client over ASGI, a uvicorn server on a loopback port in a thread,
raw ASGI calls with a scripted disconnect, and SSE parsing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from dataclasses import dataclass

import httpx
import uvicorn


def asgi_client(app, **kw) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gateway", **kw)


@contextlib.contextmanager
def serve_in_thread(app, http=None):
    """Run `app` with uvicorn on 127.0.0.1:<free port>; yields the base URL. The HTTP protocol is
    the gateway's (`gateway.http_protocol.HTTP_PROTOCOL`) unless `http` names another."""
    from gateway.http_protocol import HTTP_PROTOCOL

    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False, lifespan="on",
                            http=http or HTTP_PROTOCOL)
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


class ScriptedServer:
    """An asyncio TCP server on 127.0.0.1 that answers each HTTP request with `respond(request)`,
    an async function given a `Req` (method, path, headers, body, writer, connection number)."""

    def __init__(self, respond) -> None:
        self.respond = respond
        self.requests: list["Req"] = []
        self.connections = 0
        self.closed_early: list[int] = []  # connections the client closed while a response was due
        self.server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> "ScriptedServer":
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = self.connections
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head[:-4].decode().split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                req = Req(method, path, headers, body, reader, writer, conn)
                self.requests.append(req)
                if await self.respond(req) == "close":
                    writer.close()
                    return
        except (ConnectionError, OSError):
            self.closed_early.append(conn)
        finally:
            if not writer.is_closing():
                writer.close()


@dataclass
class Req:
    method: str
    path: str
    headers: dict
    body: bytes
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    conn: int

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def json_response(self, status: int, payload: dict | str, extra: str = "") -> None:
        body = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
        await self.send(f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n{extra}"
                        f"Content-Length: {len(body)}\r\n\r\n".encode() + body)

    async def start_chunked(self, status: int = 200) -> None:
        await self.send(f"HTTP/1.1 {status} OK\r\nContent-Type: application/x-ndjson\r\n"
                        f"Transfer-Encoding: chunked\r\n\r\n".encode())

    async def chunk(self, data: bytes) -> None:
        await self.send(b"%x\r\n%s\r\n" % (len(data), data))

    async def end_chunked(self) -> None:
        await self.send(b"0\r\n\r\n")

    async def wait_closed_by_client(self, timeout: float = 3.0) -> bool:
        """True when the client closed or reset the connection within `timeout`."""
        try:
            data = await asyncio.wait_for(self.reader.read(1), timeout)
        except (ConnectionError, OSError):
            return True
        except TimeoutError:
            return False
        return data == b""
