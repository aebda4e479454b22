"""The gateway's separate metrics listener (`serve --metrics-port`) and API-key rotation without
a restart (`gateway.key_reload`): in-process over ASGI, and the real `nld-gateway serve`
process against a fake replica server on loopback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from gateway import GatewayConfig, create_app
from gateway.auth import ApiKeyAuth, load_api_keys
from gateway.cli import build_parser
from gateway.key_reload import KeyFileWatcher
from gateway.listeners import metrics_asgi
from gateway.metrics import GatewayMetrics, InflightCounter
from tests.gateway.fakes import FakeReplicaClient, FakeReplicaState, fake_replica_app
from policies import FixedModePolicy
from tests.serving import free_port

from .servers import asgi_client, serve_in_thread

pytestmark = pytest.mark.anyio

BODY = {"model": "nld", "prompt": "hello", "max_tokens": 4}


@pytest.fixture
def anyio_backend():
    return "asyncio"


# --- the metrics listener -----------------------------------------------------------------------


async def test_metrics_route_can_leave_the_api_app():
    metrics = GatewayMetrics(InflightCounter())
    app = create_app(GatewayConfig(), FakeReplicaClient(), FixedModePolicy(), metrics=metrics, metrics_route=False)
    async with asgi_client(app) as api, asgi_client(metrics_asgi(metrics)) as scrape:
        assert (await api.post("/v1/completions", json=BODY)).status_code == 200
        assert (await api.get("/metrics")).status_code == 404
        assert "/metrics" not in (await api.get("/openapi.json")).json()["paths"]
        r = await scrape.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        assert 'nld_gateway_requests_total{mode="self_spec",status="200"} 1.0' in r.text
        assert (await scrape.head("/metrics")).status_code == 200
        for path in ("/", "/v1/models", "/health", "/metrics/x"):
            assert (await scrape.get(path)).status_code == 404
        assert (await scrape.post("/metrics")).status_code == 404


async def test_the_default_app_still_serves_metrics_beside_the_api():
    app = create_app(GatewayConfig(), FakeReplicaClient(), FixedModePolicy())
    async with asgi_client(app) as api:
        assert "nld_gateway_inflight_requests" in (await api.get("/metrics")).text


def test_serve_flags():
    ns = build_parser().parse_args(["serve", "--replica-url", "http://r:1", "--metrics-port", "9090",
                                    "--key-reload-interval", "2"])
    assert (ns.metrics_port, ns.metrics_host, ns.key_reload_interval) == (9090, None, 2.0)
    ns = build_parser().parse_args(["serve", "--replica-url", "http://r:1"])
    assert ns.metrics_port is None and ns.key_reload_interval == 10.0


# --- key rotation -------------------------------------------------------------------------------


def _secret_mount(root: Path, generation: str, keys: dict[str, str]) -> None:
    """Lay out a Kubernetes Secret volume the way the kubelet updates it: a timestamped directory,
    `..data` pointing at it (swapped by rename), one symlink per key through `..data`."""
    real = root / f"..{generation}"
    real.mkdir(parents=True)
    for name, key in keys.items():
        (real / name).write_text(key)
    tmp = root / "..data_tmp"
    tmp.symlink_to(real.name)
    os.replace(tmp, root / "..data")  # atomic swap, as the kubelet does
    for name in keys:
        link = root / name
        if not link.is_symlink():
            link.symlink_to(f"..data/{name}")


async def test_rotated_secret_mount_is_picked_up_without_a_restart(tmp_path):
    mount = tmp_path / "api-keys"
    _secret_mount(mount, "2026_01_01", {"team-a": "sk-old"})
    config = GatewayConfig(auth_enabled=True, api_keys=load_api_keys(mount))
    app = create_app(config, FakeReplicaClient(), FixedModePolicy())
    watcher = KeyFileWatcher(app.state.auth, lambda: load_api_keys(mount), interval_s=0.05)

    async def status(key: str) -> int:
        return (await c.get("/v1/models", headers={"authorization": f"Bearer {key}"})).status_code

    async with asgi_client(app) as c:
        assert await status("sk-old") == 200 and await status("sk-new") == 401
        assert watcher.check() is False  # nothing changed
        _secret_mount(mount, "2026_01_02", {"team-a": "sk-new"})  # the Secret's value rotated
        assert watcher.check() is True and watcher.reloads == 1
        assert await status("sk-new") == 200 and await status("sk-old") == 401
        # the background loop does the same
        import asyncio
        task = asyncio.create_task(watcher.run())
        _secret_mount(mount, "2026_01_03", {"team-a": "sk-new", "team-b": "sk-b"})
        for _ in range(100):
            if watcher.reloads == 2:
                break
            await asyncio.sleep(0.02)
        task.cancel()
        assert watcher.reloads == 2 and await status("sk-b") == 200 and await status("sk-new") == 200


async def test_a_broken_key_file_keeps_the_previous_keys(tmp_path, caplog):
    keys = tmp_path / "keys.txt"
    keys.write_text("sk-one\n")
    auth = ApiKeyAuth(load_api_keys(keys))
    watcher = KeyFileWatcher(auth, lambda: load_api_keys(keys), interval_s=1)
    keys.write_text("\n# emptied by mistake\n")
    assert watcher.check() is False and auth.check("Bearer sk-one")
    keys.unlink()
    assert watcher.check() is False and auth.check("Bearer sk-one")
    assert watcher.last_error and "sk-one" not in caplog.text
    keys.write_text("sk-two\n")
    assert watcher.check() is True and auth.check("Bearer sk-two") and not auth.check("Bearer sk-one")
    with pytest.raises(ValueError):
        auth.replace(set())
    with pytest.raises(ValueError):
        KeyFileWatcher(auth, lambda: frozenset({"k"}), interval_s=0)


# --- the real process -----------------------------------------------------------------------------


def _wait_for(url: str, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            httpx.get(url, timeout=2)
            return
        except httpx.TransportError:
            assert proc.poll() is None and time.monotonic() < deadline, "the gateway did not start"
            time.sleep(0.1)


@pytest.mark.slow
def test_serve_process_with_a_metrics_port_and_key_rotation(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("sk-first\n")
    port, metrics_port = free_port(), free_port()
    with serve_in_thread(fake_replica_app(FakeReplicaState())) as replica_url:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--replica-url", replica_url, "--port", str(port),
             "--metrics-port", str(metrics_port), "--api-key-file", str(keys), "--key-reload-interval", "0.2",
             "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            api, scrape = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}"
            _wait_for(api + "/health", proc)
            _wait_for(scrape + "/metrics", proc)
            first = {"authorization": "Bearer sk-first"}
            assert httpx.post(api + "/v1/completions", json=BODY, headers=first).status_code == 200
            assert httpx.get(api + "/metrics").status_code == 404  # not on the API port (nor behind an Ingress)
            text = httpx.get(scrape + "/metrics").text
            assert 'nld_gateway_requests_total{mode="self_spec",status="200"} 1.0' in text
            keys.write_text("sk-second\n")  # rotate
            deadline = time.monotonic() + 10
            while httpx.get(api + "/v1/models", headers={"authorization": "Bearer sk-second"}).status_code != 200:
                assert time.monotonic() < deadline, "the rotated key was not picked up"
                time.sleep(0.1)
            assert httpx.get(api + "/v1/models", headers=first).status_code == 401
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            out = proc.communicate(timeout=10)[0].decode()
    assert "sk-first" not in out and "sk-second" not in out
