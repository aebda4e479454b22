"""`nld-gateway` command line: the only place of the gateway that reads the environment.

Contract: `main(argv, environ)` parses subcommands, reads the environment (`os.environ` unless
`environ` is given) and hands it to the subcommand as a dict: `args.func(args, environ)`; no
other function reads it. `serve` builds a `GatewayConfig` from flags (the API-key path falls
back to `$NLD_API_KEY_FILE`; a key path turns auth on, `--no-auth` forces it off; see
`gateway.bootstrap.auth_fields`, shared with `up`), loads the keys (`gateway.auth.load_api_keys`:
a file with one key per line or a Kubernetes Secret mount directory), builds the gateway with
`gateway.bootstrap.build_gateway` (the mode policy from `policy_spec(args)`), and runs it (`gateway.listeners.serve`, uvicorn with the envelope
HTTP protocol): `/metrics` on the API port, or only on `--metrics-port` when given; with a
key path, the keys are re-read every `--key-reload-interval` seconds (`gateway.key_reload`),
so a rotated Secret needs no restart. Configuration errors exit with status 2 and a one-line
message that never contains a key (`gateway.bootstrap.config_error`). Other subcommands (`up`, `policy`) register
themselves in `build_parser`. Non-goals: starting replicas or Ray (that is `up`'s job).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence

from replicas.wire import MODES

from .bootstrap import API_KEY_ENV, CONFIG_ERRORS, PolicySpec, auth_fields, build_gateway, config_error
from .policy_cli import add_policy_parser
from .up import add_loop_argument, add_routing_arguments, add_up_parser


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the OpenAI-compatible gateway in front of running replicas")
    p.add_argument("--replica-url", required=True, help="Ray Serve HTTP proxy base URL, e.g. http://127.0.0.1:8001")
    p.add_argument("--replica-routing", default="direct", choices=("direct", "ingress"),
                   help="direct (default): send to a healthy replica's own HTTP port, learned from the replicas' "
                        "answers, and through --replica-url while none is known; ingress: always --replica-url")
    add_routing_arguments(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default="nld", help="the model id clients send")
    p.add_argument("--api-key-file", default=None,
                   help=f"file (one key per line) or Secret mount directory; default ${API_KEY_ENV}; enables auth")
    p.add_argument("--no-auth", action="store_true", help="disable auth even when a key file is given")
    p.add_argument("--policy", default=None,
                   help="mode policy YAML (adaptive; reloaded on change or SIGHUP). Without it: a fixed policy")
    p.add_argument("--replica-metrics-host", default="127.0.0.1",
                   help="host of the replicas' Ray metrics port: fills {metrics_host} in the policy's signal URLs")
    p.add_argument("--replica-metrics-port", type=int, default=8080,
                   help="the replicas' Ray metrics port: fills {metrics_port} in the policy's signal URLs")
    p.add_argument("--prometheus-url", default="http://127.0.0.1:9090",
                   help="the Prometheus that scrapes the replicas: fills {prometheus_url} in the policy's signal URLs")
    p.add_argument("--ray-selector", default="",
                   help="PromQL label matcher of this stack's replica series, e.g. '{namespace=\"serving\"}': "
                   "fills {ray_selector} in the policy's queries (default: every series)")
    p.add_argument("--mode", default="self_spec", choices=MODES,
                   help="decoding mode of `auto` requests (fixed-mode policy, without --policy)")
    p.add_argument("--client-override", default="allow", choices=("allow", "deny", "clamp"),
                   help="whether explicit decoding_mode values are honoured")
    p.add_argument("--max-body-bytes", type=int, default=None)
    p.add_argument("--max-tokens-limit", type=int, default=None)
    p.add_argument("--max-inflight", type=int, default=None, help="429 beyond this many in-flight requests")
    p.add_argument("--request-timeout", type=float, default=None, help="seconds (504 before the first byte)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve /metrics on this port only (default: on --port, beside the API)")
    p.add_argument("--metrics-host", default=None, help="address of the metrics port (default: --host)")
    p.add_argument("--key-reload-interval", type=float, default=10.0,
                   help="seconds between re-reads of the API key file (rotation without a restart)")
    p.add_argument("--log-level", default="info")
    add_loop_argument(p)
    p.set_defaults(func=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nld-gateway", description="nld-gateway: serving for NLD models")
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(sub)
    add_up_parser(sub)
    add_policy_parser(sub)
    return parser


def policy_spec(args: argparse.Namespace, ports=None) -> PolicySpec:
    """The mode policy `serve` runs: the --policy file (hot-reloaded), else a fixed policy from
    --mode/--client-override. A policy file's placeholders come from `ports` (a `StackPorts`;
    default: --replica-metrics-host, --replica-metrics-port, --prometheus-url, --ray-selector)."""
    from policies import StackPorts

    if getattr(args, "policy", None):
        if ports is None:
            ports = StackPorts(metrics_host=args.replica_metrics_host, metrics_port=args.replica_metrics_port,
                               prometheus_url=args.prometheus_url, ray_selector=args.ray_selector)
        return PolicySpec(file=args.policy, ports=ports)
    return PolicySpec(mode=getattr(args, "mode", "self_spec"), client_override=getattr(args, "client_override", "allow"))


def serve_config(args: argparse.Namespace, environ: dict[str, str]):
    """The `GatewayConfig` for `serve` (keys loaded from the flag or the environment)."""
    from .config import GatewayConfig

    fields: dict = {"replica_url": args.replica_url, "model_name": args.model_name,
                    "replica_routing": args.replica_routing, "stream_channels": args.stream_channels,
                    "pack_ar": args.pack_ar}
    fields.update(auth_fields(args.api_key_file, args.no_auth, environ))
    optional = {"max_body_bytes": args.max_body_bytes, "max_tokens_limit": args.max_tokens_limit,
                "max_inflight_requests": args.max_inflight, "request_timeout_s": args.request_timeout}
    fields.update({k: v for k, v in optional.items() if v is not None})
    if "max_tokens_limit" in fields:
        fields["default_max_tokens"] = min(256, fields["max_tokens_limit"])
    return GatewayConfig(**fields)


def cmd_serve(args: argparse.Namespace, environ: dict[str, str]) -> int:
    from .auth import load_api_keys
    from .key_reload import KeyFileWatcher
    from .listeners import loop_factory, serve

    try:
        if args.key_reload_interval <= 0:
            raise ValueError("--key-reload-interval must be positive")
        loop = loop_factory(args.loop)  # `--loop uvloop` without uvloop fails here, before anything starts
        config = serve_config(args, environ)
        gateway = build_gateway(config, policy_spec(args), metrics_route=args.metrics_port is None)
    except CONFIG_ERRORS as e:
        return config_error("serve", e)
    background = []
    key_path = args.api_key_file or environ.get(API_KEY_ENV)
    if config.auth_enabled and key_path:
        watcher = KeyFileWatcher(gateway.app.state.auth, lambda: load_api_keys(key_path), args.key_reload_interval)
        background.append(watcher.run)
    logging.getLogger("gateway").info("auth %s; replicas at %s", "on" if config.auth_enabled else "off",
                                      config.replica_url)
    serve(gateway.app, args.host, args.port, metrics=gateway.metrics, metrics_host=args.metrics_host,
          metrics_port=args.metrics_port, background=background, log_level=args.log_level, loop=loop)
    return 0


def main(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> int:
    """The entry point: the only reader of the environment (`environ` replaces it in tests)."""
    args = build_parser().parse_args(argv)
    return args.func(args, dict(os.environ) if environ is None else dict(environ))


if __name__ == "__main__":
    raise SystemExit(main())
