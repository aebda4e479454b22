"""Run the replicas locally: start Ray in this process, deploy `build_app`, serve until Ctrl-C.

    python -m replicas --model DIR [--host 127.0.0.1] [--port 8001] [--config serve.yaml]

Ray's metrics report interval is set to 2 s (--metrics-report-interval-ms) so replica metrics
are at most ~2 s old on Ray's metrics port (--metrics-port); the Serve controller loops every
0.5 s (--control-loop-interval-s; Serve's default is 0.1 s, see `CONTROL_LOOP_INTERVAL_S`), and
Ray's agent collects node statistics every 30 s (--node-stats-interval-ms, `NODE_STATS_INTERVAL_MS`):
each of Ray's periodic jobs is a CPU burst beside the engine on a small machine.
With a loopback --host (127.0.0.1, localhost, ::1) Ray's metrics port listens on loopback too,
never on 0.0.0.0 (see `ray_environment`). The ingress
(--ingress, `replicas/ingress.py`) is HAProxy in front of replicas that serve HTTP themselves,
unless `proxy` asks for Serve's Python proxy. The environment Ray reads is set here, before
Ray starts. Each replica reserves the whole node's CPUs unless --replica-cpus (or the config's
`ray_actor_options.num_cpus`) says otherwise: Ray sets the engine's torch threads to that number,
and a replica count the node cannot hold is capped (`replica_cpus_options`). --replicas fixes
the count (`auto`: one per CPU on a CPU device, up to `AUTO_REPLICAS_MAX`), each replica
reserving an equal share of the CPUs. --engine-cpus binds
each replica's engine process to those CPUs and --serving-cpus this process, hence Ray and the
replicas' serving processes, to others (the layout vLLM's CPU backend uses). Prints
`READY <url>` once the application answers. This module and
`nld-gateway up` are the entry points that build `ReplicaConfig`.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import signal
import sys
import threading
from pathlib import Path

import yaml

from .config import ReplicaConfig
from .layout import (AUTO_REPLICAS_MAX, bind_serving, cpu_list, fixed_replicas_options, replica_count,
                     replica_cpus_options, replicas_arg)


def replica_config_from(args) -> tuple[ReplicaConfig, dict]:
    """(ReplicaConfig, deployment options) from a Serve config file and/or flags."""
    options: dict = {}
    base: dict = {}
    if args.config:
        conf = yaml.safe_load(Path(args.config).read_text())
        app = conf["applications"][0]
        base = dict(app.get("args") or {})
        dep = next((d for d in app.get("deployments", []) if d.get("name") == "NLDReplica"), {})
        options = {k: v for k, v in dep.items() if k != "name"}
    if args.model:
        base["model_path"] = args.model
    if args.model_name:
        base["model_name"] = args.model_name
    if getattr(args, "torch_threads", None):
        base["torch_threads"] = args.torch_threads
    if getattr(args, "engine_cpus", None):
        base["engine_cpus"] = args.engine_cpus
    if getattr(args, "ingress", "haproxy") == "proxy":  # no own port to advertise behind Serve's Python proxy
        base["advertise_address"] = False
    for name in ("parallel_min_tokens", "max_num_batched_tokens"):  # over the config file's engine block
        if getattr(args, name, None) is not None:
            base["engine"] = {**(base.get("engine") or {}), name: getattr(args, name)}
    return ReplicaConfig.model_validate(base), options


# Ray reads this when it is imported: with it off, Ray takes the loopback address as the node IP
# instead of the address that routes outside (ray._private.services.get_node_ip_address).
RAY_LOCAL_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def ray_environment(host: str) -> dict[str, str]:
    """Environment variables for Ray so that its metrics port listens where the replicas do.

    Ray 2.60's reporter agent binds the metrics export port to the loopback address when the
    node IP is a loopback address, and to every interface otherwise
    (`ray/dashboard/modules/reporter/reporter_agent.py`: `address=get_localhost_ip() if
    is_localhost(self._ip) else ""`). On Linux `ray.init` never keeps a loopback node IP: it
    replaces `_node_ip_address="127.0.0.1"` with the address that routes outside
    (`services.resolve_ip_for_localhost`), unless `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, under
    which the node IP is the loopback address (a single-node Ray, which a loopback host is
    anyway). A non-loopback host changes nothing: Ray then listens on every interface, the only
    other choice it has."""
    return {RAY_LOCAL_NODE_ENV: "0"} if is_loopback(host) else {}


# The Serve controller's loop period here. Serve's 0.1 s costs an idle stack about 2.5% of a core
# in the controller and the GCS it calls (measured on the 2-core VM: 0.58 + 0.31 CPU-s per 20 s,
# against 0.19 + 0.15 at 0.5 s); it reconciles replicas and autoscaling, whose delays are tens of
# seconds, so 0.5 s changes no decision that matters and no startup time (13-15 s either way).
CONTROL_LOOP_INTERVAL_S = 0.5


def controller_environment(interval_s: float) -> dict[str, str]:
    """Environment for Ray Serve's controller (read at import in its process, inherited from here)."""
    if interval_s <= 0:
        raise ValueError(f"--control-loop-interval-s must be positive, got {interval_s:g}")
    return {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": f"{interval_s:g}"}


# How often Ray's agent collects its node and process statistics (psutil over every Ray process;
# Ray's default is every 5 s). Nothing here reads them (the node's ray_node_* and ray_component_*
# series), and each collection is a CPU burst beside the engine: at 30 s the idle stack's agent
# used 140 instead of 310 ms of CPU per 20 s (with the 2 s metrics reports below).
NODE_STATS_INTERVAL_MS = 30_000


def agent_environment(node_stats_interval_ms: int) -> dict[str, str]:
    """Environment for Ray's dashboard agent (read when its process starts, inherited from here)."""
    if node_stats_interval_ms <= 0:
        raise ValueError(f"--node-stats-interval-ms must be positive, got {node_stats_interval_ms}")
    return {"REPORTER_UPDATE_INTERVAL_MS": str(node_stats_interval_ms)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m replicas", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="NLD checkpoint directory (overrides the config file)")
    p.add_argument("--model-name", default=None)
    p.add_argument("--config", help="a Serve config file (applications[0] is used)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8080)
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray node (default: the CPUs "
                   "this process may run on)")
    p.add_argument("--replica-cpus", type=float, default=None,
                   help="CPUs each replica reserves (Serve's ray_actor_options.num_cpus); Ray gives the engine "
                        "that many torch threads. Default: the config's, else the whole node")
    p.add_argument("--torch-threads", type=int, default=None, help="CPU threads of the engine (overrides the config)")
    p.add_argument("--engine-cpus", type=cpu_list, default=None,
                   help="CPU ids the engine process is bound to, e.g. 0 (ReplicaConfig.engine_cpus; its torch "
                        "threads default to one per CPU)")
    p.add_argument("--serving-cpus", type=cpu_list, default=None,
                   help="CPU ids for everything else (Ray, the replica's serving process), e.g. 1: with "
                        "--engine-cpus, the serving path keeps off the engine's CPUs")
    p.add_argument("--parallel-min-tokens", type=int, default=None, metavar="N",
                   help="on a CPU, engine steps of fewer tokens run on one torch thread, larger ones on all "
                        "(engine.parallel_min_tokens; 0: all steps on all threads; default: the config's)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, metavar="N",
                   help="tokens per engine step: every running request's pass, then prefill chunks "
                        "(engine.max_num_batched_tokens; default: the config's, else 512 on a CPU, 2048 on CUDA)")
    p.add_argument("--replicas", type=replicas_arg, default=None, metavar="N|auto",
                   help="a fixed replica count, each reserving an equal share of the node's CPUs unless "
                        "--replica-cpus says otherwise (autoscaling off); auto: one per CPU, at most "
                        f"{AUTO_REPLICAS_MAX}, on a CPU device (see AUTO_REPLICAS_MAX). Default: the config's "
                        "count or autoscaling")
    p.add_argument("--ingress", default="haproxy", choices=("haproxy", "proxy"),
                   help="haproxy (default): replicas serve HTTP themselves behind Ray Serve's HAProxy; "
                        "proxy: Ray Serve's Python proxy actor (see replicas/ingress.py)")
    p.add_argument("--metrics-report-interval-ms", type=int, default=2000,
                   help="how often Ray's processes report their metrics to its metrics port (Ray's "
                        "metrics_report_interval_ms, default 10 s); a mode policy's scraped signals are this "
                        "much older at most (the default preset polls every 10 s)")
    p.add_argument("--node-stats-interval-ms", type=int, default=NODE_STATS_INTERVAL_MS,
                   help="how often Ray's agent collects node and process statistics (Ray's default 5 s; "
                        "see NODE_STATS_INTERVAL_MS)")
    p.add_argument("--control-loop-interval-s", type=float, default=CONTROL_LOOP_INTERVAL_S,
                   help="Ray Serve controller's loop period (RAY_SERVE_CONTROL_LOOP_INTERVAL_S; Serve's own "
                        f"default is 0.1; {CONTROL_LOOP_INTERVAL_S:g} here, see controller_environment)")
    p.add_argument("--autoscaling-json", default=None,
                   help="Ray Serve autoscaling_config as JSON (nld-gateway up passes the policy's `autoscaling`)")
    args = p.parse_args(argv)
    config, options = replica_config_from(args)
    if args.autoscaling_json:
        options["autoscaling_config"] = json.loads(args.autoscaling_json)
    node_cpus = args.num_cpus or len(os.sched_getaffinity(0))
    replica_cpus, notes = args.replica_cpus, []
    try:  # a bad count or CPU share: one line, exit 2, before Ray starts
        if args.replicas is not None:
            count = replica_count(args.replicas, node_cpus, config, replica_cpus)
            options, replica_cpus, notes = fixed_replicas_options(options, count, node_cpus, replica_cpus)
        options, capped = replica_cpus_options(options, node_cpus, replica_cpus)
    except ValueError as e:
        print(f"python -m replicas: {e}", file=sys.stderr)
        return 2
    for note in notes + [f"capped: {c}" for c in capped]:
        print(note, flush=True)
    error = bind_serving(args.serving_cpus)
    if error:
        print(f"python -m replicas: {error}", file=sys.stderr)
        return 2

    from .ingress import local_ingress, serve_env

    os.environ.update(ray_environment(args.host))  # before Ray is imported: it reads them then
    os.environ.update(serve_env(local_ingress(args.ingress)))  # Ray Serve reads these at import, in every process
    os.environ.update(controller_environment(args.control_loop_interval_s))
    os.environ.update(agent_environment(args.node_stats_interval_ms))
    import ray
    from ray import serve

    from .app import bind_app

    print(f"starting Ray (metrics on :{args.metrics_port}, ingress {args.ingress}) ...", flush=True)
    ray.init(num_cpus=node_cpus, include_dashboard=False, _metrics_export_port=args.metrics_port,
             _system_config={"metrics_report_interval_ms": args.metrics_report_interval_ms}, log_to_driver=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    print(f"loading {config.model_path} into the replicas ...", flush=True)
    serve.run(bind_app(config, options), name="nld", route_prefix="/")
    print(f"READY http://{args.host}:{args.port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    print("shutting down ...", flush=True)
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
