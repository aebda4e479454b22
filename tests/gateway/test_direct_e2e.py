"""Direct routes on the real stack (Ray Serve with HAProxy in front of the replicas' own HTTP
ports): the gateway learns every replica and sends to their ports, a replica that Serve scales
away drains without a failed request, and a killed replica's successor is found again. Each case
bounded in time. Figures go to docs/RELIABILITY.md (run with -s to see them)."""

from __future__ import annotations

import concurrent.futures as cf
import json
import threading
import time

import httpx
import pytest

from gateway.app import create_app
from gateway.bootstrap import build_replica_client
from gateway.config import GatewayConfig
from gateway.metrics import GatewayMetrics, InflightCounter
from policies import FixedModePolicy

from .servers import serve_in_thread, sse_events

pytestmark = pytest.mark.slow

BODY = {"model": "nld-test", "prompt": "x", "ignore_eos": True, "decoding_mode": "ar"}


@pytest.fixture
def two_replicas(serve_stack, serve_model_dir):
    """An application of two replicas under its own prefix, a gateway on direct routes in front
    (short health and discovery intervals, forgetting after 2 s), and a way to redeploy it."""
    from ray import serve

    from replicas.app import bind_app

    name = "direct2"
    config = {"model_path": str(serve_model_dir), "torch_threads": 1,
              "engine": {"max_batch_size": 4, "max_seq_len": 1024, "max_waiting": 8}}

    def deploy(replicas: int) -> None:
        serve.run(bind_app(config, {"ray_actor_options": {"num_cpus": 1}, "num_replicas": replicas,
                                    "health_check_period_s": 1}), name=name, route_prefix=f"/{name}")

    deploy(2)
    cfg = GatewayConfig(replica_url=f"{serve_stack.url}/{name}", model_name="nld-test", direct_health_interval_s=0.2,
                        direct_discover_interval_s=0.2, direct_forget_after_s=2.0)
    metrics = GatewayMetrics(InflightCounter())
    client = build_replica_client(cfg, metrics)
    with serve_in_thread(create_app(cfg, client, FixedModePolicy(), metrics=metrics)) as url:
        yield url, client, metrics, deploy
    serve.delete(name)


def routed(metrics: GatewayMetrics) -> dict[str, float]:
    return {r: metrics.upstream.labels(route=r)._value.get() for r in ("direct", "channel", "ingress")}


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def complete(url: str, max_tokens: int = 8, stream: bool = False, **extra) -> tuple[int, str]:
    if not stream:
        r = httpx.post(url + "/v1/completions", json={**BODY, "max_tokens": max_tokens, **extra}, timeout=60)
        return r.status_code, r.text
    with httpx.Client(timeout=60) as c, c.stream("POST", url + "/v1/completions",
                                                 json={**BODY, "max_tokens": max_tokens, "stream": True,
                                                       **extra}) as r:
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    return r.status_code, "\n".join(events)


def healthy_ids(client) -> set[str]:
    return {r["replica_id"] for r in client._direct.snapshot() if r["healthy"]}


def test_the_gateway_finds_both_replicas_and_sends_to_their_own_ports(two_replicas):
    url, client, metrics, _ = two_replicas
    assert complete(url)[0] == 200
    ids = wait_for(lambda: healthy_ids(client) if len(healthy_ids(client)) == 2 else None, 30, "both replicas")
    before = routed(metrics)
    with cf.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda k: complete(url, 16, stream=k % 2 == 1), range(16)))
    after = routed(metrics)
    assert all(status == 200 for status, _ in results)
    assert all(text.endswith("data: [DONE]") for status, text in results[1::2])
    assert sum(after[r] - before[r] for r in ("direct", "channel")) == 16 and after["ingress"] == before["ingress"]
    for r in client._direct.snapshot():  # each one's own port, not HAProxy's
        assert r["address"].split(":")[-1] != url.rsplit(":", 1)[-1]
    assert len(ids) == 2 and all(r["inflight"] == 0 for r in client._direct.snapshot())
    assert (client._direct.cluster or "").startswith("session_")  # the replicas name their Ray cluster
    print(f"\nDIRECT routes: replicas {sorted(r['address'] for r in client._direct.snapshot())}; "
          f"16 requests, all direct ({after['direct'] - before['direct']:.0f} on their own answers, "
          f"{after['channel'] - before['channel']:.0f} streams on a channel)")


def replica_stats(client) -> list[dict]:
    """/stats of every known replica, from its own port (the ingress would answer for one)."""
    return [httpx.get(f"http://{r['address']}/direct2/stats", timeout=10).json() for r in client._direct.snapshot()]


