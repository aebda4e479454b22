"""Where a steady load's latency tail comes from: slow requests against each process group's CPU.

    python benchmarks/tail_profile.py [--concurrency 8] [--seconds 40] [--policy policies/presets/adaptive.yaml]
                                      [--stack-args '--metrics-report-interval-ms 10000']

Starts `nld-gateway up` on the embedded model (the given policy), sends closed-loop `ar`
completions (held-out prompts, 64 tokens, greedy) with `benchmarks/loadgen.py`, and meanwhile
samples every process's CPU time from /proc every --interval seconds, by process group. A request
is slow above --slow x the median latency, fast at or below 1.1x. For each group: the mean cores
it kept busy while slow requests ran and while fast ones ran. And Ray's dashboard agent (which
renders Ray's metrics page for whoever polls it: a policy reading that page, e.g.
benchmarks/adaptive_ray_page.yaml; the presets read the replicas' reports instead) gets its
bursts listed: the share of slow and of fast requests that overlapped one, and when they came.
`--stack-args` passes more `nld-gateway up` options. Output: a table, JSON (--out).
Non-goals: throughput (`peer_rotate.py`), CPU per request (`serving_profile.py`).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.engine_modes import heldout_prompts  # noqa: E402
from benchmarks.peer_vllm import PY, start_stack  # noqa: E402
from benchmarks.serving_profile import cpu_by_group  # noqa: E402

GROUPS = [  # (group, substring of the command line), first match wins
    ("engine", "replicas.engine.core_loop"), ("replica", "ServeReplica"), ("haproxy", "haproxy"),
    ("client", "loadgen.py"), ("profiler", "tail_profile.py"), ("gateway", "gateway"),
    ("driver", "-m replicas"), ("agent", "ray::DashboardAgent"),
    ("controller", "ServeController"), ("gcs", "gcs_server"), ("raylet", "raylet"), ("ray", "ray::"),
    ("ray", "/ray/"),
]
BURST_CORES = 0.3  # an interval in which the agent kept this many cores busy is one of its bursts


def intervals(samples: list[tuple[float, dict[str, float]]]) -> list[tuple[float, float, dict[str, float]]]:
    """(start, end, CPU seconds per group) between consecutive samples."""
    out = []
    for (t0, a), (t1, b) in zip(samples, samples[1:]):
        out.append((t0, t1, {g: max(v - a.get(g, 0.0), 0.0) for g, v in b.items()}))
    return out


def busy(series: list, group: str, start: float, end: float) -> float:
    """Mean cores `group` kept busy over [start, end] (intervals counted by their overlap)."""
    cpu = 0.0
    for t0, t1, g in series:
        overlap = min(t1, end) - max(t0, start)
        if overlap > 0 and t1 > t0:
            cpu += g.get(group, 0.0) * overlap / (t1 - t0)
    return cpu / max(end - start, 1e-9)


def bursts(series: list, group: str = "agent", cores: float = BURST_CORES) -> list[tuple[float, float]]:
    """(start, end) of the intervals in which `group` kept at least `cores` cores busy."""
    return [(t0, t1) for t0, t1, g in series if g.get(group, 0.0) / max(t1 - t0, 1e-9) >= cores]


def attribute(records: list[dict], series: list, slow: float = 1.3) -> dict:
    """Slow vs fast requests: latency percentiles, each group's mean busy cores during each kind,
    and the share of each kind that overlapped an agent burst."""
    done = [r for r in records if r.get("error") is None and r.get("end") is not None]
    lat = sorted(r["end"] - r["start"] for r in done)
    if not lat:
        raise ValueError("no successful request to attribute")
    p50 = statistics.median(lat)
    slow_rs = [r for r in done if r["end"] - r["start"] > slow * p50]
    fast_rs = [r for r in done if r["end"] - r["start"] <= 1.1 * p50]
    groups = sorted({g for _, _, gs in series for g in gs})
    agent = bursts(series)

    def mean_busy(rs: list[dict], g: str) -> float | None:
        return statistics.mean(busy(series, g, r["start"], r["end"]) for r in rs) if rs else None

    def hit(rs: list[dict]) -> float | None:
        if not rs:
            return None
        return sum(any(b0 < r["end"] and b1 > r["start"] for b0, b1 in agent) for r in rs) / len(rs)

    t0 = series[0][0] if series else 0.0
    return {
        "requests": len(done), "p50_s": p50, "p99_s": lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))],
        "slow_factor": slow, "slow": len(slow_rs), "fast": len(fast_rs),
        "busy_cores": {g: {"slow": mean_busy(slow_rs, g), "fast": mean_busy(fast_rs, g)} for g in groups},
        "agent_bursts_s": [round(b0 - t0, 2) for b0, _ in agent],
        "slow_starts_s": sorted(round(r["start"] - t0, 2) for r in slow_rs),
        "share_overlapping_an_agent_burst": {"slow": hit(slow_rs), "fast": hit(fast_rs)},
    }


def print_report(rep: dict) -> None:
    print(f"{rep['requests']} requests, p50 {rep['p50_s']:.3f} s, p99 {rep['p99_s']:.3f} s; "
          f"{rep['slow']} slow (> {rep['slow_factor']:g}x p50), {rep['fast']} fast (<= 1.1x)")
    print(f"{'group':12s} {'cores busy: slow':>17s} {'fast':>8s}")
    for g, v in rep["busy_cores"].items():
        if (v["slow"] or 0) > 0.002 or (v["fast"] or 0) > 0.002:
            print(f"{g:12s} {v['slow'] or 0:17.3f} {v['fast'] or 0:8.3f}")
    share = rep["share_overlapping_an_agent_burst"]
    print(f"overlapping a burst of Ray's dashboard agent: slow {share['slow']}, fast {share['fast']}")
    print("agent bursts at (s):", rep["agent_bursts_s"][:40])
    print("slow requests started at (s):", rep["slow_starts_s"][:60])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/nld-tiny-pystdlib")
    p.add_argument("--policy", type=Path, default=ROOT / "policies" / "presets" / "adaptive.yaml")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--seconds", type=float, default=40.0)
    p.add_argument("--interval", type=float, default=0.05, help="seconds between /proc samples")
    p.add_argument("--slow", type=float, default=1.3, help="a request slower than this x the median is slow")
    p.add_argument("--port", type=int, default=8830)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "tail_profile.json")
    p.add_argument("--stack-args", default="", help="more `nld-gateway up` options, e.g. "
                   "'--metrics-report-interval-ms 10000'")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="tail_profile_"))
    model = ROOT / args.model
    prompts = work / "prompts.json"
    prompts.write_text(json.dumps(heldout_prompts(model / "split.json", model, 8, 64)))
    url = f"http://127.0.0.1:{args.port}"
    load = [PY, str(ROOT / "benchmarks" / "loadgen.py"), "--url", url, "--model", "nld", "--prompts", str(prompts),
            "--concurrency", str(args.concurrency), "--settle-seconds", "0", "--tail-seconds", "0",
            "--extra-body", json.dumps({"decoding_mode": "ar"})]
    stack = start_stack(str(model), args.port, args.policy, work, "tail", None, shlex.split(args.stack_args))
    samples: list = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.monotonic(), cpu_by_group(GROUPS)))
            stop.wait(args.interval)

    try:
        stack.wait_ready()
        subprocess.run(load + ["--seconds", "5"], capture_output=True, check=True, cwd=ROOT)  # warm up
        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            subprocess.run(load + ["--seconds", str(args.seconds), "--out", str(work / "raw.json")],
                           capture_output=True, check=True, cwd=ROOT)
        finally:
            stop.set()
            sampler.join()
    finally:
        stack.stop()
    records = json.loads((work / "raw.json").read_text())["records"]
    rep = attribute(records, intervals(samples), args.slow)
    rep.update({"concurrency": args.concurrency, "seconds": args.seconds, "policy": str(args.policy),
                "stack_args": args.stack_args,
                "errors": sum(r.get("error") is not None for r in records)})
    print_report(rep)
    args.out.write_text(json.dumps(rep, indent=1))
    print(f"saved {args.out}")
    return rep


if __name__ == "__main__":
    main()
