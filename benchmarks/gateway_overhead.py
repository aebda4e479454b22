"""Benchmark what the gateway adds: latency over calling the replica directly, and requests/s.

Three processes on loopback: a fake replica speaking the wire protocol (`tests.gateway.fakes.
fake_replica_app`, instant: the whole answer in one NDJSON chunk), the gateway (uvicorn,
`HttpReplicaClient`, pinned to one CPU with --gateway-cpu), and this load generator (raw
asyncio sockets with keep-alive connections, so the client costs little).

- latency: sequential requests, alternating direct `POST /generate` and the same completion
  through `POST /v1/completions` (non-streaming and streaming); overhead = gateway percentile
  minus direct percentile (p50, p99).
- throughput: --concurrency connections in a closed loop for --duration seconds of
  non-streaming requests; requests/s measured, plus the gateway process's CPU seconds, giving
  requests per CPU-second (what one fully used core sustains; the 2-core CI box is shared).
- streaming (--stream-tokens, 0 skips it): the same closed loop of streamed completions against
  a fake replica that sends one chunk per token every --chunk-delay-ms, rendered as the client's
  SSE events as a real replica does; the gateway's CPU per SSE event it forwards.

Prints a table and writes JSON (default benchmarks/results/gateway_overhead.json).

    python benchmarks/gateway_overhead.py [--requests 2000] [--duration 10] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from replicas.ingress import free_port

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The quick brown fox jumps over the lazy dog"


# ---- server roles (run in subprocesses) --------------------------------------------------------

def run_replica(port: int, chunk_delay_ms: float = 0.0) -> None:
    """The fake replica: instant (one chunk per answer), or one chunk per token every `chunk_delay_ms`."""
    import uvicorn

    from tests.gateway.fakes import FakeReplicaState, fake_replica_app

    state = FakeReplicaState(instant=chunk_delay_ms <= 0, chunk_delay_s=chunk_delay_ms / 1e3)
    uvicorn.run(fake_replica_app(state), host="127.0.0.1", port=port,
                log_level="warning", access_log=False, lifespan="off")


def run_gateway(port: int, replica_url: str) -> None:
    import uvicorn

    from gateway import GatewayConfig
    from gateway.bootstrap import PolicySpec, build_gateway
    from gateway.http_protocol import HTTP_PROTOCOL

    config = GatewayConfig(replica_url=replica_url)
    app = build_gateway(config, PolicySpec(mode="ar")).app
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, http=HTTP_PROTOCOL)


# ---- a minimal HTTP/1.1 keep-alive client --------------------------------------------------------

class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> "Conn":
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            if b":" in line:
                k, v = line.split(b":", 1)
                headers[k.strip().lower()] = v.strip()
        if b"content-length" in headers:
            return status, await self.reader.readexactly(int(headers[b"content-length"]))
        body = b""
        while True:  # chunked
            size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await self.reader.readexactly(size + 2)
            if size == 0:
                return status, body
            body += chunk[:-2]

    def close(self) -> None:
        self.writer.close()


def http_post(path: str, body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---- phases ----------------------------------------------------------------------------------

async def latency(replica_port: int, gateway_port: int, n: int, max_tokens: int) -> dict:
    direct = http_post("/generate", {"request_id": "bench-0", "prompt": PROMPT, "mode": "ar", "max_tokens": max_tokens,
                                     "temperature": 0.0, "top_p": 1.0})
    body = {"model": "nld", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "decoding_mode": "ar"}
    via = http_post("/v1/completions", body)
    via_stream = http_post("/v1/completions", {**body, "stream": True})
    rc, gc = await Conn.open(replica_port), await Conn.open(gateway_port)
    times: dict[str, list[float]] = {"direct": [], "gateway": [], "gateway_stream": []}
    for i in range(n + n // 10):
        for name, conn, raw in (("direct", rc, direct), ("gateway", gc, via), ("gateway_stream", gc, via_stream)):
            t0 = time.perf_counter()
            status, payload = await conn.request(raw)
            dt = time.perf_counter() - t0
            assert status == 200, payload[:200]
            if i >= n // 10:  # the first 10% warm up
                times[name].append(dt * 1e3)
    rc.close()
    gc.close()
    out = {name: {"p50_ms": percentile(v, 0.5), "p99_ms": percentile(v, 0.99), "mean_ms": statistics.fmean(v)}
           for name, v in times.items()}
    for name in ("gateway", "gateway_stream"):
        out[name]["overhead_p50_ms"] = out[name]["p50_ms"] - out["direct"]["p50_ms"]
        out[name]["overhead_p99_ms"] = out[name]["p99_ms"] - out["direct"]["p99_ms"]
    return out


async def closed_loop(gateway_port: int, gateway_pid: int, concurrency: int, duration: float, raw: bytes,
                      stream: bool) -> dict:
    """`concurrency` keep-alive connections sending `raw` back to back: a 1 s warm-up, then
    `duration` measured. Counts requests, failures (non-200; streamed: no final [DONE]), SSE
    events, and the gateway process's CPU seconds over the measured part."""
    conns = [await Conn.open(gateway_port) for _ in range(concurrency)]
    n = {"requests": 0, "errors": 0, "events": 0}
    stop_at = 0.0

    async def worker(c: Conn) -> None:
        while time.perf_counter() < stop_at:
            status, body = await c.request(raw)
            n["requests"] += 1
            n["errors"] += status != 200 or (stream and not body.endswith(b"data: [DONE]\n\n"))
            n["events"] += max(body.count(b"data: ") - 1, 0) if stream else 0

    stop_at = time.perf_counter() + 1.0  # warm up
    await asyncio.gather(*(worker(c) for c in conns))
    n = dict.fromkeys(n, 0)
    cpu0, t0 = cpu_seconds(gateway_pid), time.perf_counter()
    stop_at = t0 + duration
    await asyncio.gather(*(worker(c) for c in conns))
    wall, cpu = time.perf_counter() - t0, cpu_seconds(gateway_pid) - cpu0
    for c in conns:
        c.close()
    return {**n, "seconds": wall, "gateway_cpu_s": cpu, "gateway_cpu_utilisation": cpu / wall}


