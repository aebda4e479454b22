"""A replica's stream channels: the events of many streamed requests, one write per engine step.

Contract (the wire is `replicas.channel_wire`):
- `ChannelRegistry.open()` makes a `Channel` with a fresh id; `get(id)` finds an open one.
- `Channel.frames()` is the body of the `GET /channel` answer: record 0 (the id), then, each
  time the event loop gets to it, every record put since its last write, joined into ONE
  write. The engine delivers a step's output to all requests in one loop callback, and their
  handlers put their events before the channel's writer runs, so a step costs one write.
  When the answer ends (the gateway closed the channel, or Serve stops the replica), the
  channel closes and leaves the registry.
- `Channel.put(stream, line)` queues one record; False once the channel is closed (the
  caller, a bound request, then stops and aborts its engine request).
- `bind(lines, channel, stream)` is a bound request's own answer: it yields the first line of
  `lines` (the request's first `GenerateChunk`), puts every later line on the channel, and ends
  with the request; closing it (the gateway closed the request) closes `lines` (engine abort).
Non-goals: rendering the lines (`replicas.generation`), HTTP routing (`replicas.app`).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

from .channel_wire import encode_record


class Channel:
    __slots__ = ("channel_id", "closed", "_pending", "_ready", "_registry")

    def __init__(self, channel_id: str, registry: "ChannelRegistry") -> None:
        self.channel_id = channel_id
        self.closed = False
        self._pending: list[bytes] = []
        self._ready = asyncio.Event()
        self._registry = registry

    def put(self, stream: int, line: bytes) -> bool:
        if self.closed:
            return False
        self._pending.append(encode_record(stream, line))
        self._ready.set()
        return True

    async def frames(self) -> AsyncIterator[bytes]:
        try:
            yield encode_record(0, self.channel_id.encode())
            while True:
                await self._ready.wait()
                self._ready.clear()
                if self._pending:
                    data = b"".join(self._pending)
                    self._pending.clear()
                    yield data
        finally:
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._pending.clear()
            self._registry.forget(self.channel_id)


class ChannelRegistry:
    def __init__(self) -> None:
        self._channels: dict[str, Channel] = {}

    def __len__(self) -> int:
        return len(self._channels)

    def open(self) -> Channel:
        channel = Channel(uuid.uuid4().hex, self)
        self._channels[channel.channel_id] = channel
        return channel

    def get(self, channel_id: str) -> Channel | None:
        return self._channels.get(channel_id)

    def forget(self, channel_id: str) -> None:
        self._channels.pop(channel_id, None)


async def bind(lines: AsyncIterator[bytes], channel: Channel, stream: int) -> AsyncIterator[bytes]:
    try:
        yield await anext(lines)  # the first chunk, on the request's own answer
        async for line in lines:
            if not channel.put(stream, line):
                return  # the channel closed: nobody reads this request's events any more
    finally:
        await lines.aclose()  # aborts the engine request if it is still running
