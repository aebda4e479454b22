"""A loopback metrics page for the policy tests (a real HTTP server, not a mock transport)."""

from __future__ import annotations

import asyncio


class MetricsPage:
    """A loopback HTTP server answering every GET with `self.text`; counts requests."""

    def __init__(self, text: str) -> None:
        self.text, self.hits = text, 0

    async def __aenter__(self) -> "MetricsPage":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()

    async def _serve(self, reader, writer) -> None:
        await reader.readuntil(b"\r\n\r\n")
        self.hits += 1
        body = self.text.encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()
