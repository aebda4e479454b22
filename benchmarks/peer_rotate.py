"""Peer benchmark, finely interleaved: every system stays up, frozen while another is measured.

    python benchmarks/peer_rotate.py [--levels 1,2,4,8,16,32] [--rounds 4] \
        [--systems vllm,ar,self_spec,adaptive,bare,bare_1t,bare_split]

Why: this VM's speed drifts by up to 2x over minutes (the bare engine measured 2,082 then 4,385
tok/s at concurrency 32 ten minutes apart), while `peer_vllm.py` measures each system for minutes
at a time and restarts it per round, so its ratios carry that drift. Here every system is started
once and kept: vLLM (`peer_vllm.start_vllm`), one `nld-gateway up` stack (with --policy, default
the shipped calibrating preset) serving `ar` and `self_spec` fixed in the request and `adaptive`
as `auto`, and the bare `BatchEngine` in a process of its own (`bare_servers.BareServer`: weights
loaded once, one closed-loop window per command on stdin; torch's default threads, one per core,
so its steps of 16 tokens or more run on both CPUs), `bare_1t`: the same on one torch thread (issue
12's "bare BatchEngine, with one torch thread as in the replica"), and `bare_split`: the stack's engine
layout without its serving path (one such engine per CPU, bound to it, one torch thread each, the
clients split between them: `bare_servers.BareSplit`). For each round, for each level, the systems
run one after another in a rotating order (reversed in odd rounds: `window_order`); a server not
being measured is frozen (SIGSTOP to its whole process tree, SIGCONT after), so it takes no CPU
from the one measured, and the bare process waits on its stdin. The systems of one (round,
level) are thus measured within about a minute of each other, and besides medians over rounds the
tables give the median of per-round ratios (each from one round's neighbouring windows). A 60 s
freeze of the whole Ray stack was tried first: no error, no replica restart. Same client as
`peer_vllm.py` (`loadgen.py`, its own process); every failed or non-200 request of a run is
counted (`errors_total`), settle included. For the stack's streamed windows it also reads the
replicas' own inter-token histogram (`nld_replica_inter_token_latency_seconds`, on Ray's metrics
port) before and after: the engine-side seconds per token of the requests finished in the run
(settle included), beside the client's TPOT, so a streamed ITL above the bare engine's step splits
into what the engines took and what the serving path added. Saves JSON (`peer_rotate.json`) and a
PNG. Kept out of CI and `make bench` (vLLM's venv).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bare_servers import BareServer, BareSplit  # noqa: E402
from benchmarks.engine_modes import heldout_prompts  # noqa: E402
from benchmarks.peer_vllm import (BARES, STACK_VARIANTS, check_identity, ensure_vllm_venv,  # noqa: E402
                                  median_rows, peer_arguments, plot, print_tables, run_load, start_stack,
                                  start_vllm, window_settle)
from policies.signals import samples  # noqa: E402


def parent_pid(pid: int) -> int:
    """The parent of `pid`, from /proc (after the command name, which may hold spaces and ')')."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def process_tree(pid: int) -> list[int]:
    """`pid` and every descendant, from /proc (Ray's and vLLM's children included)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = parent_pid(int(entry))
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def signal_tree(pid: int, sig: int) -> None:
    for p in process_tree(pid):
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def window_order(systems: list[str], rnd: int, level: int) -> list[str]:
    """The systems' order in one (round, level): rotated by round + level, and reversed in odd
    rounds, so that a system runs right after another as often as right before it, give or take
    one, over four rounds (a plain rotation kept `adaptive` right after `ar` in every round at 32
    requests, where it made 0.84-0.92x `ar`'s tokens/s in the same mode)."""
    k = (rnd + level) % len(systems)
    order = systems[k:] + systems[:k]
    return order[::-1] if rnd % 2 else order


def policy_state(url: str) -> dict:
    """The stack's policy: its mode, switch count and last switch (`GET /v1/nld/policy`), and its
    switches so far by "from->to (reason)" (the gateway's `nld_policy_switches_total`)."""
    snap = json.load(urllib.request.urlopen(f"{url}/v1/nld/policy", timeout=10))
    page = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    return {"mode": snap.get("mode"), "switches": snap.get("switches"), "last_switch": snap.get("last_switch"),
            "by_kind": switch_counts(page)}


def switch_counts(page: str) -> dict[str, float]:
    """`nld_policy_switches_total` of a Prometheus text page, by "from->to (reason)"."""
    out: dict[str, float] = {}
    for labels, value in samples(page, "nld_policy_switches_total"):
        key = f"{labels['from']}->{labels['to']} ({labels['reason']})"
        out[key] = out.get(key, 0.0) + value
    return out


def switches_during(before: dict, after: dict) -> dict:
    """`policy_state` after a run, with the switches made during it: `switched` (a count) and
    `by_kind` (only the kinds that happened)."""
    kinds = {k: n - before["by_kind"].get(k, 0.0) for k, n in after["by_kind"].items()}
    return {**after, "by_kind": {k: n for k, n in kinds.items() if n},
            "switched": after["switches"] - before["switches"]}


METRICS_LAG_S = 3.0  # a replica metric reaches Ray's page within ~2 s (`up`'s --metrics-report-interval-ms 2000)


def engine_inter_token(metrics_url: str) -> tuple[float, float]:
    """(sum of seconds, count) of every replica's `nld_replica_inter_token_latency_seconds`: each
    finished request's (last token - first token) / (tokens - 1), timed in the engine process."""
    return inter_token_totals(urllib.request.urlopen(metrics_url, timeout=10).read().decode())


def inter_token_totals(text: str) -> tuple[float, float]:
    """`engine_inter_token` from a Prometheus text page: the histogram's sum and count, summed over
    its label sets (replicas, modes)."""
    name = "ray_nld_replica_inter_token_latency_seconds"
    return (sum(v for _, v in samples(text, name + "_sum")), sum(v for _, v in samples(text, name + "_count")))


@contextmanager
def thawed(pid: int):
    """The process tree of `pid` runs inside the block and is frozen again after it, whatever happens."""
    signal_tree(pid, signal.SIGCONT)
    try:
        yield
    finally:
        signal_tree(pid, signal.SIGSTOP)


def thaw_and_stop(servers) -> None:
    """Stop every server, each thawed first (a frozen process tree cannot handle its SIGINT)."""
    for server in servers:
        signal_tree(server.proc.pid, signal.SIGCONT)
        server.stop()


def paired_ratios(rows: list[dict], levels: list[int]) -> dict:
    """Per level, the median over rounds of each round's own ratio (neighbouring windows)."""
    by = {(r["system"], r["concurrency"], r["stream"], r["round"]): r["tokens_per_s"] for r in rows}
    rounds = sorted({r["round"] for r in rows})
    out: dict = {}
    for c in levels:
        row = {}
        for num, den in (("ar", "vllm"), ("self_spec", "vllm"), ("adaptive", "vllm"), ("ar", "bare"),
                         ("ar", "bare_1t"), ("ar", "bare_split"), ("adaptive", "ar")):
            vals = [by[num, c, False, k] / by[den, c, False, k] for k in rounds
                    if by.get((num, c, False, k)) and by.get((den, c, False, k))]
            if vals:
                row[f"{num}/{den}"] = spread(vals)
        out[c] = row
    print_ratios("non-streaming tokens/s", out, levels)  # nothing printed without pairs (e.g. --stream sse)
    return out


def spread(vals: list[float]) -> dict:
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "rounds": len(vals)}


