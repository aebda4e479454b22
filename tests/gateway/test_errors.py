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
    ({"model": "nld", "prompt": "x", "block_length": 64}, "block_length"),  # over the replicas' limit (32)
    ({"model": "nld", "prompt": "x", "seed": "1"}, "seed"),
    ({"model": "nld", "prompt": "x", "echo": True}, "echo"),
    ({"model": "nld", "prompt": "x", "logprobs": 2}, "logprobs"),
    ({"model": "nld", "prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
    ({"model": "nld", "prompt": [-1]}, "prompt[0]"),  # the element at fault
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


async def test_context_length_is_one_400_for_every_prompt_kind(client, fake):
    """Token ids over the replicas' limit (checked at the gateway), and a text prompt the replica
    finds too long, give the same error: 400 `context_length_exceeded` naming `prompt`."""
    r = await client.post("/v1/completions", json={**OK, "prompt": list(range(1025))})
    assert_envelope(r, 400, param="prompt", code="context_length_exceeded")
    assert not fake.requests  # refused before reaching a replica
    fake.generate_error = ReplicaError(400, ErrorInfo(  # what the replica answers for a long text prompt
        message="the prompt has 1500 tokens; this model accepts at most 1024", type="invalid_request_error",
        param="prompt", code="context_length_exceeded"))
    r = await client.post("/v1/completions", json={**OK, "prompt": "long " * 1500})
    assert_envelope(r, 400, param="prompt", code="context_length_exceeded")
    fake.generate_error = ReplicaError(413, ErrorInfo(message="too long", type="invalid_request_error"))
    assert_envelope(await client.post("/v1/completions", json=OK), 400, code="context_length_exceeded")
    fake.generate_error = None
    await still_serves(client)


@pytest.mark.parametrize("body", [
    {**OK, "max_tokens": 4096},  # the schema's own maximum (max_tokens_limit), over the context of 2048
    {**OK, "max_completion_tokens": 2040},  # 1 prompt token + 2040 + one block of 16 > 2048
    {**OK, "prompt": list(range(100)), "max_tokens": 1940},  # 100 + 1940 + 16 > 2048
    {"model": "nld", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4096},
])
async def test_max_tokens_beyond_the_context_is_context_length_exceeded(client, fake, body):
    err = assert_envelope(await (client.post("/v1/chat/completions" if "messages" in body else "/v1/completions",
                                             json=body)), 400, code="context_length_exceeded")
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    assert err["param"] == name and name in err["message"] and "2048" in err["message"]
    assert "max_new_tokens" not in err["message"] and not fake.requests
    await still_serves(client)


async def test_a_prompt_that_fits_with_its_max_tokens_is_sent():
    """The check uses the prompt's own length (token ids) and the request's block length."""
    from gateway import GatewayConfig, create_app
    from tests.gateway.fakes import FakeReplicaClient
    from policies import FixedModePolicy

    fake = FakeReplicaClient()
    async with asgi_client(create_app(GatewayConfig(), fake, FixedModePolicy())) as c:
        ok = {**OK, "prompt": list(range(100)), "max_tokens": 1932}  # 100 + 1932 + 16 = 2048
        assert (await c.post("/v1/completions", json=ok)).status_code == 200
        assert_envelope(await c.post("/v1/completions", json={**ok, "block_length": 17}), 400,
                        code="context_length_exceeded")


@pytest.mark.parametrize("info, status, param, code, message", [
    # the engine's words, relayed by the replica: the client sees the API's
    (ErrorInfo(message="prompt_ids: the prompt is empty", type="invalid_request_error", param="prompt_ids"),
     400, "prompt", "invalid_value", "prompt: the prompt is empty"),
    (ErrorInfo(message="max_new_tokens: prompt (9) + max_new_tokens (2040) + one block (16) exceeds the engine's "
                       "max_seq_len (2048)", type="invalid_request_error", param="max_tokens"),
     400, "max_tokens", "context_length_exceeded", "max_tokens: prompt (9) + max_tokens (2040)"),
    (ErrorInfo(message="messages.0.content: Input should be a valid string", type="invalid_request_error",
               param="messages.0.content"), 400, "messages[0].content", "invalid_value", "messages.0.content"),
    (ErrorInfo(message="block_length: 64 is above the configured limit 32", type="invalid_request_error",
               param="block_length"), 400, "block_length", "invalid_value", "block_length: 64"),
    (ErrorInfo(message="the chat template failed", type="invalid_request_error", param="messages"),
     400, "messages", "invalid_value", "the chat template failed"),
    (ErrorInfo(message="queue full", type="overloaded_error"), 429, None, "overloaded", "queue full"),
    (ErrorInfo(message="engine down", type="server_error"), 503, None, "no_replica", "engine down"),
])
async def test_relayed_errors_speak_the_api_and_carry_a_code(client, fake, info, status, param, code, message):
    fake.generate_error = ReplicaError(status, info)
    err = assert_envelope(await client.post("/v1/completions", json=OK), status, param=param, code=code)
    assert err["message"].startswith(message) and "prompt_ids" not in err["message"]
    assert "max_new_tokens" not in err["message"]
    fake.generate_error = None
    await still_serves(client)


async def test_errors_in_a_chunk_carry_a_code(client, fake):
    fake.first_chunk_error = ErrorInfo(message="bad", type="invalid_request_error")
    assert_envelope(await client.post("/v1/completions", json=OK), 400, code="invalid_value")
    fake.first_chunk_error = None
    fake.error_after_chunks = 1
    events = sse_events((await client.post("/v1/completions", json={**OK, "max_tokens": 8, "stream": True,
                                                                     "decoding_mode": "ar"})).text)
    assert events[-2]["error"]["code"] == "engine_error"  # the fake's own code
    fake.error_after_chunks = None


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


SURROGATE_BODIES = [  # raw JSON: a lone surrogate escape is valid JSON (JavaScript clients send it)
    ("/v1/completions", rb'{"model": "nld", "prompt": "x\ud800y"}', "prompt"),
    ("/v1/completions", rb'{"model": "nld", "prompt": ["ok", "x\udfffy"]}', "prompt[1]"),
    ("/v1/completions", rb'{"model": "nld", "prompt": "x", "stop": ["\ud83d"]}', "stop[0]"),
    ("/v1/chat/completions", rb'{"model": "nld", "messages": [{"role": "user", "content": "x\ud800y"}]}',
     "messages[0].content"),
    ("/v1/chat/completions", rb'{"model": "nld", "messages": [{"role": "user", "content": '
                             rb'[{"type": "text", "text": "\udc00"}]}]}', "messages[0].content[0].text"),
    ("/v1/chat/completions", rb'{"model": "nld", "messages": [{"role": "user", "content": "x", "name": "\ud800"}]}',
     "messages[0].name"),
]


@pytest.mark.parametrize("path, raw, param", SURROGATE_BODIES)
async def test_lone_surrogates_are_a_400_naming_the_field(client, fake, path, raw, param):
    for stream in (False, True):
        body = raw[:-1] + (b', "stream": true}' if stream else b"}")
        r = await client.post(path, content=body, headers={"content-type": "application/json"})
        err = assert_envelope(r, 400, param=param, code="invalid_value")
        assert "surrogate" in err["message"]
    assert not fake.requests
    await still_serves(client)


async def test_a_whole_surrogate_pair_is_fine(client, fake):
    r = await client.post("/v1/completions", content=rb'{"model": "nld", "prompt": "x\ud83d\ude00y", "max_tokens": 2}',
                          headers={"content-type": "application/json"})
    assert r.status_code == 200 and fake.requests[0].prompt == "x\U0001F600y"


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": None}],
    [{"role": "user", "content": "hi"}, {"role": "assistant"}, {"role": "tool", "content": None},
     {"role": "user", "content": "and?"}],
])
async def test_null_or_absent_content_reaches_the_replica_as_empty_text(client, fake, messages):
    r = await client.post("/v1/chat/completions", json={"model": "nld", "messages": messages, "max_tokens": 2})
    assert r.status_code == 200, r.text
    sent = fake.requests[-1].messages
    assert [m.content for m in sent] == [m.get("content") or "" for m in messages]