async def throughput(gateway_port: int, gateway_pid: int, concurrency: int, duration: float, max_tokens: int) -> dict:
    raw = http_post("/v1/completions", {"model": "nld", "prompt": PROMPT, "max_tokens": max_tokens,
                                        "temperature": 0, "decoding_mode": "ar"})
    r = await closed_loop(gateway_port, gateway_pid, concurrency, duration, raw, stream=False)
    r.pop("events")
    done, cpu = r["requests"], r["gateway_cpu_s"]
    return {**r, "requests_per_s": done / r["seconds"], "requests_per_cpu_s": done / cpu if cpu else None,
            "cpu_us_per_request": cpu / max(done, 1) * 1e6}


async def streaming(gateway_port: int, gateway_pid: int, concurrency: int, duration: float, tokens: int) -> dict:
    """Streamed completions, one upstream chunk per token: the gateway's CPU per SSE event."""
    raw = http_post("/v1/completions", {"model": "nld", "prompt": PROMPT, "max_tokens": tokens, "temperature": 0,
                                        "decoding_mode": "ar", "stream": True})
    r = await closed_loop(gateway_port, gateway_pid, concurrency, duration, raw, stream=True)
    cpu = r["gateway_cpu_s"]
    return {**r, "events_per_s": r["events"] / r["seconds"], "cpu_us_per_event": cpu / max(r["events"], 1) * 1e6,
            "cpu_us_per_request": cpu / max(r["requests"], 1) * 1e6}


# ---- orchestration ---------------------------------------------------------------------------

def spawn(role: list[str], cpu: int | None) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--role", *role]
    preexec = (lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None and hasattr(os, "sched_setaffinity") else None
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, preexec_fn=preexec)


