"""Where the serving path spends CPU: per-process CPU-seconds per request, for several layouts.

    python benchmarks/serving_profile.py [--model models/nld-tiny-pystdlib] [--concurrency 32] [--rounds 2]

Layouts (the same code, switched by configuration):
- `proxy+thread`: Ray Serve's Python proxy, the engine on a thread of the replica process (the
  layout before the serving-path redesign, but with one-message non-streaming answers);
- `proxy+process`: the Python proxy, the engine in its own process;
- `haproxy+process` (the default): HAProxy in front of the replicas' own HTTP servers, the
  engine in its own process;
- `haproxy+direct`: the same replicas, but the gateway sends to the replica's own HTTP port,
  bypassing HAProxy (the option of skipping the ingress hop, measured; not a deployable layout:
  the gateway then balances nothing and sees no replica come or go).
Each layout runs `python -m replicas` (one torch thread) and `nld-gateway serve` as separate
processes; `benchmarks/loadgen.py` sends closed-loop `ar` completions (held-out prompts, 64
tokens) at --concurrency, non-streaming then streaming, for --seconds each. CPU time of every
process of the stack is read from /proc before and after each window and grouped (engine,
replica serving process, proxy or HAProxy, gateway, Ray's own processes, client). Layouts are
interleaved over --rounds; the table shows medians. Output: a table, JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.engine_modes import heldout_prompts  # noqa: E402
from benchmarks.peer_rotate import parent_pid  # noqa: E402
from benchmarks.peer_vllm import Server  # noqa: E402

PY = sys.executable
LAYOUTS = {"proxy+thread": ("proxy", False), "proxy+process": ("proxy", True), "haproxy+process": ("haproxy", True),
           "haproxy+direct": ("haproxy", True)}
GROUPS = [  # (group, substring of the command line), first match wins
    ("engine", "replicas.engine.core_loop"), ("replica", "ServeReplica"), ("proxy", "ProxyActor"),
    ("haproxy", "haproxy"), ("gateway", "gateway serve"), ("client", "loadgen.py"),
    ("ray", "ray::"), ("ray", "/ray/"), ("ray", "raylet"), ("ray", "gcs_server"), ("ray", "python -u -m replicas"),
]
HZ = os.sysconf("SC_CLK_TCK")


def group_of(cmd: str, groups: list[tuple[str, str]] = GROUPS) -> str | None:
    """The first of `groups` whose substring the command line contains (None: no group)."""
    return next((g for g, key in groups if key in cmd), None)


def cpu_by_group(groups: list[tuple[str, str]] = GROUPS) -> dict[str, float]:
    """CPU seconds so far of every process, summed by the first of `groups` whose substring its
    command line contains (processes of no group left out)."""
    out: dict[str, float] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        group = group_of(cmd, groups)
        if group is not None:
            out[group] = out.get(group, 0.0) + (int(stat[11]) + int(stat[12])) / HZ
    return out


def listening_ports(pid: int) -> list[int]:
    """The TCP ports `pid` listens on (IPv4 and IPv6), from its socket inodes and /proc/net/tcp*."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:  # 0A: LISTEN
                ports.append(int(f[1].rsplit(":", 1)[1], 16))
    return sorted(set(ports))


def replica_port(replica_pid: int) -> int:
    """The port of the replica's own HTTP server: the one of its listening ports that answers /info."""
    for port in listening_ports(replica_pid):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/info", timeout=2).status_code == 200:
                return port
        except httpx.HTTPError:
            continue
    raise RuntimeError(f"no port of process {replica_pid} answers /info")


def start_layout(layout: str, model: str, ports: tuple[int, int, int], work: Path) -> list[Server]:
    ingress, engine_process = LAYOUTS[layout]
    gw_port, rep_port, met_port = ports
    conf = work / f"{layout}.yaml"
    conf.write_text(yaml.safe_dump({"applications": [{"args": {
        "model_path": model, "model_name": "nld", "torch_threads": 1, "engine_process": engine_process}}]}))
    replicas = Server("replicas", [PY, "-u", "-m", "replicas", "--config", str(conf), "--port", str(rep_port),
                                   "--metrics-port", str(met_port), "--ingress", ingress],
                      f"http://127.0.0.1:{rep_port}/health", work / f"replicas_{layout}.log")
    replicas.wait_ready()
    upstream = rep_port
    if layout == "haproxy+direct":
        engine_pid = httpx.get(f"http://127.0.0.1:{rep_port}/stats", timeout=30).json()["engine_pid"]
        upstream = replica_port(parent_pid(engine_pid))
    gateway = Server("gateway", [PY, "-m", "gateway", "serve", "--replica-url", f"http://127.0.0.1:{upstream}",
                                 "--model-name", "nld", "--port", str(gw_port), "--log-level", "warning"],
                     f"http://127.0.0.1:{gw_port}/ready", work / f"gateway_{layout}.log")
    gateway.wait_ready()
    return [gateway, replicas]


