"""Stream channels on the replica (`replicas.channels`, `replicas.channel_wire`): the record
framing, and `NLDReplica` served by uvicorn on loopback with a fake engine: a bound request's
lines after the first arrive on the channel, byte for byte what its own answer would carry;
closing the channel, or the request's own answer, aborts the engine request; a request naming
a channel the replica does not have streams on its own answer. The gateway's end is in
tests/gateway/test_channel.py, the real Ray Serve path in tests/gateway/test_direct_e2e.py."""

from __future__ import annotations

import asyncio
import json

import pytest

from gateway.upstream import UpstreamPool
from replicas.channel_wire import CHANNEL_HEADER, MAX_RECORD, RecordReader, encode_record
from replicas.wire import GenerateChunk
from tests.gateway.servers import serve_in_thread

from .fakes import SNIPPET, asgi
from .test_replica import make

def served(replica):
    """The replica as an ASGI app uvicorn can run (its lifespan messages answered)."""
    app = asgi(replica)

    async def with_lifespan(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].rsplit(".", 1)[-1]
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        await app(scope, receive, send)
    return with_lifespan


SSE = {"id": "cmpl-7", "created": 11, "model": "m", "index": 0, "chat": False, "include_usage": False}


def test_records_parse_from_any_split_of_the_bytes():
    records = [(0, b"ch-1"), (3, b"data: {\"x\": 1}\n\n"), (12, b""), (3, b"{\"a\":\n\"b\"}\n" * 50)]
    wire = b"".join(encode_record(s, p) for s, p in records)
    for size in (1, 2, 7, len(wire)):
        reader, got = RecordReader(), []
        for k in range(0, len(wire), size):
            got += reader.feed(wire[k:k + size])
        assert got == records and reader.pending == 0


@pytest.mark.parametrize("bad", [b"x 3\nabc", b"3\nabc", b"1 -3\n", b"1 3 4\nabc", b"1" * 40])
def test_malformed_record_headers_raise(bad):
    with pytest.raises(ValueError, match="malformed record header"):
        RecordReader().feed(bad)


def test_a_record_over_the_limit_raises():
    with pytest.raises(ValueError, match="at most"):
        RecordReader().feed(b"1 %d\n" % (MAX_RECORD + 1))


async def open_channel(pool: UpstreamPool):
    """GET /channel: (response, its chunk iterator, reader, channel id from record 0)."""
    response = await pool.request("GET", "/channel")
    assert response.status == 200
    chunks, reader, got = response.chunks(), RecordReader(), []
    while not got:
        got = reader.feed(await anext(chunks))
    assert got[0][0] == 0
    return response, chunks, reader, got[0][1].decode(), got[1:]


async def read_records(chunks, reader, early, until) -> list[tuple[int, bytes]]:
    """Records until `until(records)` holds."""
    records = list(early)
    while not until(records):
        records += reader.feed(await asyncio.wait_for(anext(chunks), 10))
    return records


def last_of(records, stream) -> bool:
    mine = [p for s, p in records if s == stream]
    return bool(mine) and not mine[-1].startswith(b"data: ") and \
        GenerateChunk.model_validate_json(mine[-1]).finish_reason is not None


def test_a_bound_requests_lines_arrive_on_the_channel_as_its_own_answer_would_carry_them():
    replica, engine, _ = make({"tokens_per_step": 1})

    async def run(url):
        pool = UpstreamPool(url)
        body = {"request_id": "r-1", "prompt_ids": [5], "max_tokens": 12, "sse": SSE}
        plain = await pool.request("POST", "/generate", json.dumps(body).encode(), {"Content-Type": "application/json"})
        unbound = [line async for line in plain.lines()]
        await plain.aclose()
        response, chunks, reader, cid, early = await open_channel(pool)
        stats = await pool.request("GET", "/stats")
        assert json.loads(await stats.read())["stream_channels"] == 1
        await stats.aclose()
        answers = []
        for stream in (1, 2):  # two requests on one channel, at the same time
            bound = {**body, "request_id": f"r-{stream}", "channel": {"id": cid, "stream": stream}}
            answers.append(await pool.request("POST", "/generate", json.dumps(bound).encode(),
                                              {"Content-Type": "application/json"}))
        assert all(a.status == 200 and a.headers[CHANNEL_HEADER] == "bound" for a in answers)
        own = [[line async for line in a.lines()] for a in answers]
        records = await read_records(chunks, reader, early, lambda rs: last_of(rs, 1) and last_of(rs, 2))
        await response.aclose()
        await pool.aclose()
        return unbound, own, records

    with serve_in_thread(served(replica)) as url:
        unbound, own, records = asyncio.run(run(url))
    assert len(unbound) > 3
    for stream, lines in zip((1, 2), own):
        assert lines == [unbound[0].replace(b"r-1", b"r-%d" % stream)]  # only the first chunk on its answer
        mine = [p for s, p in records if s == stream]
        # every later line, framing included: SSE events end in a blank line, chunks in a newline
        expected = [x + b"\n" for x in unbound[1:] if x]
        expected = [x + b"\n" if x.startswith(b"data: ") else x for x in expected]
        assert mine == [x.replace(b"r-1", b"r-%d" % stream) for x in expected]
    assert engine.aborted == [] and len(replica.channels) == 0  # closing it forgot the channel


