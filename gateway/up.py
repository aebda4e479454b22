"""`nld-gateway up`: the whole stack on one machine (Ray Serve replicas + the gateway).

Contract: starts `python -m replicas` (local Ray, the replicas on a loopback port, Ray metrics
every 500 ms) as a child process and shows its progress, waits until it prints READY, then
serves the gateway in this process and prints the URL and a curl example. Ctrl-C (or SIGTERM)
stops the gateway, then the replicas, cleanly. The gateway never imports the engine: the
replicas are another process reached over HTTP, as in a cluster.
Non-goals: multi-node clusters (use the Helm chart).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

DEFAULT_MODEL = "models/nld-tiny-pystdlib"


def add_up_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="start Ray Serve replicas and the gateway on this machine")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"NLD checkpoint directory (default {DEFAULT_MODEL})")
    p.add_argument("--model-name", default=None, help="served model id (default: the model directory's name)")
    p.add_argument("--policy", default=None, help="mode policy YAML, e.g. policies/presets/adaptive.yaml "
                   "(default: a fixed self_spec policy)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--replica-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8080, help="Ray's metrics export port")
    p.add_argument("--api-key-file", default=None, help="enable auth with these keys (default: auth off)")
    p.add_argument("--log-level", default="warning")
    p.set_defaults(func=cmd_up)


def start_replicas(args, model_name: str) -> subprocess.Popen:
    cmd = [sys.executable, "-u", "-m", "replicas", "--model", args.model, "--model-name", model_name,
           "--host", "127.0.0.1", "--port", str(args.replica_port), "--metrics-port", str(args.metrics_port)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def wait_ready(proc: subprocess.Popen) -> bool:
    """Echo the replicas' progress until READY; False if the process exits first."""
    for line in proc.stdout:
        line = line.rstrip()
        if line.startswith("READY"):
            print(f"[replicas] ready at {line.split()[-1]}", flush=True)
            threading.Thread(target=_drain, args=(proc,), daemon=True).start()
            return True
        ray_chatter = line.startswith(("(", "INFO", "WARNING")) or " INFO " in line
        if line and not ray_chatter:
            print(f"[replicas] {line}", flush=True)
    return False


def _drain(proc: subprocess.Popen) -> None:
    for _ in proc.stdout:
        pass


def stop_replicas(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def cmd_up(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import create_app
    from .auth import load_api_keys
    from .config import GatewayConfig
    from .metrics import GatewayMetrics, InflightCounter
    from .cli import build_policy
    from .replica_client import HttpReplicaClient

    model = Path(args.model)
    if not (model / "config.json").is_file():
        print(f"nld-gateway up: no NLD checkpoint at {model} (config.json missing)", file=sys.stderr)
        return 2
    model_name = args.model_name or model.name
    fields = {"replica_url": f"http://127.0.0.1:{args.replica_port}", "model_name": model_name}
    if args.api_key_file:
        fields.update(api_keys=load_api_keys(args.api_key_file), auth_enabled=True)
    config = GatewayConfig(**fields)
    metrics = GatewayMetrics(InflightCounter())
    try:
        policy = build_policy(args, metrics)
    except ValueError as e:
        print(f"nld-gateway up: {e}", file=sys.stderr)
        return 2
    print(f"starting the replicas on {model} (Ray, then the weights) ...", flush=True)
    proc = start_replicas(args, model_name)
    try:
        if not wait_ready(proc):
            print("nld-gateway up: the replicas exited before they were ready", file=sys.stderr)
            return 1
        app = create_app(config, HttpReplicaClient(config, on_retry=metrics.retries.inc), policy, metrics=metrics)
        url = f"http://{args.host}:{args.port}"
        print(f"\nnld-gateway is up: {url}/v1  (model {model_name!r}; Ctrl-C stops everything)\n"
              f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
              f"    -d '{{\"model\": \"{model_name}\", \"messages\": [{{\"role\": \"user\", \"content\": "
              f"\"def fib(n):\"}}], \"max_tokens\": 64, \"decoding_mode\": \"self_spec\"}}'\n", flush=True)
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    finally:
        print("stopping the replicas ...", flush=True)
        stop_replicas(proc)
    return 0
