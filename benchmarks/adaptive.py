"""Adaptive vs fixed modes on the full stack: gateway -> Ray Serve -> engine, on loopback.

For each concurrency level and each policy (fixed `ar`, fixed `self_spec`, the adaptive policy
file), a fresh gateway is started and C closed-loop clients send `auto` completions
(non-streaming, fixed max_tokens): --settle-seconds unmeasured (a steady state: the adaptive
policy's switch for this level has happened), then --seconds measured, then --tail-seconds
unmeasured. It reports completion tokens/s, each request credited with the share of its
lifetime inside the measured window (so a wave of requests ending just inside or outside the
window does not swing the rate), and the p50 latency of the requests that ended in the window.
The policies run interleaved level by level, in a rotating order, for --rounds rounds, and each
(policy, level) reports the median over rounds: on a shared machine, drift over the minutes of
a run then hits every policy alike. Then a ramp (concurrency up and down) runs under the
adaptive policy, recording the policy's mode over time. Output: a table, JSON and a PNG plot.
The replicas stay up throughout; only the gateway (in-process, on a loopback port) is rebuilt
per run.

    python benchmarks/adaptive.py --model DIR --policy benchmarks/adaptive_cpu.yaml
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.app import create_app  # noqa: E402
from gateway.config import GatewayConfig  # noqa: E402
from gateway.metrics import GatewayMetrics, InflightCounter  # noqa: E402
from gateway.replica_client import HttpReplicaClient  # noqa: E402
from policies import FixedModePolicy, PolicyHolder  # noqa: E402
from tests.gateway.servers import serve_in_thread  # noqa: E402
from benchmarks.engine_modes import heldout_prompts  # noqa: E402
from tests.serving import free_port  # noqa: E402


async def closed_loop(url: str, clients: int, seconds: float, bodies: list[dict], *, window: tuple[float, float] | None = None,
                      tail: float = 0.0) -> dict:
    """C clients send requests back to back for `seconds` (then `tail` more, so the window's end
    stays under load). Measured over `window` (offsets from the start; default the whole run):
    each request counts the share of its tokens that its lifetime overlaps the window, so a
    wave of requests finishing just inside or outside the window does not swing the rate; the
    p50 latency is over the requests that ended inside the window, and `latency_by_prompt` keeps
    those latencies per prompt (see `balanced_p50`)."""
    records: list[tuple[float, float, int, str, int]] = []  # (start, end, completion tokens, mode, prompt)
    t_start = time.monotonic()
    deadline = t_start + seconds + tail

    async def client(http: httpx.AsyncClient, k: int):
        while time.monotonic() < deadline:
            prompt = k % len(bodies)  # client k cycles through the prompts from its own offset
            k += 1
            t0 = time.monotonic()
            r = await http.post(url + "/v1/completions", json=bodies[prompt])
            if r.status_code != 200:
                await asyncio.sleep(0.05)
                continue
            records.append((t0 - t_start, time.monotonic() - t_start, r.json()["usage"]["completion_tokens"],
                            r.headers.get("x-nld-decoding-mode", "?"), prompt))

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=clients + 4)) as http:
        await asyncio.gather(*(client(http, k) for k in range(clients)))
    w0, w1 = window or (0.0, seconds)
    tokens = 0.0
    latencies: list[float] = []
    by_prompt: dict[int, list[float]] = {}
    modes: dict[str, int] = {}
    for start, end, n, mode, prompt in records:
        overlap = min(end, w1) - max(start, w0)
        if overlap <= 0:
            continue
        tokens += n * overlap / max(end - start, 1e-9)
        modes[mode] = modes.get(mode, 0) + 1
        if w0 <= end <= w1:
            latencies.append(end - start)
            by_prompt.setdefault(prompt, []).append(end - start)
    return {"tokens_per_s": tokens / (w1 - w0), "latency_p50_s": statistics.median(latencies) if latencies else None,
            "latency_p50_balanced_s": balanced_p50(by_prompt), "latency_by_prompt": by_prompt,
            "requests": len(latencies), "modes": modes}


def balanced_p50(by_prompt: dict[int, list[float]]) -> float | None:
    """The median over prompts of each prompt's median latency: the p50 of a workload in which
    every prompt is equally frequent. The prompts' latencies form separate clusters (the draft
    is accepted more for some texts than for others), so the plain p50 of one window falls
    between two clusters and jumps from one to the other when one prompt gets one request more
    or less in the window; this estimate does not depend on those counts."""
    medians = [statistics.median(v) for v in by_prompt.values() if v]
    return statistics.median(medians) if medians else None


def gateway_app(replica_url: str, policy_name: str, policy_files: dict[str, Path]):
    """A gateway with fixed mode `policy_name`, or with the policy file `policy_files[policy_name]`."""
    cfg = GatewayConfig(replica_url=replica_url, model_name="bench", max_inflight_requests=None)
    metrics = GatewayMetrics(InflightCounter())
    if policy_name in policy_files:
        policy = PolicyHolder(policy_files[policy_name], local_counters={"inflight": lambda: metrics.inflight.value},
                              registry=metrics.registry)
    else:
        policy = FixedModePolicy(mode=policy_name)
    return create_app(cfg, HttpReplicaClient(cfg), policy, metrics=metrics)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--policy", type=Path, default=Path(__file__).parent / "adaptive_cpu.yaml")
    p.add_argument("--levels", default="1,2,4,8,16,32")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--settle-seconds", type=float, default=8.0,
                   help="unmeasured load at each level first (every policy): a fresh adaptive gateway starts "
                        "sparse and its smoothed signal takes a moment to rise; the window sees the steady state")
    p.add_argument("--tail-seconds", type=float, default=3.0,
                   help="load kept on after the window, so requests that straddle its end finish under load")
    p.add_argument("--rounds", type=int, default=3,
                   help="repeat every (level, policy) run; the table takes the median over rounds")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--heldout", type=Path, default=None,
                   help="split JSON whose held-out file starts are the prompts (default: <model>/split.json if any)")
    p.add_argument("--prompt-count", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--policies", default="ar,self_spec,adaptive",
                   help="comma-separated: ar, self_spec, adaptive (the --policy file) or LABEL=FILE (another policy "
                        "file, e.g. a variant to compare); the summary needs ar, self_spec and adaptive")
    p.add_argument("--ramp", default="1,2,4,8,16,32,16,8,4,2,1", help="concurrency steps; empty: no ramp")
    p.add_argument("--ramp-seconds", type=float, default=5.0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/adaptive.json"))
    args = p.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    ramp_levels = [int(x) for x in args.ramp.split(",")] if args.ramp else []

    import ray
    from ray import serve

    from replicas.app import bind_app
    from replicas.ingress import local_ingress, serve_env

    os.environ.update(serve_env(local_ingress()))  # the stack's ingress, as `nld-gateway up` runs it
    metrics_port, port = free_port(), free_port()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    policies, policy_files, texts = write_policy_files(args.policies, args.policy, metrics_port, args.out.parent)
    ray.init(num_cpus=4, include_dashboard=False, _metrics_export_port=metrics_port, log_to_driver=False,
             _system_config={"metrics_report_interval_ms": 500}, configure_logging=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    if "adaptive" not in policies:
        ramp_levels = []
    most = max(levels + ramp_levels)  # the replica admits every client at once (no 429 and retry)
    config = {"model_path": args.model, "model_name": "bench", "torch_threads": 1,
              "engine": {"max_batch_size": most, "max_seq_len": 512, "max_waiting": 4 * most}}
    serve.run(bind_app(config, {"ray_actor_options": {"num_cpus": 1}}), name="nld", route_prefix="/")
    replica_url = f"http://127.0.0.1:{port}"
    heldout = args.heldout or (Path(args.model) / "split.json")
    if heldout.is_file():  # the prompts of `engine_modes.py --heldout`: held-out file starts, as token ids
        prompts = heldout_prompts(heldout, Path(args.model), args.prompt_count, args.prompt_len)
    else:
        prompts = ["import os\nimport sys\n\n\ndef main():\n"]
    bodies = [{"model": "bench", "prompt": p, "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True}
            for p in prompts]
    rows = []
    print(f"{'round':>5} {'policy':<10} {'conc':>5} {'tok/s':>9} {'p50 s':>8} {'bal p50':>8} {'requests':>8}  modes")
    for name in policies:  # first use of each gateway path (imports, first scrapes), unmeasured
        with serve_in_thread(gateway_app(replica_url, name, policy_files)) as url:
            asyncio.run(closed_loop(url, 4, 3.0, bodies))
    for rnd in range(args.rounds):
        for i, c in enumerate(levels):
            k = (i + rnd) % len(policies)  # rotate the order, so drift over time hits every policy alike
            for name in policies[k:] + policies[:k]:
                with serve_in_thread(gateway_app(replica_url, name, policy_files)) as url:  # a fresh gateway
                    settle = args.settle_seconds
                    r = asyncio.run(closed_loop(url, c, settle + args.seconds, bodies,
                                                window=(settle, settle + args.seconds), tail=args.tail_seconds))
                r.update(policy=name, concurrency=c, round=rnd)
                rows.append(r)
                print(f"{rnd:>5} {name:<10} {c:>5} {r['tokens_per_s']:>9.1f} {r['latency_p50_s'] or 0:>8.3f} "
                      f"{r['latency_p50_balanced_s'] or 0:>8.3f} "
                      f"{r['requests']:>8}  {r['modes']}", flush=True)
    ramp = run_ramp(replica_url, policy_files, ramp_levels, args.ramp_seconds, bodies) if ramp_levels else []
    serve.shutdown()
    ray.shutdown()
    merged = merge_rounds(rows, policies, levels)
    by = {(r["policy"], r["concurrency"]): r for r in merged}
    print(f"median over {args.rounds} round(s):")
    for r in merged:
        print(f"      {r['policy']:<10} {r['concurrency']:>5} {r['tokens_per_s']:>9.1f} "
              f"{r['latency_p50_s'] or 0:>8.3f} {r['latency_p50_balanced_s'] or 0:>8.3f} {r['requests']:>8}  "
              f"{r['modes']}")
    if not {"ar", "self_spec", "adaptive"} <= set(policies):
        args.out.write_text(json.dumps({"model": args.model, "policies": texts, "rows": merged, "round_rows": rows},
                                       indent=2))
        print(f"(a partial sweep: no summary) saved {args.out}")
        return
    summary = []
    for c in levels:
        best = max(by["ar", c]["tokens_per_s"], by["self_spec", c]["tokens_per_s"])
        summary.append({"concurrency": c, "adaptive_over_best_fixed": by["adaptive", c]["tokens_per_s"] / best})
    c1 = {key: by["adaptive", 1][key] / min(by["ar", 1][key], by["self_spec", 1][key])
          for key in ("latency_p50_s", "latency_p50_balanced_s")}
    result = {"adaptive_over_best_fixed": summary, "c1_p50_latency_over_best_fixed": c1["latency_p50_s"],
              "c1_balanced_p50_latency_over_best_fixed": c1["latency_p50_balanced_s"]}
    print(json.dumps(result, indent=2))
    args.out.write_text(json.dumps({"model": args.model, "policy": texts["adaptive"], "policies": texts,
                                    "rows": merged, "round_rows": rows, "ramp": ramp, **result}, indent=2))
    plot(merged, ramp, levels, args.out.with_suffix(".png"))
    print(f"saved {args.out} and {args.out.with_suffix('.png')}")


def write_policy_files(spec: str, adaptive: Path, metrics_port: int, out_dir: Path):
    """`--policies` -> (labels in order, {label: policy file} for the non-fixed ones, {label: text}).
    Each policy file is written beside the results with {metrics_port} filled in."""
    labels, sources = [], {"adaptive": adaptive}
    for item in spec.split(","):
        label, _, path = item.partition("=")
        labels.append(label)
        if path:
            sources[label] = Path(path)
    files, texts = {}, {}
    for label, path in sources.items():
        texts[label] = path.read_text().replace("{metrics_port}", str(metrics_port))
        files[label] = out_dir / f"{label}_policy.yaml"
        files[label].write_text(texts[label])
    return labels, files, texts


def run_ramp(replica_url: str, policy_files: dict[str, Path], levels: list[int], seconds: float, bodies: list[dict]) -> list[dict]:
    """One adaptive gateway through the concurrency `levels`; the policy's mode after each."""
    ramp = []
    with serve_in_thread(gateway_app(replica_url, "adaptive", policy_files)) as url:
        t_start = time.monotonic()
        for c in levels:
            r = asyncio.run(closed_loop(url, c, seconds, bodies))
            state = httpx.get(url + "/v1/nld/policy").json()
            ramp.append({"t": time.monotonic() - t_start, "concurrency": c, "tokens_per_s": r["tokens_per_s"],
                         "mode": state["mode"], "value": state["value"], "modes": r["modes"]})
            print(f"ramp c={c:>3} tok/s {r['tokens_per_s']:>8.1f} mode {state['mode']} value {state['value']}",
                  flush=True)
    return ramp


