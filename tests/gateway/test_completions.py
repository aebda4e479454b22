"""Completions and chat completions over a fake replica client: non-streaming and SSE formats,
usage (with NLD's forward_passes / tokens_per_forward), n, stop, extension fields, headers."""

from __future__ import annotations

import json

import pytest

from tests.gateway.fakes import fake_chunks
from replicas.wire import GenerateRequest

from .servers import asgi_client, sse_events

pytestmark = pytest.mark.anyio

CHAT = {"model": "nld", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}


async def test_models(client):
    r = await client.get("/v1/models")
    assert r.status_code == 200
    assert [m["id"] for m in r.json()["data"]] == ["nld"]
    assert (await client.get("/v1/models/nld")).json()["object"] == "model"


async def test_completion_non_streaming(client, fake):
    r = await client.post("/v1/completions", json={"model": "nld", "prompt": "hello", "max_tokens": 6,
                                                   "temperature": 0, "seed": 7})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert r.headers["x-nld-decoding-mode"] == "self_spec"  # the fixed policy's mode for `auto`
    assert r.headers["x-request-id"] == body["id"]
    [choice] = body["choices"]
    expected = fake_chunks(fake.requests[0])
    assert choice["text"] == "".join(c.text for c in expected)
    assert choice["finish_reason"] == "length"
    u = body["usage"]
    assert (u["completion_tokens"], u["forward_passes"]) == (6, 2)  # self_spec fake: 4 tokens per forward
    assert u["tokens_per_forward"] == 3.0 and u["total_tokens"] == u["prompt_tokens"] + 6
    sent = fake.requests[0]
    assert (sent.prompt, sent.max_tokens, sent.temperature, sent.seed, sent.mode) == ("hello", 6, 0.0, 7, "self_spec")
    assert sent.stream is False  # the replica answers in one message
    assert len(fake.streams[0].chunks) == 1


async def test_chat_non_streaming_sends_messages_for_the_template(client, fake):
    body = {**CHAT, "messages": CHAT["messages"] + [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                                 {"type": "text", "text": "b"}]}],
            "max_completion_tokens": 3, "decoding_mode": "ar", "user": "u1", "unknown_field": 1}
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["object"] == "chat.completion"
    assert data["choices"][0]["message"]["role"] == "assistant"
    assert r.headers["x-nld-decoding-mode"] == "ar" and r.headers["x-nld-mode-reason"] == "client"
    sent = fake.requests[0]
    assert sent.prompt is None and sent.add_generation_prompt
    assert [(m.role, m.content) for m in sent.messages] == [("system", "be brief"), ("user", "hi"), ("user", "ab")]
    assert sent.max_tokens == 3 and data["usage"]["forward_passes"] == 3


async def test_extension_fields_reach_the_replica(client, fake):
    r = await client.post("/v1/completions", json={
        "model": "nld", "prompt": [1, 2, 3], "decoding_mode": "diffusion", "block_length": 8,
        "confidence_threshold": 0.7, "draft_lora": False, "denoise_lora": False, "stop": "x", "top_p": 0.5,
        "max_tokens": 2, "top_k": 5, "ignore_eos": True})
    assert r.status_code == 200, r.text
    sent = fake.requests[0]
    assert (sent.top_k, sent.ignore_eos, sent.denoise_lora) == (5, True, False)
    assert (sent.prompt_ids, sent.mode, sent.block_length, sent.threshold, sent.draft_lora, sent.stop, sent.top_p) == (
        [1, 2, 3], "diffusion", 8, 0.7, False, ["x"], 0.5)
    assert r.headers["x-nld-decoding-mode"] == "diffusion"


async def test_max_completion_tokens_wins_and_defaults(client, fake):
    await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 5, "max_completion_tokens": 2})
    await client.post("/v1/chat/completions", json=CHAT)
    assert [r.max_tokens for r in fake.requests] == [2, 256]
    assert fake.requests[1].temperature == 1.0  # OpenAI's default


async def test_n_fans_out_with_consecutive_seeds(client, fake):
    r = await client.post("/v1/completions", json={"model": "nld", "prompt": "p", "n": 3, "seed": 10, "max_tokens": 4})
    assert r.status_code == 200
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    assert sorted(q.seed for q in fake.requests) == [10, 11, 12]
    assert len({c["text"] for c in choices}) == 3
    u = r.json()["usage"]
    assert u["completion_tokens"] == 12 and u["prompt_tokens"] == 1  # prompt counted once


async def test_list_of_prompts(client, fake):
    r = await client.post("/v1/completions", json={"model": "nld", "prompt": ["a b", "c"], "n": 2, "max_tokens": 1})
    assert [c["index"] for c in r.json()["choices"]] == [0, 1, 2, 3]
    assert [q.prompt for q in sorted(fake.requests, key=lambda q: q.request_id)] == ["a b", "a b", "c", "c"]
    assert r.json()["usage"]["prompt_tokens"] == 3


