"""`NLDReplica`'s wire, error, cancel, health and settings logic in-process: a fake engine, no
Ray, no weights (the real stack is in test_serve.py)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from replicas.app import NLDReplica
from replicas.engine.errors import EngineOverloaded
from replicas.wire import GenerateChunk

from .fakes import FakeAsyncEngine, RecordingMetrics, asgi

MODEL = Path(__file__).resolve().parents[2] / "models" / "nld-tiny-pystdlib"


def make(engine_kw=None, **config):
    engines: list[FakeAsyncEngine] = []

    def factory(cfg):
        engines.append(FakeAsyncEngine(cfg.model_path, **(engine_kw or {})))
        return engines[0]

    metrics = RecordingMetrics()
    replica = NLDReplica({"model_path": str(MODEL), "model_name": "m", **config}, engine_factory=factory,
                         metrics=metrics)
    return replica, engines[0], metrics


async def post(replica, body: dict) -> httpx.Response:
    transport = httpx.ASGITransport(app=asgi(replica))
    async with httpx.AsyncClient(transport=transport, base_url="http://replica") as client:
        return await client.post("/generate", json=body)


def test_a_non_streaming_request_is_one_message_with_metrics_recorded_once():
    replica, engine, metrics = make({"tokens_per_step": 1})
    r = asyncio.run(post(replica, {"prompt_ids": [5], "max_tokens": 12, "stream": False}))
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    one = GenerateChunk.model_validate_json(r.text)
    assert one.token_ids == engine.script[:12] and one.finish_reason == "length"
    assert one.text == replica.codec.decode(one.token_ids)
    assert (one.usage.completion_tokens, one.usage.forward_passes) == (12, 12)
    # one record per request, none per token (12 steps ran)
    assert sorted(metrics.kinds()) == ["first_token", "inter_token", "request"]


def test_a_streaming_request_is_ndjson_whose_tokens_and_text_add_up():
    replica, engine, metrics = make({"tokens_per_step": 2})
    r = asyncio.run(post(replica, {"prompt_ids": [5], "max_tokens": 10}))
    chunks = [GenerateChunk.model_validate_json(line) for line in r.text.splitlines()]
    assert r.headers["content-type"].startswith("application/x-ndjson") and len(chunks) > 1
    tokens = [t for c in chunks for t in c.token_ids]
    assert tokens == engine.script[:10] and "".join(c.text for c in chunks) == replica.codec.decode(tokens)
    assert chunks[-1].usage.completion_tokens == 10 and all(c.finish_reason is None for c in chunks[:-1])
    assert metrics.kinds().count("request") == 1 and metrics.kinds().count("inter_token") == 1


@pytest.mark.parametrize("chat", [False, True])
def test_with_sse_the_middle_chunks_are_the_clients_events_and_first_and_last_stay_chunks(chat):
    replica, engine, _ = make({"tokens_per_step": 1})
    sse = {"id": "cmpl-7", "created": 11, "model": "m", "index": 3, "chat": chat, "include_usage": True}
    r = asyncio.run(post(replica, {"prompt_ids": [5], "max_tokens": 10, "sse": sse}))
    lines = r.content.split(b"\n")
    first, last = GenerateChunk.model_validate_json(lines[0]), GenerateChunk.model_validate_json(
        [x for x in lines if x][-1])
    events = [json.loads(x[len(b"data: "):]) for x in lines if x.startswith(b"data: ")]
    assert r.content.count(b"data: ") == len(events) and b"data: " not in lines[0]
    assert all(e == {"id": "cmpl-7", "object": "chat.completion.chunk" if chat else "text_completion",
                     "created": 11, "model": "m", "choices": e["choices"], "usage": None} for e in events)
    choices = [e["choices"][0] for e in events]
    assert all(c["index"] == 3 and c["finish_reason"] is None and c["logprobs"] is None for c in choices)
    deltas = [c["delta"]["content"] if chat else c["text"] for c in choices]
    assert all(deltas)  # empty deltas are not sent
    # every token's text arrives once: first chunk + events + last chunk
    assert first.text + "".join(deltas) + last.text == replica.codec.decode(engine.script[:10])
    assert last.finish_reason == "length" and last.usage.completion_tokens == 10
    assert r.content.endswith(b"\n") and all(x.endswith(b"}") for x in lines if x.startswith(b"data: "))


@pytest.mark.parametrize("error, status, type_, param, code", [
    (ValueError("max_new_tokens: too many for the context"), 400, "invalid_request_error", "max_tokens", None),
    (ValueError("block_length: must be >= 2"), 400, "invalid_request_error", "block_length", None),
    (ValueError("denoise_lora: no denoise adapter is loaded"), 400, "invalid_request_error", "denoise_lora", None),
    (EngineOverloaded("the waiting queue is full"), 429, "overloaded_error", None, "engine_overloaded"),
])
def test_submission_errors_become_error_bodies(error, status, type_, param, code):
    replica, engine, _ = make()
    engine.reject = error
    r = asyncio.run(post(replica, {"prompt_ids": [5], "max_tokens": 4}))
    err = r.json()["error"]
    assert r.status_code == status and (err["type"], err["param"], err["code"]) == (type_, param, code)


def test_bad_bodies_and_too_long_prompts_are_400s():
    replica, engine, _ = make()
    r = asyncio.run(post(replica, {"prompt_ids": [5], "mode": "beam"}))
    assert r.status_code == 400 and r.json()["error"]["param"] == "mode"
    r = asyncio.run(post(replica, {"prompt_ids": [5] * 5000}))
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert engine.submitted == []


def test_an_engine_that_dies_mid_request_fails_it_with_a_status_or_a_last_line():
    replica, engine, metrics = make()
    engine.die_after_steps = 3
    r = asyncio.run(post(replica, {"prompt_ids": [5], "max_tokens": 50, "stream": False}))
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_error"  # nothing was sent yet
    assert ("request", "ar", "error", None, []) in metrics.calls
    r = asyncio.run(post(replica, {"prompt_ids": [5], "max_tokens": 50}))
    assert r.status_code == 200  # the stream began: the failure is its last line
    last = json.loads(r.text.splitlines()[-1])
    assert last["finish_reason"] == "error" and "exited" in last["error"]["message"]


def test_health_and_check_health_follow_the_engine():
    replica, engine, _ = make()

    async def health() -> httpx.Response:
        transport = httpx.ASGITransport(app=asgi(replica))
        async with httpx.AsyncClient(transport=transport, base_url="http://replica") as client:
            return await client.get("/health")

    assert asyncio.run(health()).status_code == 200
    replica.check_health()
    engine.problem = "the engine loop made no progress for 130 s with 2 requests in flight"
    r = asyncio.run(health())
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
    with pytest.raises(RuntimeError, match="no progress"):
        replica.check_health()


def test_stop_strings_end_a_request_early_and_abort_it_in_the_engine():
    replica, engine, _ = make()
    full = asyncio.run(post(replica, {"prompt_ids": [300], "max_tokens": 30, "stream": False}))
    text = GenerateChunk.model_validate_json(full.text).text
    assert len(text) > 20
    stop = text[12:15]
    r = asyncio.run(post(replica, {"prompt_ids": [300], "max_tokens": 30, "stream": False, "stop": [stop]}))
    one = GenerateChunk.model_validate_json(r.text)
    assert one.finish_reason == "stop" and one.text == text[: text.find(stop)]
    assert set(engine.aborted) == {engine.submitted[-1][0]}  # the engine stopped working on it


def test_dated_settings_apply_once_and_never_go_back():
    from replicas.wire import EngineSettings

    replica, engine, _ = make()

    async def main():
        await replica.apply_settings(EngineSettings(downgrade_self_spec=True, since=200.0))
        await replica.apply_settings(EngineSettings(downgrade_self_spec=False, since=100.0))  # older: ignored
        await replica.apply_settings(EngineSettings(downgrade_self_spec=True, since=250.0))  # same state
        await replica.apply_settings(EngineSettings(downgrade_self_spec=False, since=300.0))

    asyncio.run(main())
    assert engine.downgrades == [True, False] and replica.settings_since == 300.0 and not replica.downgraded


def test_the_self_spec_algorithm_reaches_the_engine_and_the_last_chunk_reports_it():
    replica, engine, _ = make({"tokens_per_step": 3})
    for asked, ran in [("quadratic", "quadratic"), ("linear", "linear"), (None, "linear")]:
        body = {"prompt_ids": [5], "max_tokens": 6, "stream": False, "mode": "self_spec"}
        r = asyncio.run(post(replica, {**body, "self_spec_algorithm": asked} if asked else body))
        assert r.status_code == 200, r.text
        assert engine.submitted[-1][2].spec_algorithm == asked
        assert GenerateChunk.model_validate_json(r.text).self_spec_algorithm == ran
    r = asyncio.run(post(replica, {"prompt_ids": [5], "max_tokens": 6, "stream": False, "mode": "ar"}))
    assert GenerateChunk.model_validate_json(r.text).self_spec_algorithm is None
    r = asyncio.run(post(replica, {"prompt_ids": [5], "max_tokens": 6, "self_spec_algorithm": "cubic"}))
    assert r.status_code == 400 and r.json()["error"]["param"] == "self_spec_algorithm"


def test_engine_limits_carry_the_default_algorithm_and_quadratic_block():
    from pydantic import ValidationError

    from replicas.config import ReplicaConfig

    cfg = ReplicaConfig(model_path="m", engine={"spec_algorithm": "quadratic", "quadratic_block_length": 4})
    ec = cfg.engine_config()
    assert (ec.spec_algorithm, ec.quadratic_block_length) == ("quadratic", 4)
    assert ReplicaConfig(model_path="m").engine_config().spec_algorithm == "linear"
    with pytest.raises(ValidationError, match="spec_algorithm"):
        ReplicaConfig(model_path="m", engine={"spec_algorithm": "cubic"})


def test_engine_cpus_are_checked_at_construction():
    from pydantic import ValidationError

    from replicas.config import ReplicaConfig

    assert ReplicaConfig(model_path="m").engine_threads() is None  # Ray's threads, unbound
    assert ReplicaConfig(model_path="m", engine_cpus=[1]).engine_threads() == 1
    for bad, match in (({"engine_cpus": []}, "engine_cpus"), ({"engine_cpus": [0, 0]}, "distinct"),
                       ({"engine_cpus": [-1]}, "distinct"), ({"engine_cpus": [0], "engine_process": False},
                                                             "engine_process")):
        with pytest.raises(ValidationError, match=match):
            ReplicaConfig(model_path="m", **bad)


def test_a_real_engine_runs_the_configured_quadratic_default_and_reports_it():
    """No fake: the replica's own engine (on a thread), `engine.spec_algorithm: quadratic`."""
    replica = NLDReplica({"model_path": str(MODEL), "model_name": "m", "engine_process": False,
                          "engine": {"max_seq_len": 256, "max_batch_size": 2, "spec_algorithm": "quadratic",
                                     "quadratic_block_length": 4}}, metrics=RecordingMetrics())
    body = {"prompt": "import os\nimport sys\n\n\ndef main(", "max_tokens": 24, "stream": False}

    async def both():
        return (await post(replica, {**body, "mode": "self_spec"}), await post(replica, {**body, "mode": "ar"}),
                await post(replica, {**body, "mode": "self_spec", "self_spec_algorithm": "linear"}))

    try:
        quad, ar, linear = (GenerateChunk.model_validate_json(r.text) for r in asyncio.run(both()))
    finally:
        replica.engine.shutdown()
    assert quad.self_spec_algorithm == "quadratic" and linear.self_spec_algorithm == "linear"
    assert ar.self_spec_algorithm is None
    assert quad.token_ids == ar.token_ids == linear.token_ids
    assert quad.usage.forward_passes < linear.usage.forward_passes


async def get_at(replica, base_url: str, path: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=asgi(replica))
    async with httpx.AsyncClient(transport=transport, base_url=base_url) as client:
        return await client.get(path)


def test_every_answer_names_the_replica_and_its_own_address_unless_told_not_to():
    from replicas.wire import REPLICA_HEADER, parse_replica_address

    replica, _, _ = make()
    for path in ("/health", "/info", "/no-such-route"):
        r = asyncio.run(get_at(replica, "http://10.1.2.3:30007", path))
        rid, host, port, cluster = parse_replica_address(r.headers[REPLICA_HEADER])
        assert (rid, host, port, cluster) == (replica.reporter.replica_id, "10.1.2.3", 30007, None)  # no Ray here
    r = asyncio.run(post(replica, {"prompt_ids": [5], "max_tokens": 2, "stream": False}))
    assert REPLICA_HEADER not in r.headers  # no port in the connection's address: nothing to name
    quiet, _, _ = make(advertise_address=False)
    assert REPLICA_HEADER not in asyncio.run(get_at(quiet, "http://10.1.2.3:30007", "/health")).headers
