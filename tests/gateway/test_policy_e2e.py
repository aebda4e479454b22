"""The adaptive policy on the whole stack with a REAL Prometheus server: a load step moves
`auto` requests to ar and back; Prometheus going away leaves the gateway serving and holding."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from gateway.app import create_app
from gateway.config import GatewayConfig
from gateway.metrics import GatewayMetrics, InflightCounter
from gateway.replica_client import HttpReplicaClient
from policies import PolicyHolder

from .servers import serve_in_thread

pytestmark = pytest.mark.slow

POLICY = """
signals:
  - name: fleet_running
    source: prometheus
    url: {prom}
    query: sum(ray_nld_replica_running_requests{{application="policy"}})
    interval_s: 0.5
    timeout_s: 1
    stale_after_s: 4
mode:
  signal: fleet_running
  enter_loaded_above: 2.5
  leave_loaded_below: 1
  min_dwell_s: 2
  on_stale: hold
engine:
  downgrade_running: true
"""


@pytest.fixture(scope="module")
def stack(serve_stack, serve_model_dir, tmp_path_factory):
    from ray import serve

    from replicas.app import bind_app
    from tests.prometheus import PrometheusServer

    config = {"model_path": str(serve_model_dir), "torch_threads": 1,
              "engine": {"max_batch_size": 6, "max_seq_len": 4096, "max_waiting": 4}}
    serve.run(bind_app(config, {"ray_actor_options": {"num_cpus": 1}}), name="policy", route_prefix="/policy")
    prom = PrometheusServer.start([serve_stack.metrics_url.split("//")[1].split("/")[0]], scrape_interval_s=0.5)
    path = tmp_path_factory.mktemp("policy") / "policy.yaml"
    path.write_text(POLICY.format(prom=prom.url))
    cfg = GatewayConfig(replica_url=serve_stack.url + "/policy", model_name="nld-test")
    metrics = GatewayMetrics(InflightCounter())
    holder = PolicyHolder(path, local_counters={"inflight": lambda: metrics.inflight.value},
                          registry=metrics.registry)
    with serve_in_thread(create_app(cfg, HttpReplicaClient(cfg), holder, metrics=metrics)) as url:
        yield url, prom, holder
    prom.stop()
    serve.delete("policy")


def policy_state(url: str) -> dict:
    return httpx.get(url + "/v1/nld/policy", timeout=5).json()


def wait_for(url: str, mode: str, timeout: float = 40) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = policy_state(url)
        if state["mode"] == mode:
            return state
        time.sleep(0.25)
    raise AssertionError(f"the policy never reached {mode}: {policy_state(url)}")


def wait_until(predicate, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def auto_mode(url: str) -> str:
    r = httpx.post(url + "/v1/completions", json={"model": "nld-test", "prompt": "x", "max_tokens": 2}, timeout=30)
    assert r.status_code == 200, r.text
    return r.headers["x-nld-decoding-mode"]


def replica_stats(replica_url: str) -> dict:
    return httpx.get(replica_url + "/stats", timeout=5).json()


def test_load_step_moves_auto_requests_to_ar_and_back(stack, serve_stack):
    """Also: the replica hears of each switch at once, by the gateway's push of the engine
    settings: the load-step streams were all sent before the switch, and no request is sent
    after it until the replica's state has been checked."""
    url, prom, _ = stack
    replica_url = serve_stack.url + "/policy"
    assert wait_for(url, "self_spec")["mode"] == "self_spec"
    assert auto_mode(url) == "self_spec"
    assert replica_stats(replica_url)["downgraded"] is False
    stop = threading.Event()

    def stream():  # one long-running client; several of them make the load step
        body = {"model": "nld-test", "prompt": "x", "max_tokens": 3500, "stream": True, "decoding_mode": "ar",
                "ignore_eos": True}
        with httpx.Client(timeout=120) as c, c.stream("POST", url + "/v1/completions", json=body) as r:
            for _ in r.iter_lines():
                if stop.is_set():
                    return

    clients = [threading.Thread(target=stream, daemon=True) for _ in range(5)]
    for t in clients:
        t.start()
    try:
        loaded = wait_for(url, "ar")
        assert loaded["last_switch"]["reason"] == "rising" and loaded["last_switch"]["to"] == "ar"
        wait_until(lambda: replica_stats(replica_url)["downgraded"] is True)  # pushed, no request carried it
        assert auto_mode(url) == "ar"
    finally:
        stop.set()
        for t in clients:
            t.join(60)
    back = wait_for(url, "self_spec")
    assert back["last_switch"]["reason"] == "falling" and back["switches"] >= 2
    wait_until(lambda: replica_stats(replica_url)["downgraded"] is False)
    metrics = httpx.get(url + "/metrics").text
    assert 'nld_policy_switches_total{from="self_spec",reason="rising",to="ar"}' in metrics
    assert 'nld_policy_switches_total{from="ar",reason="falling",to="self_spec"}' in metrics
    assert 'nld_policy_mode{mode="self_spec"} 1.0' in metrics
    pushes = [line for line in metrics.splitlines() if line.startswith('nld_gateway_engine_pushes_total{result="ok"}')]
    assert pushes and float(pushes[0].split()[-1]) >= 3  # start, loaded, sparse again


