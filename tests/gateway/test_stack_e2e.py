"""The whole stack on loopback: the real `openai` client -> gateway (uvicorn) -> Ray Serve
proxy (first) or the replicas' own ports (direct routes, the default) -> NLD replicas. No fakes."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from gateway.app import create_app
from gateway.config import GatewayConfig
from gateway.bootstrap import build_replica_client
from gateway.metrics import GatewayMetrics, InflightCounter
from policies import FixedModePolicy

from .servers import serve_in_thread, sse_events

pytestmark = pytest.mark.slow


def gateway(replica_url: str, **config):
    cfg = GatewayConfig(replica_url=replica_url, model_name="nld-test", **config)
    metrics = GatewayMetrics(InflightCounter())  # the default client: direct to the replicas' own ports
    return serve_in_thread(create_app(cfg, build_replica_client(cfg, metrics), FixedModePolicy(mode="self_spec"),
                                      metrics=metrics))


@pytest.fixture(scope="module")
def gw(serve_stack):
    with gateway(serve_stack.url) as url:
        yield url


@pytest.fixture(scope="module")
def client(gw):
    return openai.OpenAI(base_url=gw + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_chat_and_completions_with_and_without_streaming(client):
    chat = client.chat.completions.create(model="nld-test", messages=[{"role": "user", "content": "hello"}],
                                          max_tokens=16, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens >= 1
    comp = client.completions.create(model="nld-test", prompt="def f(x):", max_tokens=16, temperature=0)
    assert comp.choices[0].finish_reason in ("stop", "length")
    stream = client.chat.completions.create(model="nld-test", messages=[{"role": "user", "content": "hello"}],
                                            max_tokens=16, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    extra = chunks[-1].usage.model_extra
    assert extra["forward_passes"] >= 1 and extra["tokens_per_forward"] > 0


def test_each_decoding_mode_is_honoured_and_reported(client):
    texts = {}
    for mode in ("ar", "diffusion", "self_spec"):
        raw = client.completions.with_raw_response.create(
            model="nld-test", prompt="import os\n", max_tokens=24, temperature=0, extra_body={"decoding_mode": mode})
        assert raw.headers["x-nld-decoding-mode"] == mode
        comp = raw.parse()
        texts[mode] = comp.choices[0].text
        assert comp.usage.model_extra["forward_passes"] >= 1
    assert texts["self_spec"] == texts["ar"]
    auto = client.completions.with_raw_response.create(model="nld-test", prompt="x", max_tokens=4)
    assert auto.headers["x-nld-decoding-mode"] == "self_spec"  # the fixed policy's mode


def test_n_and_stop(client):
    comp = client.completions.create(model="nld-test", prompt="x", max_tokens=12, n=3, temperature=1.0, seed=7)
    assert sorted(c.index for c in comp.choices) == [0, 1, 2]
    base = client.completions.create(model="nld-test", prompt="y", max_tokens=30, temperature=0,
                                     extra_body={"ignore_eos": True, "decoding_mode": "ar"}).choices[0].text
    if len(base) > 6:
        stop = base[4:6]
        cut = client.completions.create(model="nld-test", prompt="y", max_tokens=30, temperature=0, stop=[stop],
                                        extra_body={"decoding_mode": "ar"})
        assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == base[: base.find(stop)]


def envelope(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["message"]
    return err


def test_error_statuses_use_the_envelope_and_the_stack_keeps_serving(gw, serve_stack, client):
    body = {"model": "nld-test", "prompt": "x", "max_tokens": 4}
    assert envelope(httpx.post(gw + "/v1/completions", json={**body, "temperature": -1}), 400)["param"] == "temperature"
    envelope(httpx.post(gw + "/v1/completions", json={**body, "model": "nope"}), 404)
    envelope(httpx.post(gw + "/v1/completions", content=b"x" * (2 << 20),
                        headers={"content-type": "application/json"}), 413)
    err = envelope(httpx.post(gw + "/v1/completions", json={**body, "prompt": "x" * 400}), 400)
    assert err["code"] == "context_length_exceeded"
    with gateway(serve_stack.url, auth_enabled=True, api_keys=frozenset({"k1"})) as authed:
        envelope(httpx.post(authed + "/v1/completions", json=body), 401)
        envelope(httpx.post(authed + "/v1/completions", json=body, headers={"Authorization": "Bearer no"}), 401)
        assert httpx.post(authed + "/v1/completions", json=body, headers={"Authorization": "Bearer k1"}).status_code == 200
    with gateway("http://127.0.0.1:9", connect_timeout_s=1) as dead:
        envelope(httpx.post(dead + "/v1/completions", json=body, timeout=30), 503)
    with gateway(serve_stack.url, request_timeout_s=0.05) as impatient:
        # 200 tokens, one per denoise pass, and no early end at an EOS: far longer than 50 ms
        envelope(httpx.post(impatient + "/v1/completions",
                            json={**body, "max_tokens": 200, "decoding_mode": "diffusion",
                                  "confidence_threshold": 1.0, "ignore_eos": True}, timeout=30), 504)
    assert client.completions.create(model="nld-test", prompt="still here", max_tokens=4).choices


def test_errors_speak_the_api_on_the_real_stack(gw):
    """The replica's own errors, relayed: API field names, a code on each, one error for the
    context length whatever the prompt's kind; chat content may be null; lone surrogates are a
    400; every refusal counted. (The stack's replica: max_seq_len 256, block 8.)"""
    import re

    def counted_400() -> float:
        text = httpx.get(gw + "/metrics").text
        return sum(float(v) for v in re.findall(r'nld_gateway_requests_total\{mode="[^"]+",status="400"\} ([0-9.]+)',
                                                text))

    before = counted_400()
    post = lambda body, path="/v1/completions": httpx.post(gw + path, json=body, timeout=60)  # noqa: E731
    body = {"model": "nld-test", "max_tokens": 4}
    err = envelope(post({**body, "prompt": ""}), 400)  # encodes to no token: the engine refuses it
    assert err["param"] == "prompt" and err["code"] == "invalid_value" and "prompt_ids" not in err["message"]
    for prompt in ("x" * 200, list(range(1, 201))):  # text (the replica counts) and ids (the gateway does)
        err = envelope(post({**body, "prompt": prompt, "max_tokens": 100}), 400)
        assert (err["param"], err["code"]) == ("max_tokens", "context_length_exceeded"), err
        assert "max_new_tokens" not in err["message"]
    for prompt in ("x" * 400, list(range(1, 301))):
        err = envelope(post({**body, "prompt": prompt}), 400)
        assert (err["param"], err["code"]) == ("prompt", "context_length_exceeded"), err
    err = envelope(post({**body, "prompt": "x", "max_tokens": 4096}), 400)  # the schema's maximum
    assert (err["param"], err["code"]) == ("max_tokens", "context_length_exceeded")
    err = envelope(post({**body, "prompt": "x", "block_length": 64}), 400)
    assert (err["param"], err["code"]) == ("block_length", "invalid_value")
    chat = {**body, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None},
                                 {"role": "tool"}, {"role": "user", "content": None}]}
    assert post(chat, "/v1/chat/completions").status_code == 200
    for path, raw in (("/v1/completions", rb'{"model": "nld-test", "prompt": "x\ud800y"}'),
                      ("/v1/chat/completions", rb'{"model": "nld-test", "messages": [{"role": "user", '
                                               rb'"content": "x\ud800y"}]}')):
        envelope(httpx.post(gw + path, content=raw, headers={"content-type": "application/json"}), 400)
    assert counted_400() - before == 9  # every 400 above


