"""`nld-gateway up`: the whole stack on one machine (Ray Serve replicas + the gateway).

Contract: `cmd_up(args, environ)` (called by `gateway.cli.main`, which reads the environment)
first builds and checks the whole configuration: the checkpoint, auth (as `serve`: `--api-key-file`,
else `$NLD_API_KEY_FILE`; `--no-auth` forces it off) and the policy, whose `{metrics_host}` and
`{metrics_port}` are this stack's (127.0.0.1 and `--metrics-port`). A bad configuration exits
with status 2 and one line (never a key, never a traceback) before anything starts. Then it
starts `python -m replicas` (local Ray, the replicas and Ray's metrics port on loopback, Ray
metrics every 500 ms) as a child process and shows its progress, waits until it prints READY,
serves the gateway in this process and prints the URL and a curl example. Ctrl-C (or SIGTERM)
stops the gateway, then the replicas, cleanly. The gateway never imports the engine: the
replicas are another process reached over HTTP, as in a cluster.
Non-goals: multi-node clusters (use the Helm chart).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

DEFAULT_MODEL = "models/nld-tiny-pystdlib"
REPLICA_HOST = "127.0.0.1"  # the replicas' HTTP proxy and Ray's metrics port listen on loopback only


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
    p.add_argument("--ingress", default="haproxy", choices=("haproxy", "proxy"),
                   help="how HTTP reaches the replicas: Ray Serve's HAProxy (default) or its Python proxy")
    p.add_argument("--replica-routing", default="direct", choices=("direct", "ingress"),
                   help="how the gateway reaches the replicas: direct (default) to each replica's own HTTP port, "
                        "learned from their answers; ingress: always through HAProxy (nld-gateway serve "
                        "--replica-routing)")
    add_routing_arguments(p, pack_auto=True)
    p.add_argument("--torch-threads", type=int, default=None,
                   help="CPU threads of the replica's engine process (default: the CPUs the replica reserves)")
    p.add_argument("--replicas", type=replica_count_arg, default="auto", metavar="N|auto|policy",
                   help="how many replicas, each with its own engine and an equal share of the CPUs (default "
                        "auto: one per CPU, at most 4, on a CPU; python -m replicas --replicas); policy: Ray "
                        "Serve autoscales them by the policy's `autoscaling` block, each reserving --replica-cpus "
                        "(default every CPU, hence one replica)")
    p.add_argument("--replica-cpus", type=float, default=None,
                   help="CPUs each replica reserves in Ray, hence its engine's threads (default: an equal share "
                        "of this machine's; python -m replicas --replica-cpus)")
    p.add_argument("--engine-cpus", default=None, metavar="IDS",
                   help="CPU ids the engine process is bound to, e.g. 0 (python -m replicas --engine-cpus)")
    p.add_argument("--serving-cpus", default=None, metavar="IDS",
                   help="CPU ids for the gateway, Ray and the replicas' serving processes, e.g. 1 (with "
                        "--engine-cpus: the serving path keeps off the engine's CPUs)")
    p.add_argument("--parallel-min-tokens", type=int, default=None, metavar="N",
                   help="on a CPU, engine steps of fewer tokens run on one torch thread, larger ones on all "
                        "(python -m replicas --parallel-min-tokens)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, metavar="N",
                   help="tokens per engine step (python -m replicas --max-num-batched-tokens; default 512 on a "
                        "CPU, 2048 on CUDA)")
    p.add_argument("--control-loop-interval-s", type=float, default=None,
                   help="Ray Serve controller's loop period (default: python -m replicas' 0.5 s)")
    p.add_argument("--metrics-report-interval-ms", type=int, default=None,
                   help="how often Ray's processes report metrics to the metrics port (default: python -m "
                        "replicas'; the presets read the replicas' reports, not that page)")
    p.add_argument("--api-key-file", default=None,
                   help="file (one key per line) or Secret mount directory; default $NLD_API_KEY_FILE; enables auth")
    p.add_argument("--no-auth", action="store_true", help="disable auth even when a key file is given")
    p.add_argument("--log-level", default="warning")
    add_loop_argument(p)
    p.set_defaults(func=cmd_up)


def add_loop_argument(p: argparse.ArgumentParser) -> None:
    """`--loop` of `serve` and `up` (`listeners.loop_factory`)."""
    from .listeners import LOOPS

    p.add_argument("--loop", default="auto", choices=LOOPS,
                   help="the gateway's event loop: auto (uvloop where installed, as uvicorn chooses), uvloop or asyncio")


def add_routing_arguments(p: argparse.ArgumentParser, *, pack_auto: bool = False) -> None:
    """`--stream-channels` / `--no-stream-channels` (`gateway.channel`) and `--pack-ar` (`gateway.placement`)
    of `serve` and `up`; `up`'s `--pack-ar` also takes `auto`, its default (`resolve_pack_ar`)."""
    p.add_argument("--stream-channels", action=argparse.BooleanOptionalAction, default=True,
                   help="direct routing: carry streamed events over one channel per replica (default on)")
    auto = (f" auto (default): {AUTO_PACK_AR} on a host of at most {AUTO_PACK_MAX_CPUS} CPUs, where the replicas and "
            f"the serving path share them, else 0") if pack_auto else ""
    p.add_argument("--pack-ar", type=pack_arg_or_auto if pack_auto else pack_arg, default="auto" if pack_auto else 0,
                   metavar="N|auto" if pack_auto else "N",
                   help="direct routing: requests running ar fill the busiest replica below N in flight before the "
                        "next (0: spread every request; gateway.placement)." + auto)