def print_ratios(what: str, out: dict, levels: list[int]) -> None:
    """One table of per-round ratios (`out[level][name]`: `spread`), when there is any."""
    names = sorted({k for row in out.values() for k in row})
    if not names:
        return
    print(f"\nper-round ratios, {what}: median (min-max) over rounds")
    print(f"{'conc':>5} " + " ".join(f"{n:>20}" for n in names))
    for c in levels:
        cells = ["-" if x is None else "{median:.2f} ({min:.2f}-{max:.2f})".format(**x)
                 for x in (out[c].get(n) for n in names)]
        print(f"{c:>5} " + " ".join(f"{x:>20}" for x in cells))


def itl_over_step(rows: list[dict], levels: list[int]) -> dict:
    """Per level, streamed `ar` ITL p50 over each bare system's step p50, divided within each round
    (neighbouring windows), then the median (min-max) over rounds; `vllm/...` likewise for vLLM's ITL."""
    itl = {(r["system"], r["concurrency"], r["round"]): r.get("itl_p50_s") for r in rows if r["stream"]}
    step = {(r["system"], r["concurrency"], r["round"]): r.get("step_p50_s") for r in rows
            if r["system"] in BARES}
    rounds = sorted({r["round"] for r in rows})
    out: dict = {}
    for c in levels:
        row = {}
        for num in ("ar", "vllm"):
            for den in BARES:
                vals = [itl[num, c, k] / step[den, c, k] for k in rounds
                        if itl.get((num, c, k)) and step.get((den, c, k))]
                if vals:
                    row[f"{num}/{den}"] = spread(vals)
        out[c] = row
    print_ratios("streamed ITL p50 / bare step p50", out, levels)
    return out