def measure(url: str, prompts: Path, c: int, seconds: float, stream: bool) -> dict:
    cmd = [PY, str(ROOT / "benchmarks" / "loadgen.py"), "--url", url, "--model", "nld", "--prompts", str(prompts),
           "--concurrency", str(c), "--seconds", str(seconds), "--settle-seconds", "0", "--tail-seconds", "0",
           "--extra-body", json.dumps({"decoding_mode": "ar"})]
    if stream:
        cmd.append("--stream")
    before, t0 = cpu_by_group(), time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    after, wall = cpu_by_group(), time.monotonic() - t0
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result.pop("latency_by_prompt", None)
    cpu = {g: after.get(g, 0.0) - before.get(g, 0.0) for g in set(after) | set(before)}
    requests = max(result["requests"], 1)
    return {**result, "wall_s": wall, "cpu_s": cpu, "cpu_ms_per_request": {g: 1000 * v / requests for g, v in cpu.items()}}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/nld-tiny-pystdlib")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    p.add_argument("--port", type=int, default=8500 + 100)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serving_profile.json")
    args = p.parse_args(argv)
    model = Path(args.model)
    work = Path(tempfile.mkdtemp(prefix="serving_profile_"))
    prompts = work / "prompts.json"
    prompts.write_text(json.dumps(heldout_prompts(model / "split.json", model, 8, 64)))
    layouts = args.layouts.split(",")
    rows = []
    for rnd in range(args.rounds):
        for k in range(len(layouts)):
            layout = layouts[(k + rnd) % len(layouts)]
            servers = start_layout(layout, str(model), (args.port, args.port + 1, args.port + 2), work)
            url = f"http://127.0.0.1:{args.port}"
            try:
                measure(url, prompts, 4, 3, False)  # warm-up
                for stream in (False, True):
                    r = measure(url, prompts, args.concurrency, args.seconds, stream)
                    rows.append({**r, "layout": layout, "stream": stream, "round": rnd})
                    per = " ".join(f"{g} {v:.2f}" for g, v in sorted(r["cpu_ms_per_request"].items()))
                    print(f"round {rnd} {layout:<16} {'sse ' if stream else 'json'} {r['tokens_per_s']:7.0f} tok/s "
                          f"{r['requests']} req errors {r['errors']} | CPU ms/request: {per}", flush=True)
            finally:
                for server in servers:
                    server.stop()
    summary = []
    groups = sorted({g for r in rows for g in r["cpu_ms_per_request"]})
    print(f"\nmedians over {args.rounds} rounds, concurrency {args.concurrency}: CPU ms per request by process group")
    print(f"{'layout':<16} {'kind':<5} {'tok/s':>7} " + " ".join(f"{g:>8}" for g in groups) + f" {'serving':>8}")
    for layout in layouts:
        for stream in (False, True):
            rs = [r for r in rows if r["layout"] == layout and r["stream"] == stream]
            med = {g: statistics.median(r["cpu_ms_per_request"].get(g, 0.0) for r in rs) for g in groups}
            # with the engine on a thread, the replica process's CPU includes the engine's: no split
            serving = None if layout.endswith("thread") else sum(v for g, v in med.items()
                                                                 if g not in ("engine", "client", "ray"))
            tps = statistics.median(r["tokens_per_s"] for r in rs)
            errors = sum(sum(r["errors"].values()) for r in rs)
            summary.append({"layout": layout, "stream": stream, "tokens_per_s": tps, "cpu_ms_per_request": med,
                            "serving_cpu_ms_per_request": serving, "errors": errors})
            print(f"{layout:<16} {'sse' if stream else 'json':<5} {tps:>7.0f} " +
                  " ".join(f"{med[g]:>8.2f}" for g in groups) + (f" {serving:>8.2f}" if serving is not None else
                                                                  f" {'-':>8}"))
    args.out.write_text(json.dumps({"model": str(model), "concurrency": args.concurrency, "seconds": args.seconds,
                                    "rounds": args.rounds, "summary": summary, "rows": rows}, indent=1))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
