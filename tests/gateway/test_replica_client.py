"""`HttpReplicaClient` and its HTTP/1.1 pool against scripted loopback servers: NDJSON over
chunked and Content-Length bodies, status mapping, one retry of a connection failure before
the first byte, keep-alive reuse and stale connections, timeouts, mid-stream failures as error
chunks, aborting the upstream on close, and the cached /info."""

from __future__ import annotations

import asyncio
import socket

import pytest

from gateway import GatewayConfig
from gateway.replica_client import HttpReplicaClient, ReplicaError
from tests.gateway.fakes import FAKE_INFO, as_wire, fake_chunks
from gateway.upstream import UpstreamConnectionError, UpstreamPool
from replicas.wire import ErrorBody, ErrorInfo, GenerateChunk, GenerateRequest, SSERender

from .servers import ScriptedServer

pytestmark = pytest.mark.anyio

REQ = GenerateRequest(request_id="r-0", prompt="hi", mode="self_spec", max_tokens=9)


def lines_for(request: GenerateRequest) -> list[bytes]:
    return [c.model_dump_json(exclude_none=True).encode() + b"\n" for c in fake_chunks(request)]


async def ndjson_chunked(req) -> None:
    await req.start_chunked()
    for line in lines_for(GenerateRequest.model_validate_json(req.body)):
        await req.chunk(line)
    await req.end_chunked()


def client_for(url: str, **config) -> HttpReplicaClient:
    return HttpReplicaClient(GatewayConfig(replica_url=url, **config))


async def collect(stream) -> list:
    return [c async for c in stream]


async def test_streams_ndjson_and_reuses_the_connection():
    async with ScriptedServer(ndjson_chunked) as srv:
        client = client_for(srv.url + "/nld")
        for _ in range(3):
            chunks = await collect(await client.generate(REQ))
            assert [c.text for c in chunks] == [c.text for c in fake_chunks(REQ)]
            assert chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == 9
        assert srv.connections == 1  # keep-alive
        first = srv.requests[0]
        assert (first.method, first.path) == ("POST", "/nld/generate")
        assert GenerateRequest.model_validate_json(first.body) == REQ
        await client.aclose()


async def test_content_length_body_and_lines_split_across_writes():
    async def respond(req):
        body = b"".join(lines_for(REQ))
        await req.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
        for i in range(0, len(body), 7):  # lines cut at arbitrary places
            await req.send(body[i:i + 7])
    async with ScriptedServer(respond) as srv:
        chunks = await collect(await client_for(srv.url).generate(REQ))
        assert "".join(c.text for c in chunks) == "".join(c.text for c in fake_chunks(REQ))


@pytest.mark.parametrize("upstream, expected", [(400, 400), (413, 413), (429, 429), (503, 503), (404, 503),
                                                (500, 503), (502, 503), (504, 504), (422, 400)])
async def test_status_mapping(upstream, expected):
    body = ErrorBody(error=ErrorInfo(message="nope", type="x", param="max_tokens")).model_dump_json()

    async def respond(req):
        await req.json_response(upstream, body, extra="Retry-After: 3\r\n")
    async with ScriptedServer(respond) as srv:
        client = client_for(srv.url)
        with pytest.raises(ReplicaError) as e:
            await client.generate(REQ)
        assert e.value.status == expected and e.value.info.message == "nope" and e.value.retry_after == 3.0
        with pytest.raises(ReplicaError):
            await client.generate(REQ)
        assert srv.connections == 1  # an error body read in full keeps the connection