@pytest.mark.parametrize("sse", [False, True], ids=["chunks", "sse-tapped"])
def test_closing_the_channel_aborts_its_bound_requests_and_closing_a_request_spares_the_channel(sse):
    replica, engine, _ = make({"tokens_per_step": 1, "step_s": 0.01})

    async def run(url):
        pool = UpstreamPool(url)
        response, chunks, reader, cid, early = await open_channel(pool)
        answers = []
        for stream in (1, 2):
            body = {"request_id": f"r-{stream}", "prompt_ids": [5], "max_tokens": 500,
                    "channel": {"id": cid, "stream": stream}, **({"sse": SSE} if sse else {})}
            answers.append(await pool.request("POST", "/generate", json.dumps(body).encode(),
                                              {"Content-Type": "application/json"}))
        await read_records(chunks, reader, early, lambda rs: {s for s, _ in rs} >= {1, 2})
        await answers[0].aclose()  # the gateway's client went away: its request only
        for _ in range(200):
            if "r-1" in engine.aborted:
                break
            await asyncio.sleep(0.01)
        more = await read_records(chunks, reader, [], lambda rs: len(rs) >= 3)
        assert {s for s, _ in more} == {2}  # the other stream goes on, on the same channel
        await response.aclose()  # the channel goes: its remaining request is aborted and its answer ends
        rest = [line async for line in answers[1].lines()]
        await pool.aclose()
        return rest

    with serve_in_thread(served(replica)) as url:
        rest = asyncio.run(run(url))
    # its own answer held only its first chunk, and ended with the channel
    assert len(rest) == 1 and GenerateChunk.model_validate_json(rest[0]).finish_reason is None
    assert set(engine.aborted) == {"r-1", "r-2"} and not engine.running
    assert len(replica.channels) == 0


def test_a_bound_sse_request_is_rendered_at_delivery_and_ends_at_its_stop_string_as_unbound():
    """Its events come from the inbox tap (the handler is not woken per step), and a stop string
    met inside a tapped chunk still ends it with the text before the stop, as unbound."""
    replica, engine, _ = make({"tokens_per_step": 1})
    tapped = []
    tap = engine.tap
    engine.tap = lambda rid, fn: tapped.append(rid) or tap(rid, fn)

    async def run(url):
        pool = UpstreamPool(url)
        body = {"request_id": "r-1", "prompt_ids": [5], "max_tokens": 60, "sse": SSE, "stop": ["sorted"]}
        plain = await pool.request("POST", "/generate", json.dumps(body).encode(), {"Content-Type": "application/json"})
        unbound = [line async for line in plain.lines()]
        await plain.aclose()
        response, chunks, reader, cid, early = await open_channel(pool)
        bound = {**body, "channel": {"id": cid, "stream": 1}}
        answer = await pool.request("POST", "/generate", json.dumps(bound).encode(), {"Content-Type": "application/json"})
        own = [line async for line in answer.lines()]
        records = await read_records(chunks, reader, early, lambda rs: last_of(rs, 1))
        await response.aclose()
        await pool.aclose()
        return unbound, own, [p for s, p in records if s == 1]

    with serve_in_thread(served(replica)) as url:
        unbound, own, mine = asyncio.run(run(url))
    assert tapped == ["r-1"]  # only the bound request is tapped
    last = GenerateChunk.model_validate_json(unbound[-1])
    assert last.finish_reason == "stop" and "sorted" not in last.text
    expected = [x + b"\n" for x in unbound[1:] if x]
    assert own == unbound[:1] and mine == [x + b"\n" if x.startswith(b"data: ") else x for x in expected]
    text = "".join(json.loads(x[len(b"data: "):])["choices"][0]["text"] for x in mine[:-1])
    assert SNIPPET.startswith(GenerateChunk.model_validate_json(unbound[0]).text + text + last.text)
    assert (GenerateChunk.model_validate_json(unbound[0]).text + text + last.text + "sorted") in SNIPPET
    assert set(engine.aborted) == {"r-1"} and not engine.running  # the stop string ended both early


def test_a_request_naming_an_unknown_channel_streams_on_its_own_answer():
    replica, engine, _ = make({"tokens_per_step": 1})

    async def run(url):
        pool = UpstreamPool(url)
        body = {"prompt_ids": [5], "max_tokens": 6, "channel": {"id": "gone", "stream": 1}}
        answer = await pool.request("POST", "/generate", json.dumps(body).encode(), {"Content-Type": "application/json"})
        lines = [GenerateChunk.model_validate_json(x) async for x in answer.lines() if x]
        await pool.aclose()
        return answer.headers, lines

    with serve_in_thread(served(replica)) as url:
        headers, lines = asyncio.run(run(url))
    assert CHANNEL_HEADER not in headers
    assert [t for c in lines for t in c.token_ids] == engine.script[:6] and lines[-1].finish_reason == "length"
