"""The calibrating default preset on the real stack, on two models, with no hand-set thresholds: the
embedded model (its draft is accepted) and a random-weights model (its draft is not). The same
`policies/presets/adaptive.yaml` (the default, calibrating; scoped to each model's Serve application) picks self_spec at
concurrency 1 only for the first, and ar at high concurrency for both, and says the cost model
decided (`/v1/nld/policy` -> goodput.decided_by), from the reports on the replicas' answers alone
(no metrics page fetched)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest
import yaml

from gateway.bootstrap import PolicySpec, build_gateway
from gateway.config import GatewayConfig
from policies import PRESETS, StackPorts

from .servers import serve_in_thread

pytestmark = pytest.mark.slow

EMBEDDED = Path(__file__).resolve().parents[2] / "models" / "nld-tiny-pystdlib"
HIGH = 48
# At one request the clients send PROMPT: the embedded model continues it with more of the same,
# and its draft is accepted for most of each 32-token block, so self_spec wins on this CPU (about
# 4x ar, measured by the replica); the random model's draft is never accepted on anything (1 token
# per cycle), so ar wins (about 3x). Under load the clients send ordinary code instead (held-out
# files cut mid-body, after a def, in a class...: tests/training/data/heldout_prompts.json), on
# which the embedded model's 8-token drafts are accepted in part and ar wins. On PROMPT alone the
# current model's 8-token drafts are accepted 8 of 8, and self_spec stays ahead even at 48
# requests (measured 5,141 vs 4,726 tok/s): the policy then rightly keeps self_spec there.
PROMPT = "import os\nimport os\nimport os\nimport os\n"


def heldout_texts() -> list[str]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(EMBEDDED / "tokenizer.json"))
    data = json.loads((Path(__file__).resolve().parents[1] / "training" / "data" / "heldout_prompts.json").read_text())
    # 32 to 96 tokens (up to ~550 for the random model, whose tokenizer splits text finer: max_seq_len 1024)
    return [tok.decode(p["prompt"]) for p in data["prompts"] if p["kind"] != "file_start" and 32 <= p["length"] <= 96]


def scoped_preset(app: str, out: Path) -> Path:
    """The shipped preset, its signals limited to one Serve application's replicas (the shared
    test stack runs several; the reports carry the `application` label as Ray's page does);
    nothing else changed."""
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
              "engine": {"max_batch_size": HIGH, "max_seq_len": 1024, "max_waiting": 2 * HIGH}}
    serve.run(bind_app(config, {"ray_actor_options": {"num_cpus": 1}}), name=app, route_prefix=f"/{app}")


async def load(url: str, clients: int, seconds: float, prompts: list[str]) -> dict:
    counts = {"ok": 0, "failed": 0}
    deadline = time.monotonic() + seconds

    async def client(http, k: int):
        while time.monotonic() < deadline:
            body = {"model": "nld-test", "prompt": prompts[k % len(prompts)], "max_tokens": 48, "temperature": 0,
                    "ignore_eos": True}
            k += 1
            r = await http.post(url + "/v1/completions", json=body)
            counts["ok" if r.status_code == 200 else "failed"] += 1

    async with httpx.AsyncClient(timeout=120) as http:
        await asyncio.gather(*(client(http, i) for i in range(clients)))
    return counts


def run_level(url: str, clients: int, seconds: float, prompts: list[str]) -> tuple[dict, dict]:
    counts = asyncio.run(load(url, clients, seconds, prompts))
    return counts, httpx.get(url + "/v1/nld/policy", timeout=5).json()


@pytest.mark.parametrize("app,expect_c1", [("calib_embedded", "self_spec"), ("calib_random", "ar")])
def test_the_same_preset_calibrates_to_each_model(serve_stack, random_model_dir, tmp_path, app, expect_c1):
    from ray import serve

    model = EMBEDDED if app == "calib_embedded" else random_model_dir
    deploy(app, model)
    try:
        port = int(serve_stack.metrics_url.split(":")[-1].split("/")[0])
        cfg = GatewayConfig(replica_url=f"{serve_stack.url}/{app}", model_name="nld-test")
        gw = build_gateway(cfg, PolicySpec(file=scoped_preset(app, tmp_path / "policy.yaml"),
                                           ports=StackPorts(metrics_port=port)))
        holder = gw.policy
        with serve_in_thread(gw.app) as url:
            trace = []
            counts, state = run_level(url, 1, 25, [PROMPT])  # cold start (thresholds), then measured
            trace.append((1, counts, state["mode"], state["goodput"]))
            print(json.dumps(trace[-1]))
            assert counts["failed"] == 0, trace
            assert state["goodput"]["decided_by"] == "goodput", trace
            assert state["mode"] == expect_c1, trace
            counts, state = run_level(url, HIGH, 25, heldout_texts())
            trace.append((HIGH, counts, state["mode"], state["goodput"]))
            print(json.dumps(trace[-1]))
            if (state["last_switch"] or {}).get("reason") == "explore":
                # the window ended inside a one-off try of the other mode (docs/POLICY.md: a mode never
                # measured at this load is tried once, for a dwell, when the model rates it close): keep
                # the load on past the dwell, then the measured rates decide, and the try is not repeated
                more, state = run_level(url, HIGH, 15, heldout_texts())
                counts = {k: counts[k] + more[k] for k in counts}
                trace.append((HIGH, more, state["mode"], state["goodput"]))
                print(json.dumps(trace[-1]))
                assert (state["last_switch"] or {}).get("reason") != "explore", trace
            assert counts["failed"] == 0, trace
            assert state["goodput"]["decided_by"] == "goodput", trace
            assert state["mode"] == "ar", trace
            # the cost model and the load came from the replica's reports on its answers: no page fetched
            reports = holder.reports
            assert reports.replicas() and reports.parsed >= 10 and reports.rejected == 0
            pages = next(s.pages for s in holder.current.board.sources.values() if hasattr(s, "pages"))
            assert pages.fetches == 0
    finally:
        serve.delete(app)