async def test_non_json_error_body():
    async def respond(req):
        await req.send(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 5\r\n\r\noops!")
    async with ScriptedServer(respond) as srv:
        with pytest.raises(ReplicaError) as e:
            await client_for(srv.url).generate(REQ)
        assert e.value.status == 503 and "500" in e.value.info.message


async def test_connection_failure_before_the_first_byte_is_retried_once():
    async def respond(req):
        if req.conn == 1:
            return "close"  # drop the connection without a byte
        await ndjson_chunked(req)
    async with ScriptedServer(respond) as srv:
        retries = []
        client = HttpReplicaClient(GatewayConfig(replica_url=srv.url), on_retry=lambda: retries.append(1))
        chunks = await collect(await client.generate(REQ))
        assert chunks[-1].finish_reason == "length" and retries == [1] and srv.connections == 2


async def test_no_replica_is_503_after_one_retry():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    retries = []
    client = HttpReplicaClient(GatewayConfig(replica_url=f"http://127.0.0.1:{port}"), on_retry=lambda: retries.append(1))
    with pytest.raises(ReplicaError) as e:
        await client.generate(REQ)
    assert e.value.status == 503 and e.value.info.code == "no_replica" and retries == [1]
    assert await client.health() is False
    with pytest.raises(ReplicaError):
        await client.info()


async def test_without_retries_the_first_failure_is_final():
    async def respond(req):
        return "close"
    async with ScriptedServer(respond) as srv:
        with pytest.raises(ReplicaError):
            await client_for(srv.url, connect_retries=0).generate(REQ)
        assert srv.connections == 1


async def test_stale_keep_alive_connection_is_replaced_transparently():
    async def respond(req):
        await ndjson_chunked(req)
        return "close" if req.conn == 1 else None  # the server drops the idle connection
    async with ScriptedServer(respond) as srv:
        retries = []
        client = HttpReplicaClient(GatewayConfig(replica_url=srv.url), on_retry=lambda: retries.append(1))
        await collect(await client.generate(REQ))
        await asyncio.sleep(0.05)
        await collect(await client.generate(REQ))
        assert srv.connections == 2 and retries == []


async def test_timeout_before_the_first_byte_is_504():
    async def respond(req):
        await asyncio.sleep(2)
    async with ScriptedServer(respond) as srv:
        with pytest.raises(ReplicaError) as e:
            await client_for(srv.url, request_timeout_s=0.1).generate(REQ)
        assert e.value.status == 504


async def test_failure_mid_stream_is_an_error_chunk():
    async def respond(req):
        await req.start_chunked()
        await req.chunk(lines_for(REQ)[0])
        req.writer.transport.abort()
    async with ScriptedServer(respond) as srv:
        chunks = await collect(await client_for(srv.url).generate(REQ))
        assert chunks[0].text and chunks[-1].finish_reason == "error"
        assert chunks[-1].error.type == "service_unavailable_error" and chunks[-1].error.code == "replica_lost"


async def test_stall_mid_stream_is_a_timeout_error_chunk():
    async def respond(req):
        await req.start_chunked()
        await req.chunk(lines_for(REQ)[0])
        await asyncio.sleep(2)
    async with ScriptedServer(respond) as srv:
        chunks = await collect(await client_for(srv.url, request_timeout_s=0.2).generate(REQ))
        assert chunks[-1].finish_reason == "error" and chunks[-1].error.code == "upstream_timeout"


async def test_stream_ending_without_last_chunk_is_an_error_chunk():
    async def respond(req):
        await req.start_chunked()
        await req.chunk(lines_for(REQ)[0])
        await req.end_chunked()
    async with ScriptedServer(respond) as srv:
        chunks = await collect(await client_for(srv.url).generate(REQ))
        assert chunks[-1].finish_reason == "error" and chunks[-1].error.code == "replica_lost"


async def test_aclose_mid_stream_closes_the_connection():
    seen_close = asyncio.Event()

    async def respond(req):
        await req.start_chunked()
        await req.chunk(lines_for(REQ)[0])
        if await req.wait_closed_by_client():
            seen_close.set()
        return "close"
    async with ScriptedServer(respond) as srv:
        stream = await client_for(srv.url).generate(REQ)
        await stream.__anext__()
        await stream.aclose()
        await asyncio.wait_for(seen_close.wait(), 3)


async def test_info_is_cached_with_a_ttl():
    async def respond(req):
        await req.json_response(200, FAKE_INFO.model_dump())
    now = [0.0]
    async with ScriptedServer(respond) as srv:
        client = HttpReplicaClient(GatewayConfig(replica_url=srv.url, info_ttl_s=10), clock=lambda: now[0])
        assert (await client.info()).max_prompt_tokens == FAKE_INFO.max_prompt_tokens
        await client.info()
        assert [r.path for r in srv.requests] == ["/info"]
        now[0] = 11
        await client.info()
        assert [r.path for r in srv.requests] == ["/info", "/info"]


async def test_health_and_stats():
    async def respond(req):
        await req.json_response(200, {"status": "ok"} if req.path == "/health" else {"running": 2})
    async with ScriptedServer(respond) as srv:
        client = client_for(srv.url)
        assert await client.health() is True
        assert await client.stats() == {"running": 2}


async def test_pool_rejects_bad_urls_and_malformed_responses():
    with pytest.raises(ValueError):
        UpstreamPool("ftp://x")

    for garbage in (b"garbage\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
                    b"HTTP/1.1 abc OK\r\n\r\n", b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n"):
        async def respond(req, garbage=garbage):
            await req.send(garbage)
        async with ScriptedServer(respond) as srv:
            with pytest.raises(UpstreamConnectionError):
                await UpstreamPool(srv.url).request("GET", "/x")


async def test_a_non_streaming_answer_is_one_json_message_read_as_one_chunk():
    whole = REQ.model_copy(update={"stream": False})

    async def respond(req):
        sent = GenerateRequest.model_validate_json(req.body)
        assert sent.stream is False
        [chunk] = fake_chunks(sent)
        await req.json_response(200, chunk.model_dump_json(exclude_none=True))

    async with ScriptedServer(respond) as srv:
        client = client_for(srv.url)
        chunks = await collect(await client.generate(whole))
        assert len(chunks) == 1 and chunks[0].finish_reason == "length"
        assert chunks[0].text == "".join(c.text for c in fake_chunks(REQ)) and chunks[0].usage.completion_tokens == 9
        assert len(chunks[0].token_ids) == 9
        await collect(await client.generate(whole))
        assert srv.connections == 1  # the connection went back to the pool
        await client.aclose()


async def test_a_malformed_non_streaming_answer_is_an_error_chunk():
    async def respond(req):
        await req.json_response(200, {"not": "a chunk"})

    async with ScriptedServer(respond) as srv:
        chunks = await collect(await client_for(srv.url).generate(REQ.model_copy(update={"stream": False})))
        assert chunks[-1].finish_reason == "error" and chunks[-1].error.code == "bad_upstream_chunk"


SSE_REQ = REQ.model_copy(update={"mode": "ar", "sse": SSERender(id="cmpl-1", created=3, model="nld", index=0, chat=False)})


def wire_bytes(request: GenerateRequest) -> bytes:
    return b"".join(c if type(c) is bytes else c.model_dump_json(exclude_none=True).encode() + b"\n"
                    for c in as_wire(request, fake_chunks(request)))


async def test_ready_sse_events_come_through_as_bytes_even_when_split_across_writes():
    body = wire_bytes(SSE_REQ)

    async def respond(req):
        await req.start_chunked()
        for i in range(0, len(body), 5):
            await req.chunk(body[i:i + 5])
        await req.end_chunked()
    async with ScriptedServer(respond) as srv:
        items = await collect(await client_for(srv.url).generate(SSE_REQ))
    expected = as_wire(SSE_REQ, fake_chunks(SSE_REQ))
    assert len(items) == len(expected) > 2 and isinstance(items[0], GenerateChunk)
    assert items[1:-1] == expected[1:-1] and all(type(e) is bytes and e.endswith(b"}\n\n") for e in items[1:-1])
    assert items[-1].finish_reason == "length" and items[-1].usage.completion_tokens == 9


async def test_an_event_before_the_first_chunk_is_a_malformed_stream():
    async def respond(req):
        await req.start_chunked()
        await req.chunk(b'data: {"choices": []}\n\n')
        await req.end_chunked()
    async with ScriptedServer(respond) as srv:
        chunks = await collect(await client_for(srv.url).generate(SSE_REQ))
        assert chunks[0].finish_reason == "error" and chunks[0].error.code == "bad_upstream_chunk"


async def test_the_read_timeout_is_per_line_not_per_stream():
    """The watchdog re-arms on every line: a stream longer than the timeout whose lines come
    in time is not cut; one that then stalls is."""
    lines = lines_for(REQ)

    async def respond(req):
        await req.start_chunked()
        for line in lines[:-1]:
            await req.chunk(line)
            await asyncio.sleep(0.1)
        if req.path.startswith("/stall"):
            await asyncio.sleep(2)
        await req.chunk(lines[-1])
        await req.end_chunked()
    async with ScriptedServer(respond) as srv:
        assert len(lines) * 0.1 > 0.25
        chunks = await collect(await client_for(srv.url, request_timeout_s=0.25).generate(REQ))
        assert chunks[-1].finish_reason == "length" and chunks[-1].error is None
        chunks = await collect(await client_for(srv.url + "/stall", request_timeout_s=0.25).generate(REQ))
        assert chunks[-1].finish_reason == "error" and chunks[-1].error.code == "upstream_timeout"


async def test_every_answers_report_header_goes_to_on_report_ok_or_error():
    """The replicas' reports (`x-nld-replica-report`) ride on their answers, 200 or not; an
    answer without one (an older replica) reports None."""
    report = 'r7;3;{"running":2,"model":"m"}'
    answers = iter([(200, True), (429, True), (200, False)])

    async def respond(req):
        status, with_report = next(answers)
        extra = f"x-nld-replica-report: {report}\r\n" if with_report else ""
        if status == 200:
            [chunk] = fake_chunks(GenerateRequest.model_validate_json(req.body))
            body = chunk.model_dump_json(exclude_none=True)
        else:
            body = ErrorBody(error=ErrorInfo(message="busy", type="rate_limit_error")).model_dump_json()
        await req.json_response(status, body, extra=extra)
    seen = []
    async with ScriptedServer(respond) as srv:
        client = HttpReplicaClient(GatewayConfig(replica_url=srv.url), on_report=seen.append)
        whole = REQ.model_copy(update={"stream": False})
        assert [c.finish_reason async for c in await client.generate(whole)] == ["length"]
        with pytest.raises(ReplicaError) as e:
            await client.generate(whole)
        assert e.value.status == 429
        await client.generate(whole)
        await client.aclose()
    assert seen == [report, report, None]
