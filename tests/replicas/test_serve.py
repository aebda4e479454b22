"""The replicas on real Ray Serve: wire protocol, modes, errors, cancellation, metrics."""

from __future__ import annotations

import json
import time

import httpx
import pytest

pytestmark = pytest.mark.slow


def generate(stack, body: dict, timeout: float = 60) -> tuple[int, list[dict] | dict]:
    with httpx.stream("POST", stack.url + "/generate", json=body, timeout=timeout) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, r.json()
        return 200, [json.loads(line) for line in r.iter_lines() if line]


def test_health_and_info(serve_stack):
    assert httpx.get(serve_stack.url + "/health").json() == {"status": "ok"}
    info = httpx.get(serve_stack.url + "/info").json()
    assert info["model"] == "nld-test" and info["has_draft_lora"] and info["vocab_size"] == 512
    assert info["has_denoise_lora"]


def test_every_mode_streams_ndjson_with_usage(serve_stack):
    outputs = {}
    for mode in ("ar", "self_spec", "diffusion"):
        status, chunks = generate(serve_stack, {"prompt": "def main():", "mode": mode, "max_tokens": 24})
        assert status == 200
        last = chunks[-1]
        assert last["finish_reason"] in ("stop", "length") and last["mode"] == mode
        tokens = [t for c in chunks for t in c["token_ids"]]
        assert last["usage"]["completion_tokens"] == len(tokens)
        assert last["usage"]["forward_passes"] >= 1
        assert all(c.get("finish_reason") is None for c in chunks[:-1])
        outputs[mode] = tokens
    assert outputs["self_spec"] == outputs["ar"]


def test_chat_messages_use_the_template(serve_stack):
    status, chunks = generate(serve_stack, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})
    assert status == 200 and chunks[-1]["usage"]["prompt_tokens"] == len("<s><|user|>\nhi\n<|assistant|>\n") - 2
    # "<s>" is one special token, so the byte-level prompt is 3 characters shorter, plus 1 for it


def test_stop_strings_cut_the_text(serve_stack):
    status, chunks = generate(serve_stack, {"prompt": "x", "max_tokens": 40, "ignore_eos": True})
    text = "".join(c["text"] for c in chunks)
    assert len(text) > 6
    stop = text[3:5]
    status, chunks = generate(serve_stack, {"prompt": "x", "max_tokens": 40, "ignore_eos": True, "stop": [stop]})
    cut = "".join(c["text"] for c in chunks)
    assert chunks[-1]["finish_reason"] == "stop" and cut == text[: text.find(stop)]


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"prompt": "x", "block_length": 1}, 400, "block_length"),
        ({"prompt": "x", "mode": "beam"}, 400, "mode"),
        ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ({"prompt_ids": [1, 99999]}, 400, "prompt_ids"),
        ({"prompt": "x" * 300}, 400, "prompt"),
        ({"prompt": "x", "prompt_ids": [1]}, 400, "prompt"),
        ({"prompt": "x", "max_tokens": 250}, 400, "max_tokens"),
    ],
)
def test_bad_requests_get_error_bodies(serve_stack, body, status, param):
    got, err = generate(serve_stack, body)
    assert got == status and err["error"]["param"] == param and err["error"]["message"]


@pytest.fixture(scope="module")
def tight_app(serve_stack, serve_model_dir):
    """A second application with one KV slot and no queue, under /tight."""
    from ray import serve

    from replicas.app import bind_app

    config = {"model_path": str(serve_model_dir), "torch_threads": 1,
              "engine": {"max_batch_size": 1, "max_seq_len": 4096, "max_waiting": 0}}
    serve.run(bind_app(config, {"ray_actor_options": {"num_cpus": 1}}), name="tight", route_prefix="/tight")
    yield serve_stack.url + "/tight"
    serve.delete("tight")


