"""The gateway's end of a stream channel: one `GET /channel` per direct replica, demultiplexed.

Contract (the wire is `replicas.channel_wire`):
- `ReplicaChannel(pool).start()` opens the channel on the running loop; it is `ready` once the
  replica's record 0 (the channel id) arrived. `bind()` then returns the `ChannelInbox` its
  records go to, which names its channel and a stream number unique on it (None while not
  ready, or once closed). `unbind(stream)` (or the inbox's `unbind()`) drops a stream (its
  request ended or failed).
- Records for streams no longer bound are dropped. When the channel's answer ends or fails (a
  replica stopped or died, a malformed record), every bound inbox is `lose`d: its reader raises
  `UpstreamConnectionError`, which the stream turns into a last chunk with `replica_lost`.
- `idle_for(now)`: seconds since the last stream was unbound (0 while any is bound), so the
  owner (`gateway.direct`) closes channels nobody uses: an open channel is a request that Ray
  Serve counts on the replica and that its graceful shutdown would wait for.
- `aclose()` stops the reader and resets the connection (the replica forgets the channel).
`ChannelInbox.get()` returns the stream's next record's payload in order.
Non-goals: choosing replicas, retries, parsing payloads (`gateway.replica_stream` does).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from replicas.channel_wire import CHANNEL_MEDIA_TYPE, CHANNEL_PATH, RecordReader

from .upstream import UpstreamConnectionError, UpstreamPool, UpstreamTimeout

log = logging.getLogger("gateway.channel")


class ChannelInbox:
    """One bound stream's records, in order (event-loop side only)."""

    __slots__ = ("channel", "stream", "_items", "_waiter", "_lost")

    def __init__(self, channel: "ReplicaChannel", stream: int) -> None:
        self.channel, self.stream = channel, stream
        self._items: deque[bytes] = deque()
        self._waiter: asyncio.Future | None = None
        self._lost: str | None = None

    def unbind(self) -> None:
        self.channel.unbind(self.stream)

    def put(self, payload: bytes) -> None:
        self._items.append(payload)
        self._wake()

    def lose(self, reason: str) -> None:
        """No more records will come: `get` raises once the queued ones are read."""
        if self._lost is None:
            self._lost = reason
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> bytes:
        while not self._items:
            if self._lost is not None:
                raise UpstreamConnectionError(self._lost)
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()


class ReplicaChannel:
    def __init__(self, pool: UpstreamPool, *, open_timeout_s: float = 1.0) -> None:
        self._pool = pool
        self._open_timeout_s = open_timeout_s
        self.channel_id: str | None = None
        self.closed = False
        self._streams: dict[int, ChannelInbox] = {}
        self._next = 1
        self._task: asyncio.Task | None = None
        self._idle_since: float | None = None  # loop time the last stream was unbound
        self.closed_at: float | None = None  # loop time it closed

    @property
    def ready(self) -> bool:
        return self.channel_id is not None and not self.closed

    def __len__(self) -> int:
        return len(self._streams)

    def start(self) -> "ReplicaChannel":
        loop = asyncio.get_running_loop()
        self._idle_since = loop.time()
        self._task = loop.create_task(self._run(), name="stream-channel")
        return self

    def bind(self) -> ChannelInbox | None:
        if not self.ready:
            return None
        stream, self._next = self._next, self._next + 1
        inbox = self._streams[stream] = ChannelInbox(self, stream)
        self._idle_since = None
        return inbox

    def unbind(self, stream: int) -> None:
        if self._streams.pop(stream, None) is not None and not self._streams:
            self._idle_since = asyncio.get_running_loop().time()

    def idle_for(self, now: float) -> float:
        return 0.0 if self._idle_since is None else now - self._idle_since

    async def _run(self) -> None:
        reason = "the stream channel closed"
        response = None
        try:
            response = await self._pool.request("GET", CHANNEL_PATH, headers={"Accept": CHANNEL_MEDIA_TYPE},
                                                timeout=self._open_timeout_s)
            if response.status != 200:
                reason = f"the replica refused a stream channel (HTTP {response.status})"
                return
            reader = RecordReader()
            async for data in response.chunks():
                for stream, payload in reader.feed(data):
                    if stream == 0:
                        self.channel_id = payload.decode("ascii")
                        continue
                    inbox = self._streams.get(stream)
                    if inbox is not None:
                        inbox.put(payload)
            reason = "the replica ended the stream channel"
        except (UpstreamConnectionError, UpstreamTimeout) as e:
            reason = f"stream channel lost: {e}"
        except ValueError as e:  # a malformed record: nothing after it can be trusted
            reason = str(e)
            log.warning("%s; closing the channel", e)
        finally:
            self.closed = True
            self.closed_at = asyncio.get_running_loop().time()
            for inbox in self._streams.values():
                inbox.lose(reason)
            self._streams.clear()
            if response is not None:
                await response.aclose()  # not read to its end: reset, so the replica drops the channel

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)  # its end, whatever it was
