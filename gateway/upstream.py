"""A lean HTTP/1.1 client for one upstream origin (the Ray Serve HTTP proxy), on asyncio streams.

Why not httpx: on the gateway's hot path (one POST /generate per choice, NDJSON back) httpx
0.28 costs ~700-860 us of CPU per request on loopback, this client ~60-75 us; the gateway's
1,000 requests/s per core target needs the difference (see docs/GATEWAY.md, Performance).

Contract: `UpstreamPool(base_url).request(method, path, body, headers, timeout)` sends one
request on a kept-alive connection (a fresh one if none is idle) and returns an
`UpstreamResponse` once the status line and headers arrived. A reused connection that turns
out dead before any response byte (the server closed it while idle) is replaced once,
transparently. Failures raise `UpstreamConnectionError` (connect failure, reset, EOF: no
response from this connection) or `UpstreamTimeout`; a malformed response raises
`UpstreamConnectionError` too. `UpstreamResponse.lines()` yields body lines (Content-Length,
chunked, or until close), `chunks()` the body's bytes as they arrive; `read()` the whole
body. `aclose()` returns a fully read connection to the pool, and aborts (TCP reset) one whose
body was not fully read, so the server sees the client go away at once. Non-goals: HTTP/2,
redirects, proxies, cookies, compression, request bodies other than bytes.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

MAX_HEAD = 1 << 16


class UpstreamConnectionError(Exception):
    """No (complete) response from the connection: refused, reset, closed, malformed."""


class UpstreamTimeout(Exception):
    """The upstream did not answer in time."""


class _Conn:
    __slots__ = ("reader", "writer", "idle_since")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.idle_since = 0.0

    def usable(self, now: float, expiry_s: float) -> bool:
        return not self.writer.is_closing() and not self.reader.at_eof() and now - self.idle_since < expiry_s

    def abort(self) -> None:
        transport = self.writer.transport
        if transport is not None and not transport.is_closing():
            transport.abort()


class UpstreamResponse:
    def __init__(self, pool: "UpstreamPool", conn: _Conn, status: int, headers: dict[str, str], method: str) -> None:
        self.status, self.headers = status, headers
        self._pool, self._conn = pool, conn
        te, cl = headers.get("transfer-encoding", "").lower(), headers.get("content-length")
        self._chunked = "chunked" in te
        self._length = None if self._chunked or cl is None else int(cl)
        self._until_close = not self._chunked and self._length is None
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            self._chunked, self._length, self._until_close = False, 0, False
        self._keep_alive = headers.get("connection", "").lower() != "close" and not self._until_close
        self._complete = False
        self._closed = False

    async def chunks(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive (the chunked framing removed)."""
        reader = self._conn.reader
        try:
            if self._chunked:
                while True:
                    size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0].strip(), 16)
                    if size == 0:
                        while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                            pass
                        break
                    data = await reader.readexactly(size + 2)
                    yield data[:-2]
            elif self._length is not None:
                left = self._length
                while left:
                    data = await reader.read(min(left, 1 << 16))
                    if not data:
                        raise asyncio.IncompleteReadError(b"", left)
                    left -= len(data)
                    yield data
            else:
                while data := await reader.read(1 << 16):
                    yield data
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, OSError, ValueError) as e:
            raise UpstreamConnectionError(f"upstream connection lost mid-body ({type(e).__name__})") from e
        self._complete = True

    async def lines(self) -> AsyncIterator[bytes]:
        """Body lines without the trailing newline (the last one may lack it)."""
        buf = b""
        async for data in self.chunks():
            buf += data
            while (i := buf.find(b"\n")) >= 0:
                yield buf[:i]
                buf = buf[i + 1:]
        if buf:
            yield buf

    async def read(self) -> bytes:
        return b"".join([d async for d in self.chunks()])

    def abort(self) -> None:
        """Reset the connection now: a pending read fails (the caller's timeout watchdog)."""
        self._conn.abort()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._complete and self._keep_alive:
            self._pool._release(self._conn)
        else:
            self._conn.abort()


class UpstreamPool:
    def __init__(self, base_url: str, *, connect_timeout_s: float = 5.0, max_idle: int = 256,
                 idle_expiry_s: float = 4.0) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"upstream URL must be http(s)://host[:port][/prefix], got {base_url!r}")
        self.host = url.hostname
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.prefix = url.path.rstrip("/")
        self._ssl = ssl.create_default_context() if url.scheme == "https" else None
        default_port = (url.scheme == "https" and self.port == 443) or (url.scheme == "http" and self.port == 80)
        self._host_header = (url.hostname if default_port else f"{url.hostname}:{self.port}").encode()
        self._connect_timeout_s = connect_timeout_s
        self._max_idle = max_idle
        self._idle_expiry_s = idle_expiry_s  # below the servers' keep-alive timeout (uvicorn: 5 s)
        self._idle: list[_Conn] = []
        self._closed = False

    async def _connect(self) -> _Conn:
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                reader, writer = await asyncio.open_connection(self.host, self.port, ssl=self._ssl, limit=MAX_HEAD)
        except TimeoutError as e:
            raise UpstreamConnectionError(f"connect to {self.host}:{self.port} timed out") from e
        except OSError as e:
            raise UpstreamConnectionError(f"connect to {self.host}:{self.port} failed ({type(e).__name__})") from e
        return _Conn(reader, writer)

    def _take_idle(self) -> _Conn | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if conn.usable(now, self._idle_expiry_s):
                return conn
            conn.abort()
        return None

    def _release(self, conn: _Conn) -> None:
        if self._closed or len(self._idle) >= self._max_idle or conn.writer.is_closing():
            conn.abort()
            return
        conn.idle_since = time.monotonic()
        self._idle.append(conn)

    async def request(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
                      timeout: float | None = None, absolute: bool = False) -> UpstreamResponse:
        """`path` under the base URL's prefix; `absolute`: as it is (the origin's own routes)."""
        target = path if absolute else self.prefix + path
        head = [f"{method} {target} HTTP/1.1".encode(), b"Host: " + self._host_header]
        head += [f"{k}: {v}".encode("latin-1") for k, v in (headers or {}).items()]
        if body or method in ("POST", "PUT", "PATCH"):
            head.append(b"Content-Length: %d" % len(body))
        raw = b"\r\n".join(head) + b"\r\n\r\n" + body
        conn = self._take_idle()
        if conn is not None:
            try:
                return await self._exchange(conn, raw, method, timeout)
            except UpstreamConnectionError:
                pass  # the server closed it while idle: once more on a fresh connection
        return await self._exchange(await self._connect(), raw, method, timeout)

    async def _exchange(self, conn: _Conn, raw: bytes, method: str, timeout: float | None) -> UpstreamResponse:
        try:
            async with asyncio.timeout(timeout):
                conn.writer.write(raw)
                await conn.writer.drain()
                while True:
                    head = await conn.reader.readuntil(b"\r\n\r\n")
                    status, headers = _parse_head(head)
                    if status >= 200 or status == 101:
                        break  # skip interim 1xx responses
                response = UpstreamResponse(self, conn, status, headers, method)
        except TimeoutError as e:
            conn.abort()
            raise UpstreamTimeout("no response headers in time") from e
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, OSError, ValueError) as e:
            conn.abort()
            raise UpstreamConnectionError(f"no response from upstream ({type(e).__name__})") from e
        except BaseException:
            conn.abort()
            raise
        return response

    async def aclose(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop().abort()


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise ValueError("malformed status line")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            raise ValueError("malformed header line")
        headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    return int(parts[1]), headers
