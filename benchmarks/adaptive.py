"""Adaptive vs fixed modes on the full stack: gateway -> Ray Serve -> engine, on loopback.

For each concurrency level and each policy (fixed `ar`, fixed `self_spec`, the adaptive policy
file), a fresh gateway is started and C closed-loop clients send `auto` completions
(non-streaming, fixed max_tokens): --settle-seconds unmeasured (a steady state: the adaptive
policy's switch for this level has happened), then --seconds measured, then --tail-seconds
unmeasured. It reports completion tokens/s, each request credited with the share of its
lifetime inside the measured window (so a wave of requests ending just inside or outside the
window does not swing the rate), the p50 latency of the requests that ended in the window, and
every request that failed (non-200 statuses by status, transport failures by kind), in the table
and the JSON: none is dropped. The policies run interleaved level by level, in a rotating
order, for --rounds rounds, and each (policy, level) reports the median over rounds: on a shared
machine, drift over the minutes of a run then hits every policy alike. Then a ramp (concurrency
up and down) runs under the adaptive policy, recording the policy's mode over time. Output: a
table, JSON and a PNG plot. The replicas stay up throughout; only the gateway is restarted per
run: an `nld-gateway serve` process of its own on a loopback port (`--gateway process`, the
default, as deployed), or served in this process beside the clients (`--gateway thread`).

A step change (--step-change, default 1 -> 32 -> 1, --step-seconds each) runs one adaptive
gateway through the levels and counts the requests that ran in the worse fixed mode of their
level. With a calibrating policy (a `mode.goodput` block, e.g. policies/presets/adaptive.yaml, the default
with --no-tune), --calibrate-seconds first loads it with the tuning prompts at the lowest and
the highest level, so its cost model sees other prompts first than those it is judged on.

Tuning and measuring use different prompts. The prompts are the starts of the model's held-out
files (`split.json`, as `engine_modes.py --heldout`): the first --prompt-count of them TUNE, the
next --prompt-count MEASURE (`split_prompts`). With --tune (the default), a sweep of the fixed
modes on the tuning prompts finds where AR overtakes self-spec and sets the adaptive policy's
thresholds from it (`tune_thresholds`: loaded above the midpoint between the last level
self-spec wins and the first AR keeps winning from, back below the midpoint of that and the
self-spec level); the measured sweep then runs on the other prompts. --no-tune keeps the
policy file's thresholds.

    python benchmarks/adaptive.py --model DIR --policy benchmarks/adaptive_cpu.yaml
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.bootstrap import PolicySpec, build_gateway  # noqa: E402
from gateway.config import GatewayConfig  # noqa: E402
from policies import parse_policy  # noqa: E402
from tests.gateway.servers import serve_in_thread  # noqa: E402
from benchmarks.engine_modes import heldout_prompts  # noqa: E402
from benchmarks.peer_vllm import Server  # noqa: E402
from tests.serving import free_port  # noqa: E402


async def closed_loop(url: str, clients: int, seconds: float, bodies: list[dict], *, window: tuple[float, float] | None = None,
                      tail: float = 0.0, transport: httpx.AsyncBaseTransport | None = None) -> dict:
    """C clients send requests back to back for `seconds` (then `tail` more, so the window's end
    stays under load). Measured over `window` (offsets from the start; default the whole run):
    each request counts the share of its tokens that its lifetime overlaps the window, so a
    wave of requests finishing just inside or outside the window does not swing the rate; the
    p50 latency is over the requests that ended inside the window, and `latency_by_prompt` keeps
    those latencies per prompt (see `balanced_p50`). Every request is accounted for: a 200 with
    its usage, or an error (a non-200 status, by status; a transport failure or an unreadable
    body, by kind) in `errors` (those that ended inside the window) and `errors_total` (the whole
    run); `sent` counts them all. A client waits 50 ms after an error before its next request."""
    records: list[tuple[float, float, int, str, int]] = []  # (start, end, completion tokens, mode, prompt)
    failures: list[tuple[float, str]] = []  # (end, kind)
    sent = 0
    t_start = time.monotonic()
    deadline = t_start + seconds + tail

    async def client(http: httpx.AsyncClient, k: int):
        nonlocal sent
        while time.monotonic() < deadline:
            prompt = k % len(bodies)  # client k cycles through the prompts from its own offset
            k += 1
            t0 = time.monotonic()
            sent += 1
            kind = outcome = None
            try:
                r = await http.post(url + "/v1/completions", json=bodies[prompt])
                if r.status_code != 200:
                    kind = str(r.status_code)
                else:
                    outcome = (r.json()["usage"]["completion_tokens"], r.headers.get("x-nld-decoding-mode", "?"))
            except httpx.HTTPError as e:  # timeouts, refused or reset connections, protocol errors
                kind = type(e).__name__
            except (ValueError, KeyError, TypeError):  # a 200 whose body is not a completion
                kind = "bad_body"
            if kind is not None:
                failures.append((time.monotonic() - t_start, kind))
                await asyncio.sleep(0.05)
                continue
            records.append((t0 - t_start, time.monotonic() - t_start, outcome[0], outcome[1], prompt))

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=clients + 4),
                                 transport=transport) as http:
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
            "requests": len(latencies), "modes": modes, "sent": sent, "ok_total": len(records),
            "errors": count_kinds(kind for end, kind in failures if w0 <= end <= w1),
            "errors_total": count_kinds(kind for _, kind in failures)}


def count_kinds(kinds) -> dict[str, int]:
    out: dict[str, int] = {}
    for k in kinds:
        out[k] = out.get(k, 0) + 1
    return dict(sorted(out.items()))


def errors_text(errors: dict[str, int]) -> str:
    return ",".join(f"{k}:{v}" for k, v in errors.items()) or "0"


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
    if policy_name in policy_files:
        spec = PolicySpec(file=policy_files[policy_name])
    else:
        spec = PolicySpec(mode=policy_name)
    return build_gateway(cfg, spec).app


class Gateways:
    """Opens a fresh gateway per run: `process` (the default) runs `nld-gateway serve` as its own
    process, as a deployment does, so the benchmark's clients and the gateway do not share one
    interpreter; `thread` serves it in this process (the layout of runs 1-5 in docs/PERFORMANCE.md)."""

    def __init__(self, replica_url: str, policy_files: dict[str, Path], layout: str, metrics_port: int,
                 logs: Path) -> None:
        self.replica_url, self.policy_files, self.layout = replica_url, policy_files, layout
        self.metrics_port, self.logs = metrics_port, logs

    @contextlib.contextmanager
    def open(self, name: str):
        """The base URL of a gateway with fixed mode `name`, or with the policy file of `name`."""
        if self.layout == "thread":
            with serve_in_thread(gateway_app(self.replica_url, name, self.policy_files)) as url:
                yield url
            return
        port = free_port()
        cmd = [sys.executable, "-m", "gateway", "serve", "--replica-url", self.replica_url, "--port", str(port),
               "--model-name", "bench", "--no-auth", "--log-level", "warning",
               "--replica-metrics-port", str(self.metrics_port)]
        cmd += ["--policy", str(self.policy_files[name])] if name in self.policy_files else ["--mode", name]
        server = Server(f"gateway {name}", cmd, f"http://127.0.0.1:{port}/ready", self.logs / f"gateway_{name}.log")
        try:
            server.wait_ready(120)
            yield f"http://127.0.0.1:{port}"
        finally:
            server.stop()


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
    p.add_argument("--prompt-count", type=int, default=8,
                   help="prompts measured (and as many others for tuning): held-out file starts")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--tune", action=argparse.BooleanOptionalAction, default=True,
                   help="set the adaptive policy's thresholds from a fixed-mode sweep on the tuning prompts")
    p.add_argument("--tune-rounds", type=int, default=1)
    p.add_argument("--policies", default="ar,self_spec,adaptive",
                   help="comma-separated: ar, self_spec, adaptive (the --policy file) or LABEL=FILE (another policy "
                        "file, e.g. a variant to compare); the summary needs ar, self_spec and adaptive")
    p.add_argument("--ramp", default="1,2,4,8,16,32,16,8,4,2,1", help="concurrency steps; empty: no ramp")
    p.add_argument("--ramp-seconds", type=float, default=5.0)
    p.add_argument("--calibrate-seconds", type=float, default=10.0,
                   help="before the measured sweep, load the adaptive gateway with the TUNING prompts at the lowest "
                        "and the highest level for this long each (a calibrating policy's cost model first sees "
                        "other prompts than those it is judged on); 0: none")
    p.add_argument("--step-change", default="1,32,1",
                   help="after the sweep, one adaptive gateway through these levels (--step-seconds each), counting "
                        "the requests that ran in the worse fixed mode of their level; empty: none")
    p.add_argument("--step-seconds", type=float, default=15.0)
    p.add_argument("--gateway", choices=["process", "thread"], default="process",
                   help="process: each gateway is an `nld-gateway serve` process (as deployed); thread: in this "
                        "process beside the clients (runs 1-5 of docs/PERFORMANCE.md)")
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
    step_levels = [int(x) for x in args.step_change.split(",")] if args.step_change else []
    if "adaptive" not in policies:
        ramp_levels = step_levels = []
    most = max(levels + ramp_levels + step_levels)  # the replica admits every client at once (no 429 and retry)
    config = {"model_path": args.model, "model_name": "bench", "torch_threads": 1,
              "engine": {"max_batch_size": most, "max_seq_len": 512, "max_waiting": 4 * most}}
    serve.run(bind_app(config, {"ray_actor_options": {"num_cpus": 1}}), name="nld", route_prefix="/")
    replica_url = f"http://127.0.0.1:{port}"
    heldout = args.heldout or (Path(args.model) / "split.json")
    if heldout.is_file():  # the prompts of `engine_modes.py --heldout`: held-out file starts, as token ids
        prompts = heldout_prompts(heldout, Path(args.model), 2 * args.prompt_count, args.prompt_len)
    else:
        prompts = ["import os\nimport sys\n\n\ndef main():\n", "class Config:\n    def __init__(self):\n"]
    tune_prompts, measure_prompts = split_prompts(prompts)
    bodies = [{"model": "bench", "prompt": p, "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True}
              for p in measure_prompts]
    tune_bodies = [{**bodies[0], "prompt": p} for p in tune_prompts]
    print(f"prompts: {len(tune_prompts)} tune, {len(measure_prompts)} measure (disjoint held-out file starts)")
    header = (f"{'round':>5} {'policy':<10} {'conc':>5} {'tok/s':>9} {'p50 s':>8} {'bal p50':>8} {'requests':>8} "
              f"{'errors':>8}  modes")
    gateways = Gateways(replica_url, policy_files, args.gateway, metrics_port,
                        Path(tempfile.mkdtemp(prefix="adaptive_gateways_")))
    for name in policies:  # first use of each gateway path (imports, first scrapes), unmeasured
        with gateways.open(name) as url:
            asyncio.run(closed_loop(url, 4, 3.0, tune_bodies))
    tuning = None
    if args.tune and "adaptive" in policies:
        print("tuning sweep (fixed modes, tuning prompts):\n" + header)
        tune_rows = sweep(gateways, ["ar", "self_spec"], levels, args.tune_rounds, tune_bodies, args)
        thresholds = tune_thresholds(merge_rounds(tune_rows, ["ar", "self_spec"], levels), levels)
        texts["adaptive"] = tuned_policy_text(texts["adaptive"], thresholds)
        policy_files["adaptive"].write_text(texts["adaptive"])
        tuning = {"thresholds": thresholds, "rows": merge_rounds(tune_rows, ["ar", "self_spec"], levels),
                  "round_rows": tune_rows}
        print(f"tuned: {thresholds}")
    calibration = None
    if args.calibrate_seconds > 0 and "adaptive" in policies:
        calibration = calibrate(gateways, [min(levels), max(levels)], args.calibrate_seconds, tune_bodies)
    print("measured sweep (measuring prompts):\n" + header)
    rows = sweep(gateways, policies, levels, args.rounds, bodies, args)
    ramp = run_ramp(gateways, ramp_levels, args.ramp_seconds, bodies) if ramp_levels else []
    best_fixed = {r["concurrency"]: max(("ar", "self_spec"), key=lambda m: r[m])
                  for r in fixed_rates(merge_rounds(rows, policies, levels), levels)}
    step = step_change(gateways, step_levels, args.step_seconds, bodies, best_fixed) if step_levels else []
    serve.shutdown()
    ray.shutdown()
    merged = merge_rounds(rows, policies, levels)
    by = {(r["policy"], r["concurrency"]): r for r in merged}
    print(f"median over {args.rounds} round(s):")
    for r in merged:
        print(row_line("", r))
    errors = {"sent": sum(r["sent"] for r in rows), "ok": sum(r["ok_total"] for r in rows),
              "failed": _sum_counts(r["errors_total"] for r in rows)}
    print(f"requests sent {errors['sent']}, ok {errors['ok']}, failed {errors['failed'] or 0} (sweep rows)")
    for ph in step:
        errors["sent"] += ph["sent"]
        errors["ok"] += sum(ph["modes"].values())
        errors["failed"] = _sum_counts([errors["failed"], ph["errors"]])
    common = {"model": args.model, "policies": texts, "prompts": prompt_split_record(tune_prompts, measure_prompts),
              "tuning": tuning, "calibration": calibration, "requests": errors, "rows": merged, "round_rows": rows,
              "step_change": step, "step_change_worse_requests": sum(ph["worse"] or 0 for ph in step),
              "step_change_requests": sum(sum(ph["modes"].values()) for ph in step)}
    if not {"ar", "self_spec", "adaptive"} <= set(policies):
        args.out.write_text(json.dumps(common, indent=2))
        print(f"(a partial sweep: no summary) saved {args.out}")
        return
    summary = []
    paired = paired_over_best_fixed(rows, levels)
    for c in levels:
        best = max(by["ar", c]["tokens_per_s"], by["self_spec", c]["tokens_per_s"])
        summary.append({"concurrency": c, "adaptive_over_best_fixed": by["adaptive", c]["tokens_per_s"] / best,
                        **paired[c]})
    c1 = {key: c1_latency_ratio(by, key) if 1 in levels else None  # only when concurrency 1 was measured
          for key in ("latency_p50_s", "latency_p50_balanced_s")}
    result = {"adaptive_over_best_fixed": summary, "c1_p50_latency_over_best_fixed": c1["latency_p50_s"],
              "c1_balanced_p50_latency_over_best_fixed": c1["latency_p50_balanced_s"]}
    print(json.dumps(result, indent=2))
    args.out.write_text(json.dumps({**common, "policy": texts["adaptive"], "ramp": ramp, **result}, indent=2))
    plot(merged, ramp, levels, args.out.with_suffix(".png"))
    print(f"saved {args.out} and {args.out.with_suffix('.png')}")


def paired_over_best_fixed(rows: list[dict], levels: list[int]) -> dict[int, dict]:
    """Per level, adaptive's tokens/s over the better fixed mode's IN THE SAME ROUND (the three ran
    back to back, so the machine's drift between rounds cancels), for each round, and their median."""
    out = {}
    for c in levels:
        rate = {(r["policy"], r["round"]): r["tokens_per_s"] for r in rows if r["concurrency"] == c}
        rounds = sorted({k for (name, k) in rate if ("adaptive", k) in rate and ("ar", k) in rate
                         and ("self_spec", k) in rate})
        ratios = [rate["adaptive", k] / max(rate["ar", k], rate["self_spec", k]) for k in rounds]
        out[c] = {"paired_per_round": ratios, "paired_median": statistics.median(ratios) if ratios else None}
    return out


def c1_latency_ratio(by: dict, key: str) -> float | None:
    """Adaptive's p50 latency at concurrency 1 over the lower of the fixed modes' (a fixed mode
    with no request ended in its window has none and is left out; None when nothing compares)."""
    fixed = [by[m, 1][key] for m in ("ar", "self_spec") if by[m, 1][key] is not None]
    ours = by["adaptive", 1][key]
    return ours / min(fixed) if fixed and ours is not None else None


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


def sweep(gateways: Gateways, policies: list[str], levels: list[int], rounds: int, bodies: list[dict],
          args) -> list[dict]:
    """Every (policy, level) `rounds` times, policies interleaved per level in a rotating order."""
    rows = []
    for rnd in range(rounds):
        for i, c in enumerate(levels):
            k = (i + rnd) % len(policies)  # rotate the order, so drift over time hits every policy alike
            for name in policies[k:] + policies[:k]:
                with gateways.open(name) as url:  # a fresh gateway
                    settle = args.settle_seconds
                    r = asyncio.run(closed_loop(url, c, settle + args.seconds, bodies,
                                                window=(settle, settle + args.seconds), tail=args.tail_seconds))
                r.update(policy=name, concurrency=c, round=rnd)
                rows.append(r)
                print(row_line(rnd, r), flush=True)
    return rows


def row_line(rnd, r: dict) -> str:
    return (f"{rnd:>5} {r['policy']:<10} {r['concurrency']:>5} {r['tokens_per_s']:>9.1f} "
            f"{r['latency_p50_s'] or 0:>8.3f} {r['latency_p50_balanced_s'] or 0:>8.3f} {r['requests']:>8} "
            f"{errors_text(r['errors']):>8}  {r['modes']}")


def split_prompts(prompts: list) -> tuple[list, list]:
    """(tuning prompts, measuring prompts): the first half and the rest, disjoint (the same list
    twice only when there is a single prompt)."""
    if len(prompts) < 2:
        return list(prompts), list(prompts)
    half = len(prompts) // 2
    return list(prompts[:half]), list(prompts[half:])


def prompt_split_record(tune: list, measure: list) -> dict:
    disjoint = not any(p in measure for p in tune)
    return {"tune": len(tune), "measure": len(measure), "disjoint": disjoint,
            "rule": "held-out file starts in split.json order: the first half tunes, the second half measures"}


def tune_thresholds(merged: list[dict], levels: list[int]) -> dict:
    """The adaptive thresholds from fixed-mode rows (tokens/s of `ar` and `self_spec` per level):
    the crossover is the lowest level from which AR is at least as fast at every higher level;
    loaded above the midpoint between the level below it and it, back below the midpoint of that
    level and the threshold. AR never ahead: never loaded within the levels swept; AR ahead
    from the first level: loaded from half of it."""
    rate = {(r["policy"], r["concurrency"]): r["tokens_per_s"] for r in merged}
    levels = sorted(levels)
    ar_wins = [rate["ar", c] >= rate["self_spec", c] for c in levels]
    crossover = next((c for i, c in enumerate(levels) if all(ar_wins[i:])), None)
    if crossover is None:
        enter, below = 2.0 * levels[-1], float(levels[-1])
    elif crossover == levels[0]:
        enter, below = levels[0] / 2, 0.0
    else:
        below = float(levels[levels.index(crossover) - 1])
        enter = (below + crossover) / 2
    return {"crossover": crossover, "enter_loaded_above": enter, "leave_loaded_below": (below + enter) / 2}


def tuned_policy_text(text: str, thresholds: dict) -> str:
    """The policy file with its loaded thresholds replaced (validated; a middle band must still fit)."""
    doc = yaml.safe_load(text)
    doc["mode"]["enter_loaded_above"] = thresholds["enter_loaded_above"]
    doc["mode"]["leave_loaded_below"] = thresholds["leave_loaded_below"]
    out = "# thresholds tuned by benchmarks/adaptive.py on the tuning prompts\n" + yaml.safe_dump(doc, sort_keys=False)
    parse_policy(out, "tuned policy")  # raises PolicyFileError when the result is not a valid policy
    return out


def run_ramp(gateways: Gateways, levels: list[int], seconds: float, bodies: list[dict]) -> list[dict]:
    """One adaptive gateway through the concurrency `levels`; the policy's mode after each."""
    ramp = []
    with gateways.open("adaptive") as url:
        t_start = time.monotonic()
        for c in levels:
            r = asyncio.run(closed_loop(url, c, seconds, bodies))
            state = httpx.get(url + "/v1/nld/policy").json()
            ramp.append({"t": time.monotonic() - t_start, "concurrency": c, "tokens_per_s": r["tokens_per_s"],
                         "mode": state["mode"], "value": state["value"], "modes": r["modes"], "sent": r["sent"],
                         "errors": r["errors_total"]})
            print(f"ramp c={c:>3} tok/s {r['tokens_per_s']:>8.1f} mode {state['mode']} value {state['value']} "
                  f"errors {errors_text(r['errors_total'])}", flush=True)
    return ramp


def calibrate(gateways: Gateways, levels: list[int], seconds: float, bodies: list[dict]) -> list[dict]:
    """Load the adaptive gateway at each level with the tuning prompts; the policy's state after."""
    out = []
    with gateways.open("adaptive") as url:
        for c in levels:
            r = asyncio.run(closed_loop(url, c, seconds, bodies))
            state = httpx.get(url + "/v1/nld/policy").json()
            out.append({"concurrency": c, "tokens_per_s": r["tokens_per_s"], "mode": state["mode"],
                        "modes": r["modes"], "errors": r["errors_total"], "goodput": state.get("goodput")})
            print(f"calibration c={c:>3} (tuning prompts) tok/s {r['tokens_per_s']:>8.1f} mode {state['mode']} "
                  f"decided by {(state.get('goodput') or {}).get('decided_by')} errors {errors_text(r['errors_total'])}",
                  flush=True)
    return out


def fixed_rates(merged: list[dict], levels: list[int]) -> list[dict]:
    rate = {(r["policy"], r["concurrency"]): r["tokens_per_s"] for r in merged}
    return [{"concurrency": c, "ar": rate["ar", c], "self_spec": rate["self_spec", c]}
            for c in levels if ("ar", c) in rate and ("self_spec", c) in rate]


def step_change(gateways: Gateways, levels: list[int], seconds: float, bodies: list[dict],
                best_fixed: dict[int, str]) -> list[dict]:
    """One adaptive gateway through `levels` (e.g. 1 -> 32 -> 1), `seconds` each; per phase the
    requests by the mode the gateway gave them (x-nld-decoding-mode), and how many of them ran in
    a mode other than the better fixed mode at that level in the measured sweep (None: that
    level was not swept). A request the replica downgrades mid-flight counts by its first mode."""
    phases = []
    with gateways.open("adaptive") as url:
        for c in levels:
            r = asyncio.run(closed_loop(url, c, seconds, bodies))
            state = httpx.get(url + "/v1/nld/policy").json()
            best = best_fixed.get(c)
            worse = None if best is None else sum(n for m, n in r["modes"].items() if m != best)
            phases.append({"concurrency": c, "tokens_per_s": r["tokens_per_s"], "modes": r["modes"], "best_fixed": best,
                           "worse": worse, "sent": r["sent"], "errors": r["errors_total"], "mode_at_end": state["mode"],
                           "switches": state["switches"]})
            print(f"step c={c:>3} tok/s {r['tokens_per_s']:>8.1f} modes {r['modes']} best fixed {best} "
                  f"worse-mode requests {worse} errors {errors_text(r['errors_total'])}", flush=True)
    return phases


def _sum_counts(dicts) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for k, n in d.items():
            out[k] = out.get(k, 0) + n
    return dict(sorted(out.items()))


def merge_rounds(rows: list[dict], policies, levels) -> list[dict]:
    """One row per (policy, level): the median over rounds of tokens/s and of p50 latency, the
    balanced p50 over the latencies of all rounds pooled per prompt, and the requests sent and
    failed (by status or kind) summed over rounds."""
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
                           "requests": sum(r["requests"] for r in rs), "modes": modes,
                           "sent": sum(r.get("sent", 0) for r in rs),
                           "errors": _sum_counts(r.get("errors", {}) for r in rs),
                           "errors_total": _sum_counts(r.get("errors_total", {}) for r in rs)})
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
