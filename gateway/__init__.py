"""nld-gateway's front door: an OpenAI-compatible FastAPI app in front of the Ray Serve replicas.

Build it with `build_gateway(GatewayConfig(...), PolicySpec(...))` (`gateway.bootstrap`, the one
composition root: metrics, replica client, policy, app), or from injected parts with
`create_app(config, replica_client, policy)` (`gateway.app`); run it with `nld-gateway serve`
(`gateway.cli`). Imports neither torch
nor ray: only `replicas.wire` and `policies`.
"""

from .app import create_app
from .bootstrap import PolicySpec, build_gateway
from .config import GatewayConfig

__all__ = ["create_app", "build_gateway", "PolicySpec", "GatewayConfig"]