def wait_http(port: int, path: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"port {port} did not answer {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=2000, help="sequential requests per latency series")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of the throughput phase")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--stream-tokens", type=int, default=64, help="tokens per request of the streaming phase (0: skip)")
    p.add_argument("--chunk-delay-ms", type=float, default=5.0,
                   help="streaming phase: the fake replica sends one chunk per token this often (an engine step)")
    p.add_argument("--gateway-cpu", type=int, default=0, help="CPU the gateway is pinned to (-1: none)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gateway_overhead.json")
    p.add_argument("--role", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role:
        if args.role[0] == "replica":
            run_replica(int(args.role[1]), float(args.role[2]) if len(args.role) > 2 else 0.0)
        else:
            run_gateway(int(args.role[1]), args.role[2])
        return

    ncpu = os.cpu_count() or 1
    gw_cpu = None if args.gateway_cpu < 0 else args.gateway_cpu % ncpu
    other = None if gw_cpu is None or ncpu == 1 else (gw_cpu + 1) % ncpu
    if other is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {other})  # the load generator keeps off the gateway's core
    rport, gport = free_port(), free_port()
    replica = spawn(["replica", str(rport)], other)
    gateway = spawn(["gateway", str(gport), f"http://127.0.0.1:{rport}"], gw_cpu)
    try:
        wait_http(rport, "/health")
        wait_http(gport, "/health")
        lat = asyncio.run(latency(rport, gport, args.requests, args.max_tokens))
        thr = asyncio.run(throughput(gport, gateway.pid, args.concurrency, args.duration, args.max_tokens))
    finally:
        for proc in (gateway, replica):
            proc.terminate()
            proc.wait(10)
    stream = None
    if args.stream_tokens > 0:
        rport, gport = free_port(), free_port()
        replica = spawn(["replica", str(rport), str(args.chunk_delay_ms)], other)
        gateway = spawn(["gateway", str(gport), f"http://127.0.0.1:{rport}"], gw_cpu)
        try:
            wait_http(rport, "/health")
            wait_http(gport, "/health")
            stream = asyncio.run(streaming(gport, gateway.pid, args.concurrency, args.duration, args.stream_tokens))
        finally:
            for proc in (gateway, replica):
                proc.terminate()
                proc.wait(10)
    result = {
        "benchmark": "gateway_overhead", "latency": lat, "throughput": thr, "streaming": stream,
        "params": {k: v for k, v in vars(args).items() if k not in ("role", "out")},
        "machine": {"cpus": ncpu, "gateway_pinned_cpu": gw_cpu, "python": platform.python_version(),
                    "platform": platform.platform(), "loadavg_1m": os.getloadavg()[0]},
        "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip(),
    }
    print(f"\nGateway overhead (fake instant replica, {args.max_tokens} tokens, loopback; ms)")
    print(f"{'series':<16}{'p50':>9}{'p99':>9}{'mean':>9}{'+p50':>9}{'+p99':>9}")
    for name, v in lat.items():
        print(f"{name:<16}{v['p50_ms']:>9.3f}{v['p99_ms']:>9.3f}{v['mean_ms']:>9.3f}"
              f"{v.get('overhead_p50_ms', 0):>9.3f}{v.get('overhead_p99_ms', 0):>9.3f}")
    print(f"\nThroughput, non-streaming, {args.concurrency} connections, gateway pinned to CPU {gw_cpu}:")
    print(f"  {thr['requests_per_s']:.0f} requests/s measured ({thr['errors']} errors); gateway CPU "
          f"{thr['gateway_cpu_utilisation']:.0%} of one core, {thr['cpu_us_per_request']:.0f} us CPU per request "
          f"-> {thr['requests_per_cpu_s']:.0f} requests per CPU-second")
    if stream is not None:
        print(f"\nStreaming, {args.concurrency} connections, {args.stream_tokens} tokens, one upstream chunk per token "
              f"every {args.chunk_delay_ms:g} ms:")
        print(f"  {stream['events_per_s']:.0f} SSE events/s ({stream['errors']} errors); gateway CPU "
              f"{stream['gateway_cpu_utilisation']:.0%} of one core, {stream['cpu_us_per_event']:.1f} us CPU per event, "
              f"{stream['cpu_us_per_request']:.0f} us per request")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
