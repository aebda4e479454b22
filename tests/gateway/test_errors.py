"""Every error status in the OpenAI envelope, and the app still serves afterwards."""

from __future__ import annotations

import asyncio

import pytest

from gateway.replica_client import ReplicaError
from replicas.wire import ErrorInfo

from .servers import asgi_client, sse_events

pytestmark = pytest.mark.anyio

OK = {"model": "nld", "prompt": "hi", "max_tokens": 2}


def assert_envelope(r, status: int, param: str | None = "any", code: str | None = "any") -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
    if param != "any":
        assert err["param"] == param
    if code != "any":
        assert err["code"] == code
    return err


async def still_serves(c) -> None:
    r = await c.post("/v1/completions", json=OK)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"]


@pytest.mark.parametrize("body, param", [
    ({"model": "nld", "prompt": "x", "temperature": 2.5}, "temperature"),
    ({"model": "nld", "prompt": "x", "top_p": -1}, "top_p"),
    ({"model": "nld", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": "nld", "prompt": "x", "max_tokens": 5000}, "max_tokens"),
    ({"model": "nld", "prompt": "x", "max_completion_tokens": 5000}, "max_completion_tokens"),
    ({"model": "nld", "prompt": "x", "n": 5}, "n"),
    ({"model": "nld", "prompt": "x", "n": 0}, "n"),
    ({"model": "nld", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": "nld", "prompt": "x", "stop": ""}, "stop"),
    ({"model": "nld", "prompt": "x", "decoding_mode": "fast"}, "decoding_mode"),
    ({"model": "nld", "prompt": "x", "block_length": 1}, "block_length"),
    ({"model": "nld", "prompt": "x", "confidence_threshold": 1.5}, "confidence_threshold"),
    ({"model": "nld", "prompt": "x", "seed": "1"}, "seed"),
    ({"model": "nld", "prompt": "x", "echo": True}, "echo"),
    ({"model": "nld", "prompt": "x", "logprobs": 2}, "logprobs"),
    ({"model": "nld", "prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
    ({"model": "nld", "prompt": [-1]}, "prompt"),
    ({"model": "nld", "prompt": []}, "prompt"),
    ({"model": "nld"}, "prompt"),
    ({"prompt": "x"}, "model"),
])
async def test_400_names_the_param(client, body, param):
    assert_envelope(await client.post("/v1/completions", json=body), 400, param=param)
    await still_serves(client)


@pytest.mark.parametrize("body, param", [
    ({"model": "nld", "messages": []}, "messages"),
    ({"model": "nld", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"model": "nld", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]"),
    ({"model": "nld", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
    ({"model": "nld", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}},
     "response_format"),
])
async def test_chat_400(client, body, param):
    assert_envelope(await client.post("/v1/chat/completions", json=body), 400, param=param)
    await still_serves(client)


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"", b'"text"'])
async def test_400_bad_body(client, raw):
    r = await client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert_envelope(r, 400)
    await still_serves(client)


async def test_401_missing_or_wrong_key(make_app):
    app = make_app(auth_enabled=True, api_keys={"sk-good", "sk-other"})
    async with asgi_client(app) as c:
        for headers in ({}, {"authorization": "Bearer sk-bad"}, {"authorization": "sk-good"},
                        {"authorization": "Basic sk-good"}):
            r = await c.post("/v1/completions", json=OK, headers=headers)
            err = assert_envelope(r, 401, code="invalid_api_key")
            assert "sk-" not in err["message"] and r.headers["www-authenticate"] == "Bearer"
            assert_envelope(await c.get("/v1/models", headers=headers), 401)
        assert (await c.get("/health")).status_code == 200  # probes stay open
        assert (await c.get("/metrics")).status_code == 200
        good = {"authorization": "Bearer sk-other"}
        assert (await c.post("/v1/completions", json=OK, headers=good)).status_code == 200
        assert (await c.get("/v1/models", headers=good)).status_code == 200


async def test_404_unknown_model_and_path(client):
    assert_envelope(await client.post("/v1/completions", json={**OK, "model": "gpt-4"}), 404, param="model",
                    code="model_not_found")
    assert_envelope(await client.post("/v1/chat/completions", json={"model": "x", "messages": [
        {"role": "user", "content": "x"}]}), 404, code="model_not_found")
    assert_envelope(await client.get("/v1/models/gpt-4"), 404)
    assert_envelope(await client.get("/v2/nothing"), 404)
    assert_envelope(await client.get("/v1/completions"), 405)
    await still_serves(client)


async def test_413_body_too_large(make_app):
    async with asgi_client(make_app(max_body_bytes=2048)) as c:
        big = {**OK, "prompt": "x" * 4096}
        assert_envelope(await c.post("/v1/completions", json=big), 413)

        async def chunked():  # no Content-Length: counted while reading
            for _ in range(8):
                yield b" " * 512
        r = await c.post("/v1/completions", content=chunked(), headers={"content-type": "application/json"})
        assert_envelope(r, 413)
        await still_serves(c)


async def test_413_prompt_tokens_over_the_replica_limit(client, fake):
    r = await client.post("/v1/completions", json={**OK, "prompt": list(range(1025))})
    assert_envelope(r, 413, param="prompt", code="context_length_exceeded")
    assert not fake.requests  # refused before reaching a replica
    await still_serves(client)


@pytest.mark.parametrize("status, retry_after", [(400, None), (413, None), (429, 7), (503, None)])
async def test_replica_errors_pass_through(client, fake, status, retry_after):
    fake.generate_error = ReplicaError(status, ErrorInfo(message="from replica", type="t", param="p", code="c"),
                                       retry_after=retry_after)
    r = await client.post("/v1/completions", json=OK)
    err = assert_envelope(r, status, param="p", code="c")
    assert err["message"] == "from replica"
    assert r.headers["x-nld-decoding-mode"] == "self_spec"  # decided, though nothing ran
    if status in (429, 503):
        assert r.headers["retry-after"] == str(retry_after or 1)
    fake.generate_error = None
    await still_serves(client)


async def test_429_gateway_inflight_limit(make_app, fake):
    fake.chunk_delay_s = 0.05
    async with asgi_client(make_app(max_inflight_requests=1)) as c:
        first = asyncio.ensure_future(c.post("/v1/completions", json={**OK, "max_tokens": 12, "decoding_mode": "ar"}))
        while not fake.streams:
            await asyncio.sleep(0.005)
        r = await c.post("/v1/completions", json=OK)
        assert_envelope(r, 429, code="overloaded")
        assert r.headers["retry-after"] == "1"
        assert (await first).status_code == 200
        await still_serves(c)


async def test_503_no_replica_and_not_ready(client, fake):
    fake.generate_error = ReplicaError(503, ErrorInfo(message="no replica", type="service_unavailable_error"))
    fake.healthy = False
    assert_envelope(await client.post("/v1/chat/completions", json={"model": "nld", "messages": [
        {"role": "user", "content": "x"}], "stream": True}), 503)
    r = await client.get("/ready")
    assert_envelope(r, 503) and r.headers["retry-after"] == "1"
    fake.generate_error, fake.healthy = None, True
    assert (await client.get("/ready")).status_code == 200
    await still_serves(client)


async def test_504_upstream_timeout(make_app, fake):
    fake.hang_s = 5.0
    async with asgi_client(make_app(request_timeout_s=0.1)) as c:
        for stream in (False, True):
            assert_envelope(await c.post("/v1/completions", json={**OK, "stream": stream}), 504,
                            code="upstream_timeout")
        fake.hang_s = 0.0
        await still_serves(c)


async def test_504_when_the_whole_non_streaming_request_is_too_slow(make_app, fake):
    fake.chunk_delay_s = 0.1
    async with asgi_client(make_app(request_timeout_s=0.25)) as c:
        assert_envelope(await c.post("/v1/completions", json={**OK, "max_tokens": 20, "decoding_mode": "ar"}), 504)
    assert all(s.aborted for s in fake.streams)


async def test_error_in_first_chunk_is_an_http_status(client, fake):
    fake.first_chunk_error = ErrorInfo(message="engine busy", type="rate_limit_error", code="overloaded")
    assert_envelope(await client.post("/v1/completions", json={**OK, "stream": True}), 429)
    fake.first_chunk_error = None
    await still_serves(client)


async def test_failure_after_streaming_began_is_an_error_event(client, fake):
    fake.error_after_chunks = 2
    r = await client.post("/v1/completions", json={**OK, "max_tokens": 10, "stream": True, "decoding_mode": "ar"})
    assert r.status_code == 200
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    err = events[-2]["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "server_error"
    assert len(events) == 4  # two chunks, the error, [DONE]
    fake.error_after_chunks = None
    await still_serves(client)


async def test_an_engine_failure_without_streaming_is_a_503_envelope(client, fake):
    fake.error_after_chunks = 1  # the engine fails after a step: the replica answers 503
    r = await client.post("/v1/completions", json={**OK, "max_tokens": 10, "n": 2, "decoding_mode": "ar"})
    assert_envelope(r, 503, code="engine_error")
    assert r.headers["retry-after"]
    assert all(s.closed for s in fake.streams)
    fake.error_after_chunks = None
    await still_serves(client)


async def test_unexpected_exception_is_a_500_envelope(make_app, fake):
    async def boom(request):
        raise RuntimeError("secret internals")
    fake.generate = boom
    async with asgi_client(make_app()) as c:
        err = assert_envelope(await c.post("/v1/completions", json=OK), 500)
        assert "secret" not in err["message"]
        assert (await c.get("/health")).status_code == 200