def test_streams_ride_each_replicas_channel_and_a_client_that_leaves_is_aborted(two_replicas):
    url, client, metrics, _ = two_replicas
    wait_for(lambda: complete(url)[0] == 200 and len(healthy_ids(client)) == 2, 30, "both replicas")
    wait_for(lambda: complete(url, 4, stream=True)[0] == 200 and client._direct.open_channels() == 2, 30,
             "a stream channel to each replica")
    assert [s["stream_channels"] for s in replica_stats(client)] == [1, 1]  # one each, seen by the replicas
    before = routed(metrics)
    plain = [json.loads(complete(url, 24, temperature=0)[1])["choices"][0]["text"] for _ in range(2)]
    with cf.ThreadPoolExecutor(8) as pool:
        streamed = list(pool.map(lambda k: complete(url, 24, stream=True, temperature=0), range(8)))
    after = routed(metrics)
    assert after["channel"] - before["channel"] == 8  # every stream rode a channel
    for status, text in streamed:
        events = sse_events(text.replace("\n", "\n\n") + "\n\n")
        assert status == 200 and events[-1] == "[DONE]"
        assert "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"]) == plain[0] == plain[1]
    # a client that goes away mid-stream: its request is aborted in the engine, the channel stays
    body = {**BODY, "max_tokens": 900, "stream": True}
    made = sum(s["generated_tokens"] for s in replica_stats(client))
    with httpx.Client(timeout=60) as c, c.stream("POST", url + "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        assert r.status_code == 200 and next(lines).startswith("data: ")
        assert routed(metrics)["channel"] - after["channel"] == 1
    wait_for(lambda: all(s["kv_slots_used"] == 0 for s in replica_stats(client)), 30, "the request aborted")
    assert sum(s["generated_tokens"] for s in replica_stats(client)) - made < 900  # stopped early
    assert client._direct.open_channels() == 2 and complete(url, 4, stream=True)[0] == 200
    print(f"\nSTREAM CHANNELS: 8 concurrent streams on {client._direct.open_channels()} channels, text equal to "
          f"the non-streamed answer; a client that left mid-stream freed its KV")


def test_a_replica_scaled_away_drains_without_a_failed_request(two_replicas):
    url, client, metrics, deploy = two_replicas
    complete(url)
    wait_for(lambda: len(healthy_ids(client)) == 2, 30, "both replicas")
    stop = threading.Event()
    results: list[tuple[int, str]] = []

    def loop(k: int) -> None:
        while not stop.is_set():
            results.append(complete(url, 24, stream=k % 2 == 1))

    threads = [threading.Thread(target=loop, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    try:
        wait_for(lambda: len(results) >= 8, 60, "requests before the scale-down")
        # Serve drains one replica: its /-/healthz says DRAINING, then its port closes
        redeploy = threading.Thread(target=deploy, args=(1,))
        redeploy.start()
        wait_for(lambda: len(client._direct.snapshot()) == 1, 90, "the drained replica forgotten")
        n_down = len(results)
        wait_for(lambda: len(results) >= n_down + 8, 60, "requests after the scale-down")
        redeploy.join(60)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    failed = [(s, text[:200]) for s, text in results if s != 200 or ('"error"' in text)]
    assert not failed, failed
    assert healthy_ids(client) and routed(metrics)["direct"] > 0
    retried = metrics.retries._value.get()
    print(f"\nDIRECT drain: 2 -> 1 replicas under 4 closed-loop clients: {len(results)} requests, none failed; "
          f"the drained replica forgotten {time.monotonic() - t0:.1f} s after the loop began; retries {retried:.0f}")
    # its DRAINING health check took it out before its port closed: no request had to be retried
    assert retried == 0


def test_a_killed_replicas_successor_is_found_and_used_directly(two_replicas):
    import ray

    url, client, metrics, _ = two_replicas
    complete(url)
    old = wait_for(lambda: healthy_ids(client) if len(healthy_ids(client)) == 2 else None, 30, "both replicas")
    actors = [a for a in ray.util.list_named_actors(all_namespaces=True)
              if "direct2" in a["name"] and "NLDReplica" in a["name"]]
    ray.kill(ray.get_actor(actors[0]["name"], namespace=actors[0]["namespace"]), no_restart=True)
    t_kill = time.monotonic()
    statuses: dict[int, int] = {}
    new = set()
    while time.monotonic() - t_kill < 120:
        status, _ = complete(url)
        statuses[status] = statuses.get(status, 0) + 1
        new = healthy_ids(client) - old
        if new and len(healthy_ids(client)) == 2:
            break
        time.sleep(0.2)
    assert new, (statuses, client._direct.snapshot())
    before = routed(metrics)
    assert all(complete(url)[0] == 200 for _ in range(4))
    assert routed(metrics)["direct"] - before["direct"] == 4
    assert set(statuses) <= {200, 503}, statuses  # the other replica served while Serve replaced this one
    print(f"\nDIRECT kill: a replica killed; its successor routed to directly {time.monotonic() - t_kill:.1f} s "
          f"later; requests meanwhile: {statuses}")
