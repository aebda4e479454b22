"""A real local Ray Serve deployment of the replicas, for integration tests (no mocks).

`ServeStack.start(model_dir)` runs Ray in this process (metrics every 500 ms on a free
loopback port), starts Serve's ingress (HAProxy in front of the replicas' own HTTP servers, as
in production; `ingress="proxy"` for Serve's Python proxy) on a free loopback port and deploys
`replicas.app:build_app`. `stop()` shuts everything down.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field

import httpx


from replicas.ingress import free_port, local_ingress, serve_env


def listening_addresses(port: int) -> set[str]:
    """The local addresses with a TCP socket listening on `port` (Linux: /proc/net/tcp{,6}),
    e.g. {"127.0.0.1"} or {"0.0.0.0"}."""
    out = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, _, hex_port = local.partition(":")
            if state != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(addr)
            if width == 8:
                out.add(socket.inet_ntop(socket.AF_INET, raw[::-1]))
            else:  # four little-endian 32-bit words
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                out.add(socket.inet_ntop(socket.AF_INET6, words))
    return out


@dataclass
class ServeStack:
    url: str
    metrics_url: str
    saved_env: dict = field(default_factory=dict)

    @classmethod
    def start(cls, model_dir, ingress: str = "haproxy", **replica_overrides) -> "ServeStack":
        import ray
        from ray import serve

        from replicas.app import bind_app
        from replicas.config import ReplicaConfig

        env = serve_env(local_ingress(ingress))
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # Ray Serve's ingress settings, read by every Ray process it starts
        port, metrics_port = free_port(), free_port()
        ray.init(num_cpus=8, include_dashboard=False, _metrics_export_port=metrics_port,
                 _system_config={"metrics_report_interval_ms": 500}, log_to_driver=False,
                 configure_logging=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = ReplicaConfig.model_validate({
            "model_path": str(model_dir), "model_name": "nld-test", "torch_threads": 1,
            "engine": {"max_batch_size": 4, "max_seq_len": 256, "max_waiting": 4},
            **replica_overrides,
        })
        serve.run(bind_app(config, {"ray_actor_options": {"num_cpus": 1}}), name="nld", route_prefix="/")
        stack = cls(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics", saved)
        stack.wait_ready()
        return stack

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError("the replicas did not become healthy")

    def stop(self) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        for key, value in self.saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