@pytest.fixture(scope="module")
def tight(serve_stack, serve_model_dir):
    from ray import serve

    from replicas.app import bind_app

    config = {"model_path": str(serve_model_dir), "torch_threads": 1,
              "engine": {"max_batch_size": 1, "max_seq_len": 4096, "max_waiting": 0}}
    serve.run(bind_app(config, {"ray_actor_options": {"num_cpus": 1}}), name="tight-gw", route_prefix="/tight-gw")
    with gateway(serve_stack.url + "/tight-gw") as url:
        yield serve_stack.url + "/tight-gw", url
    serve.delete("tight-gw")


def test_overload_is_429_with_retry_after_and_disconnect_frees_the_replica(tight):
    replica, gw = tight
    body = {"model": "nld-test", "prompt": "x", "max_tokens": 4000, "stream": True,
            "decoding_mode": "ar", "ignore_eos": True}
    with httpx.Client(timeout=60) as c, c.stream("POST", gw + "/v1/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        next(lines)
        busy = httpx.post(gw + "/v1/completions", json={"model": "nld-test", "prompt": "x", "max_tokens": 4})
        envelope(busy, 429)
        assert busy.headers["retry-after"]
    # the client went away mid-stream: the replica request is aborted and its KV freed
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and httpx.get(replica + "/stats").json()["kv_slots_used"]:
        time.sleep(0.1)
    stats = httpx.get(replica + "/stats").json()
    assert stats["kv_slots_used"] == 0 and stats["generated_tokens"] < 4000


def test_killing_a_replica_ends_streams_cleanly_and_serve_restarts_it(tight):
    import ray

    replica, gw = tight
    body = {"model": "nld-test", "prompt": "x", "max_tokens": 4000, "stream": True,
            "decoding_mode": "ar", "ignore_eos": True}
    with httpx.Client(timeout=60) as c, c.stream("POST", gw + "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        next(lines)
        actors = [a for a in ray.util.list_named_actors(all_namespaces=True) if "tight-gw" in a["name"]
                  and "NLDReplica" in a["name"]]
        assert actors
        ray.kill(ray.get_actor(actors[0]["name"], namespace=actors[0]["namespace"]), no_restart=True)
        rest = [line for line in lines if line]
    events = sse_events("\n\n".join(rest) + "\n\n")
    assert events[-1] == "[DONE]" and "error" in events[-2]
    assert set(events[-2]["error"]) >= {"message", "type", "param", "code"}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        r = httpx.post(gw + "/v1/completions", json={"model": "nld-test", "prompt": "x", "max_tokens": 4}, timeout=30)
        if r.status_code == 200:
            break
        time.sleep(1)
    assert r.status_code == 200 and json.loads(r.text)["choices"]