def merge_rounds(rows: list[dict], policies, levels) -> list[dict]:
    """One row per (policy, level): the median over rounds of tokens/s and of p50 latency, and the
    balanced p50 over the latencies of all rounds pooled per prompt."""
    merged = []
    for name in policies:
        for c in levels:
            rs = [r for r in rows if r["policy"] == name and r["concurrency"] == c]
            modes: dict[str, int] = {}
            pooled: dict[int, list[float]] = {}
            for r in rs:
                for m, n in r["modes"].items():
                    modes[m] = modes.get(m, 0) + n
                for prompt, values in r["latency_by_prompt"].items():
                    pooled.setdefault(int(prompt), []).extend(values)
            p50s = [r["latency_p50_s"] for r in rs if r["latency_p50_s"] is not None]
            merged.append({"policy": name, "concurrency": c, "rounds": len(rs),
                           "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                           "latency_p50_s": statistics.median(p50s) if p50s else None,
                           "latency_p50_balanced_s": balanced_p50(pooled),
                           "requests": sum(r["requests"] for r in rs), "modes": modes})
    return merged


def plot(rows, ramp, levels, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    for name in ("ar", "self_spec", "adaptive"):
        rs = [r for r in rows if r["policy"] == name]
        a.plot([r["concurrency"] for r in rs], [r["tokens_per_s"] for r in rs], marker="o", label=name)
    a.set_xscale("log", base=2)
    a.set_xlabel("concurrency (closed loop, auto requests)")
    a.set_ylabel("completion tokens/s")
    a.legend()
    a.grid(alpha=0.3)
    xs = list(range(len(ramp)))
    b.bar(xs, [r["tokens_per_s"] for r in ramp], color=["tab:orange" if r["mode"] == "self_spec" else "tab:blue"
                                                          for r in ramp])
    b.set_xticks(xs, [str(r["concurrency"]) for r in ramp])
    b.set_xlabel("ramp step (concurrency); orange = self_spec, blue = ar at the step's end")
    b.set_ylabel("tokens/s")
    fig.suptitle("Adaptive policy vs fixed modes on the full stack")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