# `up --pack-ar auto`: measured on a 2-CPU host (one one-CPU replica per CPU), 4 requests in `ar` made
# 1.16x (non-streamed) and 1.28x (streamed) the tokens/s when packed onto one replica, level at 2, 8
# and 16 (docs/PERFORMANCE.md, "Packing `ar` requests at low load"); larger hosts are not measured.
AUTO_PACK_AR = 4
AUTO_PACK_MAX_CPUS = 2


def pack_arg(text: str) -> int:
    """A count >= 0 (an argparse type)."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"want a count >= 0 (0: spread every request), got {text!r}")
    return int(text)


def pack_arg_or_auto(text: str) -> int | str:
    return text if text == "auto" else pack_arg(text)


def resolve_pack_ar(spec: int | str, cpus: int) -> int:
    """`--pack-ar` of `up`: a count as given; `auto` is `AUTO_PACK_AR` on a host of at most
    `AUTO_PACK_MAX_CPUS` CPUs (the replicas' engines then take every CPU the serving path needs),
    else 0 (spread)."""
    if spec != "auto":
        return int(spec)
    return AUTO_PACK_AR if cpus <= AUTO_PACK_MAX_CPUS else 0


def replica_count_arg(text: str) -> str:
    """`auto`, `policy` or a positive count (an argparse type; `python -m replicas` resolves `auto`)."""
    if text not in ("auto", "policy") and not (text.isdigit() and int(text) > 0):
        raise argparse.ArgumentTypeError(f"want a positive replica count, auto or policy, got {text!r}")
    return text


def replicas_command(args, model_name: str, autoscaling: dict | None) -> list[str]:
    """The `python -m replicas` command line `up` runs, its options passed through."""
    cmd = [sys.executable, "-u", "-m", "replicas", "--model", args.model, "--model-name", model_name,
           "--host", REPLICA_HOST, "--port", str(args.replica_port), "--metrics-port", str(args.metrics_port)]
    if args.replicas != "policy":
        cmd += ["--replicas", args.replicas]
    if args.torch_threads:
        cmd += ["--torch-threads", str(args.torch_threads)]
    if args.replica_cpus is not None:
        cmd += ["--replica-cpus", f"{args.replica_cpus:g}"]
    for flag, value in (("--engine-cpus", args.engine_cpus), ("--serving-cpus", args.serving_cpus)):
        if value:
            cmd += [flag, value]
    if args.parallel_min_tokens is not None:
        cmd += ["--parallel-min-tokens", str(args.parallel_min_tokens)]
    if args.max_num_batched_tokens is not None:
        cmd += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    cmd += ["--ingress", args.ingress]
    if args.control_loop_interval_s is not None:
        cmd += ["--control-loop-interval-s", f"{args.control_loop_interval_s:g}"]
    if args.metrics_report_interval_ms is not None:
        cmd += ["--metrics-report-interval-ms", str(args.metrics_report_interval_ms)]
    if autoscaling and args.replicas == "policy":  # the policy's `autoscaling` block: Serve's autoscaling_config
        cmd += ["--autoscaling-json", json.dumps(autoscaling)]
    return cmd


def start_replicas(args, model_name: str, autoscaling: dict | None) -> subprocess.Popen:
    return subprocess.Popen(replicas_command(args, model_name, autoscaling), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_ready(proc: subprocess.Popen) -> bool:
    """Echo the replicas' progress until READY; False if the process exits first."""
    for line in proc.stdout:
        line = line.rstrip()
        if line.startswith("READY"):
            print(f"[replicas] ready at {line.split()[-1]}", flush=True)
            threading.Thread(target=_drain, args=(proc,), daemon=True).start()
            return True
        ray_chatter = line.startswith(("(", "INFO", "WARNING")) or "\tINFO " in line or "\tWARNING " in line
        if line and not ray_chatter:
            print(f"[replicas] {line}", flush=True)
    return False


def _drain(proc: subprocess.Popen) -> None:
    for _ in proc.stdout:
        pass


def stop_replicas(proc: subprocess.Popen) -> None:
    """SIGTERM the launcher alone (it shuts Serve and Ray down in order); kill the group if stuck."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_until_signal(server, on_started=lambda: None, loop=None) -> None:
    """Serve until SIGINT or SIGTERM, then shut down gracefully (lifespan included) and return.

    uvicorn's own handling re-raises the signal after its shutdown, which would end this
    process before the replicas are stopped; here the signal only asks the server to exit.
    `loop`: the event loop factory (`listeners.loop_factory`; default: its `auto`)."""
    from .listeners import run

    async def main() -> None:
        running = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            running.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
        server.capture_signals = contextlib.nullcontext  # the handlers above replace uvicorn's
        task = asyncio.create_task(server.serve())
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        if server.started:
            on_started()
        await task

    run(main(), loop)


def up_config(args: argparse.Namespace, model_name: str, environ: dict[str, str], cpus: int | None = None):
    """The gateway's `GatewayConfig` for `up` (keys from the flag or the environment, as `serve`);
    `cpus`: this host's, for `--pack-ar auto` (default: the CPUs this process may run on)."""
    from .bootstrap import auth_fields
    from .config import GatewayConfig

    fields = {"replica_url": f"http://{REPLICA_HOST}:{args.replica_port}", "model_name": model_name,
              "replica_routing": args.replica_routing, "stream_channels": args.stream_channels,
              "pack_ar": resolve_pack_ar(args.pack_ar, len(os.sched_getaffinity(0)) if cpus is None else cpus)}
    fields.update(auth_fields(args.api_key_file, args.no_auth, environ))
    return GatewayConfig(**fields)


def up_policy(args: argparse.Namespace):
    """(`PolicySpec`, Serve `autoscaling_config` or None) for `up`: the --policy file, whose signals
    read this stack's Ray metrics port, and its `autoscaling` block; else a fixed self_spec policy.
    Raises `PolicyFileError` for a bad file."""
    from policies import StackPorts, load_policy_file

    from .bootstrap import PolicySpec

    if not args.policy:
        return PolicySpec(), None
    autoscaling = load_policy_file(args.policy).serve_autoscaling_config()
    return PolicySpec(file=args.policy, ports=StackPorts(metrics_host=REPLICA_HOST, metrics_port=args.metrics_port)), \
        autoscaling


def cmd_up(args: argparse.Namespace, environ: dict[str, str]) -> int:
    import uvicorn

    from .bootstrap import CONFIG_ERRORS, build_gateway, config_error
    from .http_protocol import HTTP_PROTOCOL
    from .listeners import loop_factory

    model = Path(args.model)
    if not (model / "config.json").is_file():
        print(f"nld-gateway up: no NLD checkpoint at {model} (config.json missing)", file=sys.stderr)
        return 2
    model_name = args.model_name or model.name
    try:
        loop = loop_factory(args.loop)  # `--loop uvloop` without uvloop fails here, before anything starts
        config = up_config(args, model_name, environ)
        spec, autoscaling = up_policy(args)
        gateway = build_gateway(config, spec)  # checks the policy file before anything starts
    except CONFIG_ERRORS as e:
        return config_error("up", e)
    if args.engine_cpus and args.replicas not in ("auto", "policy", "1"):
        print(f"nld-gateway up: --engine-cpus binds every replica's engine to the same CPUs: use it with one "
              f"replica, not --replicas {args.replicas}", file=sys.stderr)
        return 2
    if args.serving_cpus:  # the gateway in this process; the replicas bind themselves (--serving-cpus)
        try:
            os.sched_setaffinity(0, [int(x) for x in args.serving_cpus.split(",")])
        except (ValueError, OSError, AttributeError) as e:
            print(f"nld-gateway up: --serving-cpus {args.serving_cpus}: {getattr(e, 'strerror', None) or e}",
                  file=sys.stderr)
            return 2
    if args.pack_ar == "auto" and config.pack_ar:
        print(f"ar requests fill one replica up to {config.pack_ar} before the next (--pack-ar auto on a host "
              f"of at most {AUTO_PACK_MAX_CPUS} CPUs; --pack-ar 0 spreads them)", flush=True)
    print(f"starting the replicas on {model} (Ray, then the weights) ...", flush=True)
    proc = start_replicas(args, model_name, autoscaling)
    try:
        if not wait_ready(proc):
            print("nld-gateway up: the replicas exited before they were ready", file=sys.stderr)
            return 1
        url = f"http://{args.host}:{args.port}"

        def banner() -> None:
            print(f"\nnld-gateway is up: {url}/v1  (model {model_name!r}; Ctrl-C stops everything)\n"
                  f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
                  f"    -d '{{\"model\": \"{model_name}\", \"messages\": [{{\"role\": \"user\", \"content\": "
                  f"\"def fib(n):\"}}], \"max_tokens\": 64, \"decoding_mode\": \"self_spec\"}}'\n", flush=True)

        run_until_signal(uvicorn.Server(uvicorn.Config(gateway.app, host=args.host, port=args.port, http=HTTP_PROTOCOL,
                                                       log_level=args.log_level, access_log=False)), banner, loop)
    finally:
        print("stopping the replicas ...", flush=True)
        stop_replicas(proc)
    return 0
