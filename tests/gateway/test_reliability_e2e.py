"""Reliability on the real stack (gateway -> the replica's own port, learned through HAProxy ->
replica -> engine process: the default direct routes), each case
bounded in time: client disconnects free everything, overload is a 429 that recovers, and a
killed replica process gives clean errors and is replaced. Figures go to docs/RELIABILITY.md
(run with -s to see them)."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import time

import httpx
import pytest

from gateway.app import create_app
from gateway.config import GatewayConfig
from gateway.bootstrap import build_replica_client
from gateway.metrics import GatewayMetrics, InflightCounter
from policies import FixedModePolicy

from .servers import serve_in_thread

pytestmark = pytest.mark.slow

BODY = {"model": "nld-test", "prompt": "x", "ignore_eos": True, "decoding_mode": "ar"}


@pytest.fixture
def app_of(serve_stack, serve_model_dir):
    """Deploy an application of its own (its engine limits), and a gateway in front of it."""
    from ray import serve

    from replicas.app import bind_app

    names = []

    def deploy(name: str, engine: dict, **options):
        config = {"model_path": str(serve_model_dir), "torch_threads": 1, "engine": engine}
        serve.run(bind_app(config, {"ray_actor_options": {"num_cpus": 1}, **options}), name=name,
                  route_prefix=f"/{name}")
        names.append(name)
        replica_url = f"{serve_stack.url}/{name}"
        cfg = GatewayConfig(replica_url=replica_url, model_name="nld-test", retry_after_s=2)
        metrics = GatewayMetrics(InflightCounter())  # the default client: direct routes to the replicas' ports
        return replica_url, serve_in_thread(create_app(cfg, build_replica_client(cfg, metrics), FixedModePolicy(),
                                                       metrics=metrics))

    yield deploy
    for name in names:
        serve.delete(name)


def stats(replica_url: str) -> dict:
    return httpx.get(replica_url + "/stats", timeout=10).json()


def settle(replica_url: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        s = stats(replica_url)
        if (s["running"] == 0 and s["waiting"] == 0) or time.monotonic() > deadline:
            return s
        time.sleep(0.1)


def test_twenty_disconnects_mid_stream_leave_nothing_running_and_all_kv_free(app_of):
    replica_url, gateway = app_of("rel_disconnect", {"max_batch_size": 8, "max_seq_len": 4096, "max_waiting": 32})
    with gateway as url:
        before = stats(replica_url)["aborted_requests"]

        def one(_):
            with httpx.Client(timeout=60) as c, c.stream("POST", url + "/v1/completions",
                                                         json={**BODY, "max_tokens": 3000, "stream": True}) as r:
                lines = r.iter_lines()
                got = [next(lines) for _ in range(3)]  # a few events, then the client goes away
                return r.status_code, got

        with cf.ThreadPoolExecutor(10) as pool:
            results = list(pool.map(one, range(20)))
        t0 = time.monotonic()
        after = settle(replica_url)
        freed_s = time.monotonic() - t0
    assert all(status == 200 for status, _ in results)
    assert after["running"] == after["waiting"] == 0 and after["kv_slots_used"] == 0
    assert after["aborted_requests"] - before == 20
    print(f"\nRELIABILITY disconnects: 20 streams cut after 3 events; running 0, KV slots 0 after {freed_s:.2f} s; "
          f"aborted {after['aborted_requests'] - before}, tokens made {after['generated_tokens']}")


def test_overload_is_a_429_with_retry_after_and_recovers(app_of):
    replica_url, gateway = app_of("rel_overload", {"max_batch_size": 1, "max_seq_len": 4096, "max_waiting": 1})
    with gateway as url:
        def one(_):
            r = httpx.post(url + "/v1/completions", json={**BODY, "max_tokens": 400}, timeout=120)
            return r.status_code, r.headers.get("retry-after"), r.json()

        with cf.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, range(8)))
        codes: dict[int, int] = {}
        for status, _, _ in results:
            codes[status] = codes.get(status, 0) + 1
        rejected = [(retry, body) for status, retry, body in results if status == 429]
        settle(replica_url)
        after = httpx.post(url + "/v1/completions", json={**BODY, "max_tokens": 8}, timeout=60)
    assert set(codes) <= {200, 429} and codes.get(200, 0) >= 2 and rejected  # 1 running + 1 waiting at least
    assert all(retry is not None and float(retry) > 0 for retry, _ in rejected)
    assert all(body["error"]["code"] == "engine_overloaded" for _, body in rejected)
    assert after.status_code == 200  # recovered
    print(f"\nRELIABILITY overload: 8 concurrent requests on 1 slot + 1 queue place: {codes}; "
          f"Retry-After {rejected[0][0]} s; the next request: {after.status_code}")


def test_killing_the_replica_process_gives_clean_errors_and_a_new_replica(app_of):
    replica_url, gateway = app_of("rel_kill", {"max_batch_size": 4, "max_seq_len": 4096, "max_waiting": 4},
                                  health_check_period_s=1)
    with gateway as url:
        assert httpx.post(url + "/v1/completions", json={**BODY, "max_tokens": 4}, timeout=60).status_code == 200
        pid = stats(replica_url)["replica_pid"]

        def streamed(_):
            events, status = [], None
            try:
                with httpx.Client(timeout=120) as c, c.stream(
                        "POST", url + "/v1/completions", json={**BODY, "max_tokens": 3000, "stream": True}) as r:
                    status = r.status_code
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            events.append(line[6:])
            except httpx.HTTPError as e:
                return status, [f"transport: {type(e).__name__}"]
            return status, events

        def whole(_):
            r = httpx.post(url + "/v1/completions", json={**BODY, "max_tokens": 3000}, timeout=120)
            return r.status_code, r.json()

        with cf.ThreadPoolExecutor(4) as pool:
            streams = [pool.submit(streamed, i) for i in range(2)]
            wholes = [pool.submit(whole, i) for i in range(2)]
            deadline = time.monotonic() + 30
            while stats(replica_url)["running"] < 4:  # all four are running
                assert time.monotonic() < deadline, stats(replica_url)
                time.sleep(0.1)
            t_kill = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            stream_results = [f.result(timeout=60) for f in streams]
            whole_results = [f.result(timeout=60) for f in wholes]
        errors_in_s = time.monotonic() - t_kill
        recovered_s = None
        attempts: dict[int, int] = {}
        while time.monotonic() - t_kill < 60:
            r = httpx.post(url + "/v1/completions", json={**BODY, "max_tokens": 4}, timeout=30)
            attempts[r.status_code] = attempts.get(r.status_code, 0) + 1
            if r.status_code == 200:
                recovered_s = time.monotonic() - t_kill
                break
            assert r.json()["error"]["code"], r.text  # an envelope with a code, never a bare error
            time.sleep(0.5)
    for status, events in stream_results:  # the stream began: its last events are an error, then [DONE]
        assert status == 200 and events[-1] == "[DONE]", (status, events[-3:])
        assert "error" in json.loads(events[-2]), events[-3:]
    for status, body in whole_results:  # an error envelope, or the whole answer after the gateway's retry
        if status == 200:  # the connection broke before the first byte: retried on the new replica
            assert body["usage"]["completion_tokens"] == 3000, body["usage"]
        else:
            assert status in (500, 502, 503) and body["error"]["code"], (status, body)
    assert recovered_s is not None and recovered_s < 60, attempts
    print(f"\nRELIABILITY replica killed: 2 streams ended with an error event and [DONE], 2 non-streaming got "
          f"{[s for s, _ in whole_results]} ({[b.get('error', {}).get('code', 'retried') for _, b in whole_results]}), "
          f"the errors within "
          f"{errors_in_s:.1f} s; requests while it was down: {attempts}; served again {recovered_s:.1f} s after the kill")