async def test_every_completion_error_is_counted(make_app):
    """Validation 400s (FastAPI's), the gateway's own 400/404, 405 and 413 all reach
    nld_gateway_requests_total, as the successful requests do."""
    import re

    async with asgi_client(make_app(max_body_bytes=2048)) as c:
        sent = {"400": 0, "404": 0, "405": 0, "413": 0, "200": 0}
        for body in ({"model": "nld", "prompt": "x", "temperature": 9}, {"model": "nld"}, {"prompt": "x"},
                     {"model": "nld", "prompt": "x", "n": 99}, {"model": "nld", "prompt": "x", "echo": True},
                     {"model": "nld", "prompt": "x", "max_tokens": 4096}):
            assert (await c.post("/v1/completions", json=body)).status_code == 400
            sent["400"] += 1
        for raw in (b"{not json", b"", b"[1]"):
            assert (await c.post("/v1/chat/completions", content=raw,
                                 headers={"content-type": "application/json"})).status_code == 400
            sent["400"] += 1
        assert (await c.post("/v1/chat/completions", json={"model": "nld", "messages": []})).status_code == 400
        sent["400"] += 1
        assert (await c.post("/v1/completions", json={"model": "gpt", "prompt": "x"})).status_code == 404
        sent["404"] += 1
        assert (await c.get("/v1/completions")).status_code == 405
        sent["405"] += 1
        assert (await c.post("/v1/completions", json={"model": "nld", "prompt": "x" * 4096})).status_code == 413
        sent["413"] += 1
        assert (await c.post("/v1/completions", json=OK)).status_code == 200
        sent["200"] += 1
        assert (await c.get("/v2/elsewhere")).status_code == 404  # not a completion request: not counted
        text = (await c.get("/metrics")).text
    counted = {}
    for status, value in re.findall(r'nld_gateway_requests_total\{mode="[^"]+",status="(\d+)"\} ([0-9.]+)', text):
        counted[status] = counted.get(status, 0) + int(float(value))
    assert counted == sent