def test_a_gateway_starting_or_restarting_never_resets_the_fleets_loaded_decision(stack, serve_stack, tmp_path):
    """Gateway A is loaded and has downgraded the replica; gateway B starts beside it, stops and
    starts again (a rollout). B attaches only once its signals are fresh, so it never pushes a
    newer "sparse" that would undo A's decision while the load lasts."""
    url, _, holder = stack
    replica_url = serve_stack.url + "/policy"
    path = holder.path
    stop = threading.Event()

    def stream():  # one client keeping a long stream open until the test ends (a new one when it finishes)
        body = {"model": "nld-test", "prompt": "x", "max_tokens": 3500, "stream": True, "decoding_mode": "ar",
                "ignore_eos": True}
        with httpx.Client(timeout=120) as c:
            while not stop.is_set():
                with c.stream("POST", url + "/v1/completions", json=body) as r:
                    for _ in r.iter_lines():
                        if stop.is_set():
                            return

    def gateway_b():
        cfg = GatewayConfig(replica_url=replica_url, model_name="nld-test")
        metrics = GatewayMetrics(InflightCounter())
        policy = PolicyHolder(path, local_counters={"inflight": lambda: metrics.inflight.value},
                              registry=metrics.registry)
        return serve_in_thread(create_app(cfg, HttpReplicaClient(cfg), policy, metrics=metrics))

    clients = [threading.Thread(target=stream, daemon=True) for _ in range(5)]
    for t in clients:
        t.start()
    seen: list[bool] = []
    watching = threading.Event()

    def watch():  # the replica's state, every 50 ms, for as long as the test runs
        while not watching.is_set():
            seen.append(replica_stats(replica_url)["downgraded"])
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    try:
        wait_for(url, "ar")
        wait_until(lambda: replica_stats(replica_url)["downgraded"] is True)
        watcher.start()
        for _ in range(2):  # B starts, serves, stops; then B again (a restart)
            with gateway_b() as b_url:
                state = policy_state(b_url)
                assert state["attached"] is False or state["mode"] == "ar"
                wait_until(lambda: policy_state(b_url)["attached"] and policy_state(b_url)["mode"] == "ar")
                assert auto_mode(b_url) == "ar"
                time.sleep(1.0)
    finally:
        watching.set()
        stop.set()
        for t in clients:
            t.join(60)
        if watcher.is_alive():
            watcher.join(5)
    assert seen and all(seen), f"the replica was un-downgraded {seen.count(False)} times while the load lasted"


def test_prometheus_stopped_mid_run_holds_the_mode_and_keeps_serving(stack):  # last: it stops Prometheus
    url, prom, _ = stack
    before = policy_state(url)["mode"]
    prom.stop()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not policy_state(url)["stale"]:
        time.sleep(0.25)
    state = policy_state(url)
    assert state["stale"] and state["signals"]["fleet_running"]["stale"]
    assert state["mode"] == before  # on_stale: hold
    assert auto_mode(url) == before  # and the gateway keeps serving

