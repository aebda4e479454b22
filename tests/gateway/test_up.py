"""`nld-gateway up` (what `make run` runs): the whole stack as one command, stopped by Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.serving import free_port, listening_addresses

pytestmark = pytest.mark.slow


def test_up_serves_the_api_and_ctrl_c_stops_everything(serve_model_dir, tmp_path):
    """Also: keys from $NLD_API_KEY_FILE (as `serve`), Ray's metrics port on loopback only, the
    preset's signals reading this stack's --metrics-port, and two replicas (`--replicas 2`), each
    with its own engine process on its share of the CPUs, both reporting to the policy."""
    cpus = len(os.sched_getaffinity(0))
    replicas, threads = min(2, cpus), max(cpus // 2, 1)  # a 1-CPU node holds one replica of one CPU
    port, replica_port, metrics_port = free_port(), free_port(), free_port()
    keys = tmp_path / "keys"
    keys.write_text("sk-up\n")
    auth = {"authorization": "Bearer sk-up"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "up", "--model", str(serve_model_dir), "--port", str(port),
         "--replica-port", str(replica_port), "--metrics-port", str(metrics_port),
         "--policy", "policies/presets/adaptive.yaml", "--replicas", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "NLD_API_KEY_FILE": str(keys)})
    lines = []
    try:
        deadline = time.monotonic() + 180
        for line in proc.stdout:
            lines.append(line)
            if "nld-gateway is up" in line or time.monotonic() > deadline:
                break
        assert any("loading" in x for x in lines), lines  # progress while the model loads
        assert any(f"http://127.0.0.1:{port}/v1" in x for x in lines), lines
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(url + "/v1/models").status_code == 401  # the key file from the environment
        assert httpx.get(url + "/v1/models", headers=auth).json()["data"][0]["id"] == serve_model_dir.name
        policy = wait_for_policy(url, auth, lambda p: p["attached"] and p["signals"]["replicas"]["value"] is not None)
        assert policy["signals"]["replicas"]["value"] == 0.0, policy  # no answer yet: no replica reported
        # the first view of the fleet is in (before it the preset's initial_mode, ar, decides): an idle
        # cold fleet (no cost model yet) goes by the static thresholds, so one request gets self_spec
        r = httpx.post(url + "/v1/completions", json={"model": serve_model_dir.name, "prompt": "x", "max_tokens": 4},
                       timeout=60, headers=auth)
        assert r.status_code == 200 and r.headers["x-nld-decoding-mode"] == "self_spec", (r.headers, policy)
        assert listening_addresses(metrics_port) == {"127.0.0.1"}  # never 0.0.0.0
        assert listening_addresses(replica_port) == {"127.0.0.1"}
        # each replica reserves its share of the node's CPUs, so its engine runs that many torch
        # threads (Serve's default of one CPU per replica would give one, whatever the machine)
        seen = {}
        for _ in range(20):
            stats = httpx.get(f"http://127.0.0.1:{replica_port}/stats", timeout=10).json()
            seen[stats["replica_id"]] = (stats["torch_threads"], stats["engine_pid"])
            if len(seen) == replicas:
                break
        assert len(seen) == replicas and {t for t, _ in seen.values()} == {threads}, seen
        assert len({pid for _, pid in seen.values()}) == replicas  # an engine process each
        # the preset reads the reports on the replica's answers: a report is the engine's last stats
        # snapshot (pushed when it idles, after the outputs that idled it), so the answer after the
        # first one carries the steps the first one measured; then one replica and its cost model (the signal board takes the page
        # first, the next evaluation, within 0.1 s, the goodput view: wait for both)
        for _ in range(4 * replicas):  # HAProxy spreads them: every replica answers and reports
            time.sleep(0.6)
            r = httpx.post(url + "/v1/completions", json={"model": serve_model_dir.name, "prompt": "x",
                                                          "max_tokens": 4}, timeout=60, headers=auth)
            assert r.status_code == 200
        policy = wait_for_policy(url, auth, lambda p: p["signals"]["replicas"]["value"] == replicas
                                 and (p["signals"]["costs"]["value"] or 0) > 0
                                 and (p["goodput"] or {}).get("model", {}).get("steps", 0) > 0)
        assert policy["policy"] == "adaptive" and policy["signals"]["replicas"]["value"] == replicas, policy
        assert policy["signals"]["fleet_running"]["error"] is None
        # the calibrating default reads the replica's measured cost model from the same reports
        assert policy["signals"]["costs"]["error"] is None and policy["signals"]["costs"]["value"] > 0, policy
        assert policy["goodput"]["model"]["replicas"] == replicas and policy["goodput"]["model"]["steps"] > 0, policy
        assert policy["reports"]["rejected"] == 0 and len(policy["reports"]["replicas"]) == replicas, policy
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, out
    assert "stopping the replicas" in out and "Traceback" not in out
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{replica_port}/health", timeout=2)


def wait_for_policy(url: str, auth: dict, ready, timeout_s: float = 30.0) -> dict:
    """The gateway's policy view once `ready(view)` holds, or the last view after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        policy = httpx.get(url + "/v1/nld/policy", headers=auth).json()
        if ready(policy) or time.monotonic() > deadline:
            return policy
        time.sleep(0.5)


def test_up_binds_the_engine_and_the_serving_path_to_their_cpus(serve_model_dir):
    """--engine-cpus binds every thread of the engine process (one torch thread per CPU) and
    --serving-cpus the gateway, Ray and the replica's serving process, and the stack serves."""
    cpus = sorted(os.sched_getaffinity(0))
    engine, serving = cpus[0], cpus[1:] or cpus[:1]
    port, replica_port, metrics_port = free_port(), free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "up", "--model", str(serve_model_dir), "--port", str(port),
         "--replica-port", str(replica_port), "--metrics-port", str(metrics_port), "--no-auth",
         "--engine-cpus", str(engine), "--serving-cpus", ",".join(map(str, serving))],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        for line in proc.stdout:
            if "nld-gateway is up" in line or time.monotonic() > deadline:
                break
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions",
                       json={"model": serve_model_dir.name, "prompt": "x", "max_tokens": 4}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        stats = httpx.get(f"http://127.0.0.1:{replica_port}/stats", timeout=10).json()
        assert stats["torch_threads"] == 1, stats
        engine_pid = stats["engine_pid"]
        threads = os.listdir(f"/proc/{engine_pid}/task")
        assert {frozenset(os.sched_getaffinity(int(t))) for t in threads} == {frozenset({engine})}
        replica_pid = int(Path(f"/proc/{engine_pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        assert os.sched_getaffinity(replica_pid) == set(serving)  # inherited from python -m replicas
        assert os.sched_getaffinity(proc.pid) == set(serving)  # the gateway
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, out
