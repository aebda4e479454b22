"""The real `openai` Python client against the gateway served by uvicorn on a loopback port,
with a fake replica backend: chat and completions, stream and not, usage chunk, n, stop,
decoding_mode through `extra_body`, the x-nld-decoding-mode header, and errors."""

from __future__ import annotations

import openai
import pytest

from gateway import GatewayConfig, create_app
from tests.gateway.fakes import FakeReplicaClient
from policies import FixedModePolicy

from .servers import serve_in_thread

KEY = "sk-test-key"
MSGS = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def backend():
    return FakeReplicaClient()


@pytest.fixture(scope="module")
def oai(backend):
    app = create_app(GatewayConfig(auth_enabled=True, api_keys={KEY}), backend, FixedModePolicy(mode="diffusion"))
    with serve_in_thread(app) as url:
        with openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=10) as client:
            yield client


def test_models(oai):
    assert [m.id for m in oai.models.list()] == ["nld"]


def test_chat_non_streaming_with_mode_header(oai, backend):
    raw = oai.chat.completions.with_raw_response.create(
        model="nld", messages=MSGS, max_completion_tokens=5, extra_body={"decoding_mode": "self_spec"})
    assert raw.headers["x-nld-decoding-mode"] == "self_spec"
    resp = raw.parse()
    assert resp.choices[0].message.role == "assistant" and resp.choices[0].message.content
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 5
    assert resp.usage.model_extra["forward_passes"] == 2
    assert resp.usage.model_extra["tokens_per_forward"] == 2.5
    assert backend.requests[-1].messages[0].content == "Say something."


def test_auto_mode_uses_the_policy(oai):
    raw = oai.completions.with_raw_response.create(model="nld", prompt="hi", max_tokens=3)
    assert raw.headers["x-nld-decoding-mode"] == "diffusion"
    assert raw.parse().usage.completion_tokens == 3


def test_completions_n_and_stop(oai, backend):
    resp = oai.completions.create(model="nld", prompt="hi", max_tokens=6, n=3, seed=5, stop=["\n", "never"],
                                  temperature=0.7, top_p=0.9, user="alice")
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert resp.usage.completion_tokens == 18
    sent = backend.requests[-3:]
    assert sorted(r.seed for r in sent) == [5, 6, 7]
    assert all(r.stop == ["\n", "never"] and r.temperature == 0.7 and r.top_p == 0.9 for r in sent)


def test_chat_streaming_with_usage_and_n(oai):
    raw = oai.chat.completions.with_raw_response.create(
        model="nld", messages=MSGS, stream=True, n=2, max_tokens=7, stream_options={"include_usage": True},
        extra_body={"decoding_mode": "ar"})
    assert raw.headers["x-nld-decoding-mode"] == "ar"
    chunks = list(raw.parse())
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens == 14
    assert usage.usage.model_extra["forward_passes"] == 14
    texts = {0: "", 1: ""}
    finish = {}
    for c in chunks[:-1]:
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert all(texts.values()) and finish == {0: "length", 1: "length"}


def test_completions_streaming_with_stop(oai):
    full = oai.completions.create(model="nld", prompt="abc", max_tokens=8, temperature=0).choices[0].text
    stop = full.split()[2]
    stream = oai.completions.create(model="nld", prompt="abc", max_tokens=8, temperature=0, stop=stop, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert stop not in text and full.startswith(text)


def test_errors_map_to_openai_exceptions(oai, backend):
    with pytest.raises(openai.NotFoundError) as e:
        oai.completions.create(model="gpt-4", prompt="x")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="nld", messages=MSGS, temperature=3)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=str(oai.base_url), api_key="wrong", max_retries=0).models.list()


def test_error_after_streaming_began_raises_in_the_client(oai, backend):
    backend.error_after_chunks = 2
    try:
        with pytest.raises(openai.APIError, match="engine failed"):
            for _ in oai.completions.create(model="nld", prompt="x", max_tokens=10, stream=True,
                                            extra_body={"decoding_mode": "ar"}):
                pass
    finally:
        backend.error_after_chunks = None
