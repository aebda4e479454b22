"""`nld-gateway` command line: the only place of the gateway that reads the environment.

Contract: `main(argv, environ)` parses subcommands, reads the environment (`os.environ` unless
`environ` is given) and hands it to the subcommand as a dict: `args.func(args, environ)`; no
other function reads it. `serve` builds a `GatewayConfig` from flags (the API-key path falls
back to `$NLD_API_KEY_FILE`; a key path turns auth on, `--no-auth` forces it off; see
`auth_fields`, shared with `up`), loads the keys (`gateway.auth.load_api_keys`: a file with one
key per line or a Kubernetes Secret mount directory), builds `HttpReplicaClient`, the mode
policy and the app, and runs it (`gateway.listeners.serve`, uvicorn with the envelope
HTTP protocol): `/metrics` on the API port, or only on `--metrics-port` when given; with a
key path, the keys are re-read every `--key-reload-interval` seconds (`gateway.key_reload`),
so a rotated Secret needs no restart. Configuration errors exit with status 2 and a one-line
message that never contains a key (`config_error`). Other subcommands (`up`, `policy`) register
themselves in `build_parser`. Non-goals: starting replicas or Ray (that is `up`'s job).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from .policy_cli import add_policy_parser
from .up import add_up_parser

API_KEY_ENV = "NLD_API_KEY_FILE"


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the OpenAI-compatible gateway in front of running replicas")
    p.add_argument("--replica-url", required=True, help="Ray Serve HTTP proxy base URL, e.g. http://127.0.0.1:8001")
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
    p.add_argument("--mode", default="self_spec", choices=("ar", "diffusion", "self_spec"),
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
    p.set_defaults(func=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nld-gateway", description="nld-gateway: serving for NLD models")
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(sub)
    add_up_parser(sub)
    add_policy_parser(sub)
    return parser


def build_policy(args: argparse.Namespace, metrics, ports=None):
    """The mode policy: hot-reloadable from --policy, else fixed from --mode/--client-override.
    A policy file's `{metrics_host}` / `{metrics_port}` come from `ports` (a `StackPorts`;
    default: --replica-metrics-host / --replica-metrics-port)."""
    from policies import FixedModePolicy, PolicyHolder, StackPorts

    if getattr(args, "policy", None):
        if ports is None:
            ports = StackPorts(metrics_host=args.replica_metrics_host, metrics_port=args.replica_metrics_port)
        return PolicyHolder(args.policy, local_counters={"inflight": lambda: metrics.inflight.value},
                            registry=metrics.registry, ports=ports)
    return FixedModePolicy(mode=getattr(args, "mode", "self_spec"),
                           client_override=getattr(args, "client_override", "allow"))


def auth_fields(api_key_file: str | None, no_auth: bool, environ: dict[str, str]) -> dict:
    """`GatewayConfig` fields for auth: keys from the flag, else from `$NLD_API_KEY_FILE`; none
    (auth off) without either or with `no_auth`. Raises ValueError for a missing or empty key
    path (the message names the path, never a key)."""
    from .auth import load_api_keys

    key_path = api_key_file or environ.get(API_KEY_ENV) or None
    if not key_path or no_auth:
        return {}
    return {"api_keys": load_api_keys(key_path), "auth_enabled": True}


def serve_config(args: argparse.Namespace, environ: dict[str, str]):
    """The `GatewayConfig` for `serve` (keys loaded from the flag or the environment)."""
    from .config import GatewayConfig

    fields: dict = {"replica_url": args.replica_url, "model_name": args.model_name}
    fields.update(auth_fields(args.api_key_file, args.no_auth, environ))
    optional = {"max_body_bytes": args.max_body_bytes, "max_tokens_limit": args.max_tokens_limit,
                "max_inflight_requests": args.max_inflight, "request_timeout_s": args.request_timeout}
    fields.update({k: v for k, v in optional.items() if v is not None})
    if "max_tokens_limit" in fields:
        fields["default_max_tokens"] = min(256, fields["max_tokens_limit"])
    return GatewayConfig(**fields)


def cmd_serve(args: argparse.Namespace, environ: dict[str, str]) -> int:
    from .app import create_app
    from .auth import load_api_keys
    from .key_reload import KeyFileWatcher
    from .listeners import serve
    from .metrics import GatewayMetrics, InflightCounter
    from .replica_client import HttpReplicaClient

    metrics = GatewayMetrics(InflightCounter())
    try:
        if args.key_reload_interval <= 0:
            raise ValueError("--key-reload-interval must be positive")
        config = serve_config(args, environ)
        policy = build_policy(args, metrics)
    except CONFIG_ERRORS as e:
        return config_error("serve", e)
    client = HttpReplicaClient(config, on_retry=metrics.retries.inc)
    app = create_app(config, client, policy, metrics=metrics, metrics_route=args.metrics_port is None)
    background = []
    key_path = args.api_key_file or environ.get(API_KEY_ENV)
    if config.auth_enabled and key_path:
        watcher = KeyFileWatcher(app.state.auth, lambda: load_api_keys(key_path), args.key_reload_interval)
        background.append(watcher.run)
    logging.getLogger("gateway").info("auth %s; replicas at %s", "on" if config.auth_enabled else "off",
                                      config.replica_url)
    serve(app, args.host, args.port, metrics=metrics, metrics_host=args.metrics_host, metrics_port=args.metrics_port,
          background=background, log_level=args.log_level)
    return 0


CONFIG_ERRORS = (ValidationError, ValueError, OSError)


def config_error(command: str, e: Exception) -> int:
    """Print the one-line configuration error of `nld-gateway <command>`; the exit status (2)."""
    print(f"nld-gateway {command}: invalid configuration: {_first_line(e)}", file=sys.stderr)
    return 2


def _first_line(e: Exception) -> str:
    if isinstance(e, ValidationError):  # never echo input values (they may be keys)
        err = e.errors()[0]
        return f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg')}"
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def main(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> int:
    """The entry point: the only reader of the environment (`environ` replaces it in tests)."""
    args = build_parser().parse_args(argv)
    return args.func(args, dict(os.environ) if environ is None else dict(environ))


if __name__ == "__main__":
    raise SystemExit(main())
