"""The calibrating default preset on the real stack, on two models, with no hand-set thresholds: the
embedded model (its draft is accepted) and a random-weights model (its draft is not). The same
`policies/presets/adaptive.yaml` (the default, calibrating; scoped to each model's Serve application) picks self_spec at
concurrency 1 only for the first, and ar at high concurrency for both, and says the cost model
decided (`/v1/nld/policy` -> goodput.decided_by)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest
import yaml

from gateway.app import create_app
from gateway.config import GatewayConfig
from gateway.metrics import GatewayMetrics, InflightCounter
from gateway.replica_client import HttpReplicaClient
from policies import PRESETS, PolicyHolder, StackPorts

from .servers import serve_in_thread

pytestmark = pytest.mark.slow

EMBEDDED = Path(__file__).resolve().parents[2] / "models" / "nld-tiny-pystdlib"
HIGH = 48
# The embedded model continues this with more of the same, and its draft gets ~23 of 32 tokens
# accepted per cycle: measured on this 2-core VM by the replica (realized tokens/s, one torch
# thread), self_spec is about 5x ar at 1 request, and ar about 1.2-1.3x self_spec at 48 (3,300-3,800
# vs 2,500-3,100 tok/s). The random model's draft is never accepted on it (1 token per cycle):
# ar is 3x self_spec at 1. On held-out file starts the
# embedded model accepts ~3 tokens per cycle and ar wins at 1 request too (docs/PERFORMANCE.md).
PROMPT = "import os\nimport os\nimport os\nimport os\n"


def scoped_preset(app: str, out: Path) -> Path:
    """The shipped preset, its signals limited to one Serve application's replicas (the shared
    test stack runs several); nothing else changed."""
    doc = yaml.safe_load((PRESETS / "adaptive.yaml").read_text())
    for s in doc["signals"]:
        if s["source"] in ("scrape", "goodput"):
            s["labels"] = {"application": app}
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


@pytest.fixture(scope="module")
def random_model_dir(tmp_path_factory):
    from replicas.engine.testing import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("calib") / "random", seed=23, lora_rank=4)


def deploy(app: str, model: Path):
    from ray import serve

    from replicas.app import bind_app

    config = {"model_path": str(model), "torch_threads": 1, "model_name": "nld-test",
              "engine": {"max_batch_size": HIGH, "max_seq_len": 512, "max_waiting": 2 * HIGH}}
    serve.run(bind_app(config, {"ray_actor_options": {"num_cpus": 1}}), name=app, route_prefix=f"/{app}")


async def load(url: str, clients: int, seconds: float, prompt: str) -> dict:
    body = {"model": "nld-test", "prompt": prompt, "max_tokens": 48, "temperature": 0, "ignore_eos": True}
    counts = {"ok": 0, "failed": 0}
    deadline = time.monotonic() + seconds

    async def client(http):
        while time.monotonic() < deadline:
            r = await http.post(url + "/v1/completions", json=body)
            counts["ok" if r.status_code == 200 else "failed"] += 1

    async with httpx.AsyncClient(timeout=120) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return counts


def run_level(url: str, clients: int, seconds: float, prompt: str) -> tuple[dict, dict]:
    counts = asyncio.run(load(url, clients, seconds, prompt))
    return counts, httpx.get(url + "/v1/nld/policy", timeout=5).json()


@pytest.mark.parametrize("app,expect_c1", [("calib_embedded", "self_spec"), ("calib_random", "ar")])
def test_the_same_preset_calibrates_to_each_model(serve_stack, random_model_dir, tmp_path, app, expect_c1):
    from ray import serve

    model = EMBEDDED if app == "calib_embedded" else random_model_dir
    deploy(app, model)
    try:
        port = int(serve_stack.metrics_url.split(":")[-1].split("/")[0])
        cfg = GatewayConfig(replica_url=f"{serve_stack.url}/{app}", model_name="nld-test")
        metrics = GatewayMetrics(InflightCounter())
        holder = PolicyHolder(scoped_preset(app, tmp_path / "policy.yaml"),
                              local_counters={"inflight": lambda: metrics.inflight.value},
                              registry=metrics.registry, ports=StackPorts(metrics_port=port))
        prompt = PROMPT
        with serve_in_thread(create_app(cfg, HttpReplicaClient(cfg), holder, metrics=metrics)) as url:
            trace = []
            counts, state = run_level(url, 1, 25, prompt)  # cold start (thresholds), then measured
            trace.append((1, counts, state["mode"], state["goodput"]))
            print(json.dumps(trace[-1]))
            assert counts["failed"] == 0, trace
            assert state["goodput"]["decided_by"] == "goodput", trace
            assert state["mode"] == expect_c1, trace
            counts, state = run_level(url, HIGH, 25, prompt)
            trace.append((HIGH, counts, state["mode"], state["goodput"]))
            print(json.dumps(trace[-1]))
            assert counts["failed"] == 0, trace
            assert state["goodput"]["decided_by"] == "goodput", trace
            assert state["mode"] == "ar", trace
    finally:
        serve.delete(app)