def test_overload_is_429_and_a_disconnect_frees_the_kv(tight_app):
    def stats():
        return httpx.get(tight_app + "/stats").json()

    client = httpx.Client(timeout=60)
    with client.stream("POST", tight_app + "/generate",
                       json={"prompt": "x", "max_tokens": 4000, "ignore_eos": True, "mode": "ar"}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # keep the iterator: dropping it closes the response
        next(lines)  # the request now holds the only KV slot
        assert stats()["kv_slots_used"] == 1
        got = httpx.post(tight_app + "/generate", json={"prompt": "x", "max_tokens": 8})
        assert got.status_code == 429 and got.json()["error"]["type"] == "overloaded_error"
        client.close()  # disconnect mid-stream
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and stats()["kv_slots_used"]:
        time.sleep(0.1)
    s = stats()
    assert s["kv_slots_used"] == 0 and s["aborted_requests"] == 1
    assert s["generated_tokens"] < 4000  # it really stopped early
    ok = httpx.post(tight_app + "/generate", json={"prompt": "x", "max_tokens": 8})
    assert ok.status_code == 200  # and the replica serves again


def test_engine_settings_endpoint(serve_stack):
    r = httpx.post(serve_stack.url + "/engine", json={"draft_tiers": [{"max_running": 2, "block_length": 4}]})
    assert r.status_code == 200 and r.json()["draft_tiers"] == [{"max_running": 2, "block_length": 4}]
    r = httpx.post(serve_stack.url + "/engine", json={"draft_tiers": [{"max_running": 2, "block_length": 1}]})
    assert r.status_code == 400
    r = httpx.post(serve_stack.url + "/engine", json={"draft_tiers": [], "downgrade_self_spec": True})
    assert r.json()["downgraded"] is True
    assert httpx.get(serve_stack.url + "/stats").json()["downgraded"] is True
    # settings also ride on generate requests (the policy's way to reach every replica)
    status, _ = generate(serve_stack, {"prompt": "x", "max_tokens": 2, "engine": {"downgrade_self_spec": False}})
    assert status == 200
    assert httpx.post(serve_stack.url + "/engine", json={}).json()["downgraded"] is False
    assert httpx.get(serve_stack.url + "/stats").json()["downgraded"] is False
    # dated settings: one older than the last applied is ignored (a request overtaken by a newer push)
    assert httpx.post(serve_stack.url + "/engine", json={"downgrade_self_spec": True, "since": 200.0}).json()[
        "downgraded"] is True
    stale = httpx.post(serve_stack.url + "/engine", json={"downgrade_self_spec": False, "since": 100.0}).json()
    assert stale["downgraded"] is True and stale["since"] == 200.0
    status, _ = generate(serve_stack, {"prompt": "x", "max_tokens": 2,
                                       "engine": {"downgrade_self_spec": False, "since": 150.0}})
    assert status == 200 and httpx.get(serve_stack.url + "/stats").json()["downgraded"] is True
    newer = httpx.post(serve_stack.url + "/engine", json={"downgrade_self_spec": False, "since": 300.0}).json()
    assert newer["downgraded"] is False and newer["since"] == 300.0


def test_metrics_reach_rays_metrics_port_within_two_seconds(serve_stack):
    generate(serve_stack, {"prompt": "x", "max_tokens": 8, "mode": "self_spec"})
    deadline = time.monotonic() + 30
    text = ""
    while time.monotonic() < deadline:
        text = httpx.get(serve_stack.metrics_url).text
        if "ray_nld_replica_generated_tokens" in text and "ray_nld_replica_tokens_per_forward_bucket" in text:
            break
        time.sleep(0.5)
    for name in ("ray_nld_replica_running_requests", "ray_nld_replica_waiting_requests",
                 "ray_nld_replica_num_requests_running",
                 "ray_nld_replica_kv_cache_usage_ratio", "ray_nld_replica_generated_tokens",
                 "ray_nld_replica_forward_passes", "ray_nld_replica_tokens_per_forward_bucket",
                 "ray_nld_replica_accepted_length_bucket", "ray_nld_replica_time_to_first_token_seconds_bucket",
                 "ray_nld_replica_inter_token_latency_seconds_bucket"):
        assert name in text, name


def test_a_non_streaming_request_is_answered_in_one_message(serve_stack):
    body = {"prompt": "def main():", "mode": "self_spec", "max_tokens": 24, "ignore_eos": True}
    status, chunks = generate(serve_stack, body)
    assert status == 200 and len(chunks) > 1
    r = httpx.post(serve_stack.url + "/generate", json={**body, "stream": False}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    one = json.loads(r.text)  # ONE GenerateChunk: every token, the whole text, usage
    assert one["token_ids"] == [t for c in chunks for t in c["token_ids"]]
    assert one["text"] == "".join(c["text"] for c in chunks)
    assert one["finish_reason"] == "length" and one["usage"] == chunks[-1]["usage"]
    # stop strings are watched as the text grows: the same cut as a stream's
    stop = one["text"][4:6]
    status, cut = generate(serve_stack, {**body, "stop": [stop]})
    r = httpx.post(serve_stack.url + "/generate", json={**body, "stop": [stop], "stream": False}, timeout=60)
    assert r.json()["text"] == "".join(c["text"] for c in cut) == one["text"][: one["text"].find(stop)]
    assert r.json()["finish_reason"] == "stop"


def test_every_answer_carries_the_replicas_report_through_the_ingress(serve_stack):
    """The report header (load, cost model) survives Serve's ingress on 200, streamed and error
    answers, and reads back as the replica's series (`policies.reports`)."""
    from policies.reports import ReplicaReports

    reports = ReplicaReports()
    body = {"prompt": "def main():", "mode": "ar", "max_tokens": 16, "ignore_eos": True}
    for extra in ({"stream": False}, {"stream": True}, {"max_tokens": -3}):
        with httpx.stream("POST", serve_stack.url + "/generate", json={**body, **extra}, timeout=60) as r:
            r.read()
            assert r.status_code == (400 if "max_tokens" in extra else 200)
            value = r.headers["x-nld-replica-report"]
        rid, seq, payload = value.split(";", 2)
        report = json.loads(payload)
        assert rid and int(seq) >= 1 and report["model"] == "nld-test" and report["application"]
        assert report["running"] >= 0 and report["waiting"] >= 0
        reports.offer(value)
    assert reports.rejected == 0 and len(reports.replicas()) >= 1
    # a report is the engine's last pushed snapshot (pushed while busy, and when it idles after the
    # outputs that idled it): once that push is in, an answer carries the steps measured above
    time.sleep(0.6)
    r = httpx.post(serve_stack.url + "/generate", json={**body, "stream": False}, timeout=60)
    report = json.loads(r.headers["x-nld-replica-report"].split(";", 2)[2])
    reports.offer(r.headers["x-nld-replica-report"])
    assert report["cost_model"]["steps"] > 0 and "ray_nld_replica_cost_model_steps{" in reports.page()


@pytest.fixture
def fragile_app(serve_stack, serve_model_dir):
    """An application of its own under /fragile, health-checked every second."""
    from ray import serve

    from replicas.app import bind_app

    config = {"model_path": str(serve_model_dir), "torch_threads": 1,
              "engine": {"max_batch_size": 2, "max_seq_len": 4096, "max_waiting": 2}}
    options = {"ray_actor_options": {"num_cpus": 1}, "health_check_period_s": 1, "health_check_timeout_s": 5}
    serve.run(bind_app(config, options), name="fragile", route_prefix="/fragile")
    yield serve_stack.url + "/fragile"
    serve.delete("fragile")


def test_a_dead_engine_fails_its_stream_and_serve_replaces_the_replica(fragile_app):
    import os
    import signal

    pid = httpx.get(fragile_app + "/stats").json()["engine_pid"]
    client = httpx.Client(timeout=60)
    t0 = time.monotonic()
    with client.stream("POST", fragile_app + "/generate",
                       json={"prompt": "x", "max_tokens": 4000, "ignore_eos": True, "mode": "ar"}) as r:
        lines = r.iter_lines()
        next(lines)
        os.kill(pid, signal.SIGKILL)  # the engine process dies mid-request
        rest = [json.loads(line) for line in lines if line]
    failed_after = time.monotonic() - t0
    assert rest[-1]["finish_reason"] == "error" and rest[-1]["error"]["code"] == "engine_error"
    assert failed_after < 10  # an error at once, not the 300 s read timeout
    deadline = time.monotonic() + 60  # Serve's health check replaces the replica
    replaced = False
    while time.monotonic() < deadline:
        try:
            ok = httpx.post(fragile_app + "/generate", json={"prompt": "x", "max_tokens": 4, "stream": False},
                            timeout=10)
            if ok.status_code == 200 and httpx.get(fragile_app + "/stats").json()["engine_pid"] != pid:
                replaced = True
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    assert replaced, "no new replica served within 60 s"


def test_engine_settings_pushed_to_one_replica_reach_every_replica(serve_stack, serve_model_dir):
    """The ingress routes a push to one replica; the application's settings board carries it to
    the others, and a replica started later applies it before serving."""
    from ray import serve

    from replicas.app import bind_app

    config = {"model_path": str(serve_model_dir), "torch_threads": 1,
              "engine": {"max_batch_size": 2, "max_seq_len": 256, "max_waiting": 2}}
    serve.run(bind_app(config, {"ray_actor_options": {"num_cpus": 0.5}, "num_replicas": 2}), name="pair",
              route_prefix="/pair")
    url = serve_stack.url + "/pair"
    try:
        def states() -> dict[str, bool]:
            seen: dict[str, bool] = {}
            for _ in range(40):  # least-connections spreads these over both replicas
                s = httpx.get(url + "/stats", timeout=10).json()
                seen[s["replica_id"]] = s["downgraded"]
            return seen

        assert len(states()) == 2
        r = httpx.post(url + "/engine", json={"downgrade_self_spec": True, "since": 5000.0}, timeout=10)
        assert r.status_code == 200
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and set(states().values()) != {True}:
            time.sleep(0.2)
        assert set(states().values()) == {True}
        # a replica that starts now (a scale-up) applies the fleet's settings before serving
        serve.run(bind_app(config, {"ray_actor_options": {"num_cpus": 0.5}, "num_replicas": 3}), name="pair",
                  route_prefix="/pair")
        seen = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(seen) < 3:
            seen.update(states())
        assert len(seen) == 3 and set(seen.values()) == {True}
    finally:
        serve.delete("pair")
