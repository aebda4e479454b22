"""nld-gateway's front door: an OpenAI-compatible FastAPI app in front of the Ray Serve replicas.

Build it with `create_app(GatewayConfig(...), HttpReplicaClient(config), FixedModePolicy())`
(see `gateway.app`), or run it with `nld-gateway serve` (`gateway.cli`). Imports neither torch
nor ray: only `replicas.wire` and `policies`.
"""

from .app import create_app
from .config import GatewayConfig

__all__ = ["create_app", "GatewayConfig"]
