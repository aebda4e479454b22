"""`HttpReplicaClient` against scripted HTTP answers (httpx.MockTransport): NDJSON streaming,
status mapping, one retry of a connection failure before the first byte, timeouts, mid-stream
failures as error chunks, and the cached /info."""

from __future__ import annotations

import httpx
import pytest

from gateway import GatewayConfig
from gateway.replica_client import HttpReplicaClient, ReplicaError
from gateway.testing import FAKE_INFO, fake_chunks
from replicas.wire import ErrorBody, ErrorInfo, GenerateRequest

pytestmark = pytest.mark.anyio

REQ = GenerateRequest(request_id="r-0", prompt="hi", mode="self_spec", max_tokens=9)


def ndjson(request: GenerateRequest) -> bytes:
    return b"".join(c.model_dump_json(exclude_none=True).encode() + b"\n" for c in fake_chunks(request))


def client_for(handler, **config) -> HttpReplicaClient:
    cfg = GatewayConfig(replica_url="http://replica:8001/nld", **config)
    return HttpReplicaClient(cfg, http=httpx.AsyncClient(transport=httpx.MockTransport(handler)))


async def collect(stream) -> list:
    return [c async for c in stream]


async def test_streams_ndjson_chunks():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=ndjson(GenerateRequest.model_validate_json(request.content)))

    client = client_for(handler)
    chunks = await collect(await client.generate(REQ))
    assert [c.text for c in chunks] == [c.text for c in fake_chunks(REQ)]
    assert chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == 9
    assert str(seen[0].url) == "http://replica:8001/nld/generate"
    assert GenerateRequest.model_validate_json(seen[0].content) == REQ


@pytest.mark.parametrize("upstream, expected", [(400, 400), (413, 413), (429, 429), (503, 503), (404, 503),
                                                (500, 503), (502, 503), (504, 504), (422, 400)])
async def test_status_mapping(upstream, expected):
    body = ErrorBody(error=ErrorInfo(message="nope", type="x", param="max_tokens")).model_dump_json()
    client = client_for(lambda r: httpx.Response(upstream, content=body, headers={"retry-after": "3"}))
    with pytest.raises(ReplicaError) as e:
        await client.generate(REQ)
    assert e.value.status == expected and e.value.info.message == "nope" and e.value.retry_after == 3.0


async def test_non_json_error_body():
    client = client_for(lambda r: httpx.Response(500, text="Internal Server Error"))
    with pytest.raises(ReplicaError) as e:
        await client.generate(REQ)
    assert e.value.status == 503 and "500" in e.value.info.message


async def test_connection_failure_is_retried_once_then_503():
    calls = []

    def flaky(request):
        calls.append(1)
        if len(calls) == 1:
            raise httpx.ConnectError("refused")
        return httpx.Response(200, content=ndjson(REQ))

    retries = []
    client = client_for(flaky)
    client._on_retry = lambda: retries.append(1)
    assert (await collect(await client.generate(REQ)))[-1].finish_reason == "length"
    assert len(calls) == 2 and retries == [1]

    calls.clear()
    down = client_for(lambda r: (calls.append(1), (_ for _ in ()).throw(httpx.ConnectError("refused")))[1])
    with pytest.raises(ReplicaError) as e:
        await down.generate(REQ)
    assert e.value.status == 503 and len(calls) == 2

    calls.clear()
    no_retry = client_for(lambda r: (calls.append(1), (_ for _ in ()).throw(httpx.ConnectError("x")))[1],
                          connect_retries=0)
    with pytest.raises(ReplicaError):
        await no_retry.generate(REQ)
    assert len(calls) == 1


async def test_read_timeout_before_first_byte_is_504():
    def slow(request):
        raise httpx.ReadTimeout("slow")

    with pytest.raises(ReplicaError) as e:
        await client_for(slow).generate(REQ)
    assert e.value.status == 504


class Broken(httpx.AsyncByteStream):
    """One good line, then the connection dies."""

    def __init__(self, first: bytes, closed: list) -> None:
        self.first, self.closed = first, closed

    async def __aiter__(self):
        yield self.first
        raise httpx.ReadError("connection reset")

    async def aclose(self) -> None:
        self.closed.append(True)


async def test_failure_mid_stream_is_an_error_chunk():
    closed: list = []
    first = ndjson(REQ).split(b"\n")[0] + b"\n"
    client = client_for(lambda r: httpx.Response(200, stream=Broken(first, closed)))
    chunks = await collect(await client.generate(REQ))
    assert chunks[0].text and chunks[-1].finish_reason == "error"
    assert chunks[-1].error.type == "service_unavailable_error"


async def test_stream_ending_without_last_chunk_is_an_error_chunk():
    first = ndjson(REQ).split(b"\n")[0] + b"\n"
    chunks = await collect(await client_for(lambda r: httpx.Response(200, content=first)).generate(REQ))
    assert chunks[-1].finish_reason == "error" and chunks[-1].error.code == "replica_lost"


async def test_aclose_closes_the_upstream_response():
    closed: list = []

    class Endless(httpx.AsyncByteStream):
        async def __aiter__(self):
            for line in ndjson(REQ.model_copy(update={"max_tokens": 1000, "mode": "ar"})).split(b"\n"):
                yield line + b"\n"

        async def aclose(self):
            closed.append(True)

    stream = await client_for(lambda r: httpx.Response(200, stream=Endless())).generate(REQ)
    await stream.__anext__()
    await stream.aclose()
    assert closed == [True]


async def test_info_is_cached_with_a_ttl():
    now = [0.0]
    calls = []

    def handler(request):
        calls.append(request.url.path)
        return httpx.Response(200, content=FAKE_INFO.model_dump_json())

    cfg = GatewayConfig(replica_url="http://replica:8001", info_ttl_s=10)
    client = HttpReplicaClient(cfg, http=httpx.AsyncClient(transport=httpx.MockTransport(handler)),
                               clock=lambda: now[0])
    assert (await client.info()).max_prompt_tokens == FAKE_INFO.max_prompt_tokens
    await client.info()
    assert calls == ["/info"]
    now[0] = 11
    await client.info()
    assert calls == ["/info", "/info"]


async def test_health_and_stats():
    def handler(request):
        if request.url.path == "/health":
            return httpx.Response(200, json={"status": "ok"})
        return httpx.Response(200, json={"running": 2})

    client = client_for(handler)
    assert await client.health() is True
    assert await client.stats() == {"running": 2}

    def down(request):
        raise httpx.ConnectError("refused")
    assert await client_for(down).health() is False
