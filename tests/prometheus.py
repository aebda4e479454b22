"""A real Prometheus server (Debian's `prometheus` package) on a free loopback port, for tests.

`PrometheusServer.start(targets, scrape_interval_s)` writes a config that scrapes the given
`host:port` targets, starts the server with its own temporary TSDB and waits until it answers
`/-/ready`; `stop()` terminates it. Raises RuntimeError when the binary is missing (CI
installs it in .ci/run)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from tests.serving import free_port


class PrometheusServer:
    def __init__(self, proc: subprocess.Popen, url: str, workdir: Path) -> None:
        self.proc, self.url, self.workdir = proc, url, workdir

    @classmethod
    def start(cls, targets: list[str], scrape_interval_s: float = 1.0) -> "PrometheusServer":
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError("the prometheus binary is missing: apt-get install -y prometheus")
        workdir = Path(tempfile.mkdtemp(prefix="nld-prom-"))
        interval = f"{int(scrape_interval_s * 1000)}ms"  # Prometheus durations take no decimals
        (workdir / "prometheus.yml").write_text(
            "global:\n"
            f"  scrape_interval: {interval}\n"
            f"  evaluation_interval: {interval}\n"
            "scrape_configs:\n"
            "  - job_name: nld\n"
            "    static_configs:\n"
            f"      - targets: [{', '.join(repr(t) for t in targets)}]\n"
        )
        port = free_port()
        proc = subprocess.Popen(
            [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        server = cls(proc, f"http://127.0.0.1:{port}", workdir)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(server.url + "/-/ready", timeout=1).status_code == 200:
                    return server
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                break
            time.sleep(0.2)
        server.stop()
        raise RuntimeError("prometheus did not become ready")

    def query(self, promql: str) -> list:
        return httpx.get(self.url + "/api/v1/query", params={"query": promql}, timeout=5).json()["data"]["result"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)
