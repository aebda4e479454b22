"""Stream channels on the wire: many streamed requests' lines over ONE long-lived answer.

Why: streamed, every engine step sends one event per request, and each event used to cost a
write on the replica's socket, a read in the gateway and the ASGI layers around both (about
145 us of CPU per event together on the CPU reference machine; docs/PERFORMANCE.md). A channel
carries every bound request's events of a step in one write and one read.

Contract:
- The gateway opens `GET CHANNEL_PATH` on a replica's own port (a direct route). The answer's
  body is a sequence of records, `b"<stream> <length>\\n"` then `length` bytes of payload
  (`encode_record`). Record 0 comes first and carries the channel's id (ASCII).
- A `GenerateRequest` with `stream: true` and `channel: {id, stream}` (stream >= 1, chosen by the
  gateway, unique on that channel) is bound to it when the replica still has that channel: its
  own answer then carries `CHANNEL_HEADER: bound` and its first NDJSON line, and ends when the
  request ends; each later line (a ready SSE event, or a `GenerateChunk` JSON line with its
  newline: the bytes an unbound answer would carry) is one record on the channel, in order. An
  answer without the header is an ordinary NDJSON stream (the channel had closed).
- Closing the request's own answer aborts it, as for any stream; closing the channel makes the
  replica abort the requests bound to it (the gateway fails them: they lost their events).
- `RecordReader.feed(bytes)` parses records incrementally; a malformed header or a record over
  `MAX_RECORD` raises `ValueError` (the gateway then treats the channel as broken).
Leaf module: no project imports, no torch, no ray. Non-goals: flow control per stream (a
stream's events queue in the gateway until its client reads them), multiplexing requests'
bodies (each request is still its own POST, so Ray Serve counts and drains it).
"""

from __future__ import annotations

CHANNEL_PATH = "/channel"
CHANNEL_HEADER = "x-nld-channel"  # "bound" on the answer of a request whose lines go to its channel
CHANNEL_MEDIA_TYPE = "application/x-nld-channel"
MAX_RECORD = 1 << 24  # bytes of one record's payload
MAX_HEADER = 32  # bytes of "<stream> <length>\n"


def encode_record(stream: int, payload: bytes) -> bytes:
    return b"%d %d\n" % (stream, len(payload)) + payload


class RecordReader:
    """Records out of a channel's body, fed in whatever pieces the socket delivers."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf = self._buf + data if self._buf else data
        out: list[tuple[int, bytes]] = []
        pos, size = 0, len(buf)
        while pos < size:
            nl = buf.find(b"\n", pos, pos + MAX_HEADER)
            if nl < 0:
                if size - pos >= MAX_HEADER:
                    raise ValueError("stream channel: malformed record header")
                break
            stream, sep, length = buf[pos:nl].partition(b" ")
            if not sep or not stream.isdigit() or not length.isdigit():
                raise ValueError("stream channel: malformed record header")
            n = int(length)
            if n > MAX_RECORD:
                raise ValueError(f"stream channel: a record of {n} bytes (at most {MAX_RECORD})")
            end = nl + 1 + n
            if end > size:
                break
            out.append((int(stream), buf[nl + 1:end]))
            pos = end
        self._buf = buf[pos:]
        return out

    @property
    def pending(self) -> int:
        """Bytes of an incomplete record held for the next `feed`."""
        return len(self._buf)