async def test_stop_strings(client, fake):
    probe = GenerateRequest(prompt="s", max_tokens=8, mode="self_spec", request_id="x-0")
    full = "".join(c.text for c in fake_chunks(probe))
    stop = full.split()[3]  # the fourth word
    r = await client.post("/v1/completions", json={"model": "nld", "prompt": "s", "max_tokens": 8, "stop": [stop, "zz"]})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and stop not in choice["text"] and full.startswith(choice["text"])
    assert fake.requests[0].stop == [stop, "zz"]


async def test_completion_stream_format_with_usage(client):
    r = await client.post("/v1/completions", json={"model": "nld", "prompt": "x", "max_tokens": 9, "stream": True,
                                                   "stream_options": {"include_usage": True}, "decoding_mode": "ar"})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["x-nld-decoding-mode"] == "ar"
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert len(chunks) == 9  # ar: one token per chunk
    assert all(c["object"] == "text_completion" and c["choices"][0]["index"] == 0 for c in chunks)
    assert all(c["usage"] is None for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 8 + ["length"]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 9
    assert usage["usage"]["forward_passes"] == 9 and usage["usage"]["tokens_per_forward"] == 1.0
    assert len({c["id"] for c in events[:-1]}) == 1


async def test_chat_stream_n_and_stop(client, fake):
    r = await client.post("/v1/chat/completions", json={**CHAT, "stream": True, "n": 2, "seed": 1, "max_tokens": 12,
                                                        "stop": "never"})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]" and all("usage" not in e for e in events[:-1])  # no include_usage
    by_index: dict[int, list] = {0: [], 1: []}
    for e in events[:-1]:
        [choice] = e["choices"]
        assert e["object"] == "chat.completion.chunk"
        by_index[choice["index"]].append(choice)
    for index, choices in by_index.items():
        assert choices[0]["delta"]["role"] == "assistant"
        assert all("role" not in c["delta"] for c in choices[1:])
        assert choices[-1]["finish_reason"] == "length"
        text = "".join(c["delta"].get("content", "") for c in choices)
        req = next(q for q in fake.requests if q.request_id.endswith(f"-{index}"))
        assert text == "".join(c.text for c in fake_chunks(req))


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"model": "nld", "prompt": ["a", "b"], "n": 2, "max_tokens": 9, "seed": 3,
                         "stream_options": {"include_usage": True}}),
    ("/v1/chat/completions", {**CHAT, "n": 2, "max_tokens": 11, "stop": "never", "decoding_mode": "self_spec"}),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 7, "decoding_mode": "ar", "stream_options": {"include_usage": True}}),
])
async def test_events_rendered_by_the_replica_are_the_events_the_gateway_would_render(make_app, fake, path, body):
    """The replica renders the middle chunks (`GenerateRequest.sse`) and the gateway forwards
    them: the client sees the same events as when the gateway renders every chunk itself."""
    texts = {}
    for render_sse in (True, False):
        fake.render_sse = render_sse
        async with asgi_client(make_app()) as c:
            r = await c.post(path, json={**body, "stream": True})
        assert r.status_code == 200
        texts[render_sse] = r.text
    assert all(q.sse is not None and q.sse.index == int(q.request_id.rsplit("-", 1)[1]) for q in fake.requests)
    forwarded = [s for s in fake.streams[:len(fake.streams) // 2] for c in s.chunks if type(c) is bytes]
    assert forwarded  # the first run did forward ready events
    same = [{**e, "id": "x", "created": 0} if isinstance(e, dict) else e for e in sse_events(texts[True])]
    other = [{**e, "id": "x", "created": 0} if isinstance(e, dict) else e for e in sse_events(texts[False])]
    assert same == other


async def test_stream_stop_ends_with_stop_reason(client, fake):
    probe = GenerateRequest(prompt="s", max_tokens=8, mode="ar", request_id="x-0")
    stop = "".join(c.text for c in fake_chunks(probe)).split()[2]
    r = await client.post("/v1/completions", json={"model": "nld", "prompt": "s", "max_tokens": 8, "stop": stop,
                                                   "stream": True, "decoding_mode": "ar"})
    events = sse_events(r.text)
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    assert stop not in "".join(e["choices"][0]["text"] for e in events[:-1])


async def test_top_p_zero_means_greedy(client, fake):
    await client.post("/v1/completions", json={"model": "nld", "prompt": "s", "top_p": 0, "temperature": 0.8})
    assert (fake.requests[0].temperature, fake.requests[0].top_p) == (0.0, 1.0)


async def test_seed_range(client, fake):
    await client.post("/v1/completions", json={"model": "nld", "prompt": "s", "seed": -(2**53 - 1), "n": 2})
    assert sorted(q.seed for q in fake.requests) == [-(2**53 - 1), -(2**53 - 2)]
    r = await client.post("/v1/completions", json={"model": "nld", "prompt": "s", "seed": 2**63 - 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed"


async def test_health_ready_metrics(make_app, fake):
    async with asgi_client(make_app()) as c:
        assert (await c.get("/health")).json() == {"status": "ok"}
        assert (await c.get("/ready")).status_code == 200
        await c.post("/v1/completions", json={"model": "nld", "prompt": "s", "max_tokens": 1})
        await c.post("/v1/completions", json={"model": "nope", "prompt": "s"})
        text = (await c.get("/metrics")).text
    assert 'nld_gateway_requests_total{mode="self_spec",status="200"} 1.0' in text
    assert 'nld_gateway_requests_total{mode="none",status="404"} 1.0' in text
    assert 'nld_gateway_request_seconds_count{mode="self_spec"} 1.0' in text
    assert 'nld_gateway_time_to_first_token_seconds_count{mode="self_spec"} 1.0' in text
    assert "nld_gateway_inflight_requests 0.0" in text


async def test_each_app_has_its_own_registry(make_app):
    a, b = make_app(), make_app()
    async with asgi_client(a) as ca, asgi_client(b) as cb:
        await ca.post("/v1/completions", json={"model": "nld", "prompt": "s", "max_tokens": 1})
        assert "status=\"200\"" not in (await cb.get("/metrics")).text


async def test_self_spec_algorithm_is_forwarded_and_reported(client, fake):
    body = {"model": "nld", "prompt": "x", "max_tokens": 5, "decoding_mode": "self_spec"}
    r = await client.post("/v1/completions", json={**body, "self_spec_algorithm": "quadratic"})
    assert r.status_code == 200, r.text
    assert fake.requests[-1].self_spec_algorithm == "quadratic"
    assert r.json()["usage"]["self_spec_algorithm"] == "quadratic"
    r = await client.post("/v1/completions", json=body)  # none asked: the replica's default ran
    assert fake.requests[-1].self_spec_algorithm is None and r.json()["usage"]["self_spec_algorithm"] == "linear"
    r = await client.post("/v1/completions", json={**body, "decoding_mode": "ar", "self_spec_algorithm": "quadratic"})
    assert r.json()["usage"]["self_spec_algorithm"] is None  # no self_spec cycle ran
    r = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 4, "stream": True,
                                                        "stream_options": {"include_usage": True},
                                                        "self_spec_algorithm": "quadratic"})
    assert sse_events(r.text)[-2]["usage"]["self_spec_algorithm"] == "quadratic"
    r = await client.post("/v1/completions", json={**body, "self_spec_algorithm": "cubic"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "self_spec_algorithm" and err["type"] == "invalid_request_error"


async def test_the_policy_level_names_the_algorithm_and_the_client_overrides_it(make_app, fake):
    from policies import FixedModePolicy

    async with asgi_client(make_app(FixedModePolicy(mode="self_spec", spec_algorithm="quadratic"))) as c:
        r = await c.post("/v1/completions", json={"model": "nld", "prompt": "x", "max_tokens": 3})
        assert fake.requests[-1].self_spec_algorithm == "quadratic"
        assert r.json()["usage"]["self_spec_algorithm"] == "quadratic"
        await c.post("/v1/completions", json={"model": "nld", "prompt": "x", "max_tokens": 3,
                                              "self_spec_algorithm": "linear"})
        assert fake.requests[-1].self_spec_algorithm == "linear"
        await c.post("/v1/completions", json={"model": "nld", "prompt": "x", "max_tokens": 3, "decoding_mode": "ar"})
        assert fake.requests[-1].self_spec_algorithm is None  # an ar decision carries no algorithm


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("include_usage", [False, True])
def test_a_replica_rendered_event_is_byte_for_byte_the_gateways_own(chat, include_usage):
    from gateway import render
    from gateway.plan import Plan
    from gateway.sse import event
    from replicas.wire import GenerateChunk, SSERender

    plan = Plan(id="cmpl-9", created=42, chat=chat, model="nld", mode="ar", reason="client", n=1, requests=[],
                stream=True, include_usage=include_usage)
    base = {"id": plan.id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": plan.created, "model": plan.model}
    text = ' déjà "vu"\n\t\\'
    ours = event(render.stream_chunk(plan, base, 2, GenerateChunk(request_id="r", mode="ar", text=text), [None] * 3,
                                     {2}))  # choice 2 already started: no role
    head, tail = SSERender(id="cmpl-9", created=42, model="nld", index=2, chat=chat,
                           include_usage=include_usage).event_parts()
    assert head + json.dumps(text).encode() + tail == ours