def bare_systems(model: str, args, systems: list[str]) -> dict:
    """The bare engines named in `systems`, each in its own process (loaded once)."""
    make = {"bare": lambda: BareServer(model, args), "bare_1t": lambda: BareServer(model, args, threads=1),
            "bare_split": lambda: BareSplit(model, args)}
    return {name: make[name]() for name in BARES if name in systems}


def main(argv=None) -> None:
    p = peer_arguments(__doc__.splitlines()[0], policy=ROOT / "policies" / "presets" / "adaptive_cpu.yaml",
                       policy_help="the stack's policy, used by `adaptive` (auto) requests", seconds=6.0, port=8400,
                       out=ROOT / "benchmarks" / "results" / "peer_rotate.json",
                       rounds=4)  # window_order balances each system's neighbours over four rounds
    args = p.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    systems = args.systems.split(",")
    unknown = [s for s in systems if s != "vllm" and s not in STACK_VARIANTS and s not in BARES]
    if unknown:
        p.error(f"unknown systems {unknown}: choose from vllm, {', '.join(STACK_VARIANTS)}, {', '.join(BARES)}")
    args.settle_seconds = window_settle(args, systems)  # before BareServer, which passes it on
    streams = {"both": [False, True], "json": [False], "sse": [True]}[args.stream]
    work = ROOT / ".cache" / "peer_rotate_run"
    work.mkdir(parents=True, exist_ok=True)
    model = Path(args.model)
    prompts = heldout_prompts(model / "split.json", model, 8, 64)
    args.prompts_file = work / "prompts.json"
    args.prompts_file.write_text(json.dumps(prompts))
    vllm_port, stack_port = args.port, args.port + 10
    metrics_url = f"http://127.0.0.1:{stack_port + 2}/metrics"  # the stack's Ray metrics (start_stack)
    policy = work / "policy.yaml"
    policy.write_text(args.policy.read_text())
    servers, urls = {}, {}
    try:
        if "vllm" in systems:
            servers["vllm"] = start_vllm(ensure_vllm_venv(), str(model), vllm_port, work)
            urls["vllm"] = f"http://127.0.0.1:{vllm_port}"
        if set(systems) & set(STACK_VARIANTS):
            servers["stack"] = start_stack(str(model), stack_port, policy, work, "stack", args.torch_threads,
                                           args.stack_options)
            urls.update({s: f"http://127.0.0.1:{stack_port}" for s in STACK_VARIANTS})
        for name, server in servers.items():  # one at a time: the other is frozen while it loads
            print(f"{server.name} ready in {server.wait_ready():.0f} s", flush=True)
            signal_tree(server.proc.pid, signal.SIGSTOP)
        bares = bare_systems(str(model), args, systems)
        identity = None
        if "vllm" in servers:
            with thawed(servers["vllm"].proc.pid):
                identity = check_identity(urls["vllm"], str(model), prompts, args.max_tokens)
            print(f"identity: {identity}", flush=True)
        warm = argparse.Namespace(**{**vars(args), "seconds": 3, "settle_seconds": 0})
        for name, server in servers.items():  # unmeasured: a server's first requests after its freeze
            with thawed(server.proc.pid):  # (Serve's controller catching up) stay out of round 0
                run_load(urls["vllm" if name == "vllm" else "ar"], args.prompts_file, 4, False,
                         {} if name == "vllm" else STACK_VARIANTS["ar"], warm)
        rows: list[dict] = []
        for rnd in range(args.rounds):
            for i, c in enumerate(levels):
                for system in window_order(systems, rnd, i):
                    if system in bares:
                        r = bares[system].measure(c)
                        rows.append({**r, "system": system, "concurrency": c, "stream": False, "round": rnd})
                        print(f"round {rnd} {system} c={c}: {r['tokens_per_s']:.0f} tok/s step "
                              f"{1000 * r['step_p50_s']:.2f} ms", flush=True)
                        continue
                    server = servers["vllm" if system == "vllm" else "stack"]
                    with thawed(server.proc.pid):
                        for stream in streams:
                            engine_side = stream and system != "vllm"
                            before = engine_inter_token(metrics_url) if engine_side else None
                            policy_before = policy_state(urls[system]) if system == "adaptive" else None
                            r = run_load(urls[system], args.prompts_file, c, stream, STACK_VARIANTS.get(system, {}),
                                         args)
                            if policy_before is not None:  # switches during the run (settle included)
                                r["policy"] = switches_during(policy_before, policy_state(urls[system]))
                            if before is not None:
                                time.sleep(METRICS_LAG_S)  # the last requests' histogram records reach the page
                                after = engine_inter_token(metrics_url)
                                done = after[1] - before[1]
                                r["engine_itl_mean_s"] = (after[0] - before[0]) / done if done > 0 else None
                            rows.append({**r, "system": system, "concurrency": c, "stream": stream, "round": rnd})
                            print(f"round {rnd} {system} c={c} {'sse ' if stream else 'json'}: "
                                  f"{r['tokens_per_s']:.0f} tok/s p50 {r['latency_p50_s'] or 0:.3f} s itl "
                                  f"{1000 * (r['itl_p50_s'] or 0):.1f} ms errors {r['errors_total']}"
                                  + (f" modes {r['modes']}" if r.get("modes") else "")
                                  + (f" switches {r['policy']['by_kind'] or 0}" if r.get("policy") else "")
                                  + (f" tpot {1000 * r['tpot_p50_s']:.1f} ms engine-side {1000 * r['engine_itl_mean_s']:.1f}"
                                     f" ms" if r.get("engine_itl_mean_s") and r.get("tpot_p50_s") else ""), flush=True)
        merged = median_rows(rows)
        ratios = print_tables(merged, levels, systems)
        paired = paired_ratios(rows, levels)
        itl_ratios = itl_over_step(rows, levels)
        args.out.write_text(json.dumps({"model": str(model), "levels": levels, "rounds": args.rounds,
                                        "seconds": args.seconds, "max_tokens": args.max_tokens, "identity": identity,
                                        "policy": policy.read_text(), "rows": merged, "ratios": ratios,
                                        "paired_ratios": paired, "itl_over_step": itl_ratios,
                                        "round_rows": rows}, indent=1))
        plot(merged, levels, systems, args.out.with_suffix(".png"))
        print(f"saved {args.out} and {args.out.with_suffix('.png')}")
        for bare in bares.values():
            bare.stop()
    finally:
        thaw_and_stop(servers.values())


if __name__ == "__main__":
    main()
