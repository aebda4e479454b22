"""Where the full stack's tokens/s goes against the bare engine, read from the engine's own counters.

    python benchmarks/stack_vs_bare.py [--layout shared|pinned] [--cases json:16,json:32,sse:8,sse:32]
                                       [--rounds 3] [--seconds 8]

The stack makes tokens at the engine's rate: tokens per step x steps per second. Each window
reads the replica's `/stats` every 0.5 s while the client runs and takes the engine's counters
(forward passes, their summed time, generated tokens) over the client's measured window, so the
stack's ratio to the bare `BatchEngine` splits into three factors:

    stack / bare tokens/s  =  busy share  x  (bare step / in-stack step)  x  (tokens per step, stack / bare)

- busy share: the share of the window the engine spent inside `step()` (the rest: no request to
  run, or its loop's own messages in and out);
- in-stack step against the bare step: how much slower each step runs beside the serving
  processes (gateway, HAProxy, the replica process, Ray, the client), which take CPU from its threads;
- tokens per step: how full the batch is (requests between finishing and the next one arriving).

Streamed windows also give the client's ITL p50 against the bare step (the target) and against
the in-stack step (ITL equal to the in-stack step: the transport adds no wait per token).

Layouts:
- `shared` (the default deployment on this machine): the engine's torch threads are the node's
  CPUs and share them with every serving process and the client; the bare engine uses torch's
  default threads;
- `pinned`: the stack as `nld-gateway up --engine-cpus 0 --serving-cpus 1,...` runs it (the
  engine process bound to the first CPU with one torch thread, the gateway, Ray and the replicas' serving
  processes on the other CPUs), the client on those other CPUs too, and the bare engine with one
  thread on the first CPU. The serving path then has CPUs of its own, as on a GPU node, where the engine's
  arithmetic is not on the CPUs the serving processes use.

The stack is started once (`nld-gateway up`, requests fixed to `ar`) and the bare engine once in a
child process; per window they alternate, the stack frozen (SIGSTOP to its process tree,
`peer_rotate`'s method) while the bare engine runs. Closed-loop client `loadgen.py` (held-out
prompts, 64 tokens, greedy, `ignore_eos`); every failed request is counted. Prints per-round
rows and a table of medians over rounds; saves JSON. In `make bench` (both layouts), not in CI (minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.engine_modes import heldout_prompts  # noqa: E402
from benchmarks.bare_servers import BareServer  # noqa: E402
from benchmarks.peer_rotate import signal_tree, thawed  # noqa: E402
from benchmarks.peer_vllm import PY, start_stack  # noqa: E402


def parse_cases(text: str) -> list[tuple[str, int]]:
    """`json:16,sse:8` -> [("json", 16), ("sse", 8)]."""
    out = []
    for item in text.split(","):
        kind, _, c = item.partition(":")
        if kind not in ("json", "sse") or not c.isdigit() or int(c) < 1:
            raise argparse.ArgumentTypeError(f"bad case {item!r}: want json:N or sse:N")
        out.append((kind, int(c)))
    return out


def engine_window(before: dict, after: dict, wall: float) -> dict:
    """The engine's own view of one window, from two `/stats` snapshots `wall` seconds apart."""
    steps = after["step_seconds"]["count"] - before["step_seconds"]["count"]
    busy = after["step_seconds"]["sum"] - before["step_seconds"]["sum"]
    tokens = after["generated_tokens"] - before["generated_tokens"]
    return {"steps": steps, "step_mean_s": busy / steps if steps else None,
            "tokens_per_step": tokens / steps if steps else None, "busy_share": busy / wall,
            "engine_tokens_per_s": tokens / wall, "engine_window_s": wall}


class StatsPoller:
    """Reads the replica's `/stats` every `period_s` while the client runs, so the engine's counters
    can be taken over the client's measured window (its settle and tail left out)."""

    def __init__(self, url: str, period_s: float = 0.5) -> None:
        self.url, self.period_s = url, period_s
        self.snapshots: list[tuple[float, dict]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                t = time.monotonic()
                self.snapshots.append((t, client.get(self.url).json()))
                self._stop.wait(self.period_s)

    def __enter__(self) -> "StatsPoller":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def window(self, w0: float, w1: float) -> dict:
        """The engine's view between the first snapshot at or after `w0` and the last at or before `w1`."""
        inside = [(t, s) for t, s in self.snapshots if w0 <= t <= w1]
        if len(inside) < 2:
            raise RuntimeError(f"fewer than two /stats snapshots inside the window ({len(self.snapshots)} taken)")
        (t0, first), (t1, last) = inside[0], inside[-1]
        return engine_window(first, last, t1 - t0)


def run_client(url: str, prompts: Path, c: int, stream: bool, args, prefix: tuple[str, ...]) -> dict:
    cmd = [*prefix, PY, str(ROOT / "benchmarks" / "loadgen.py"), "--url", url, "--model", "nld", "--prompts",
           str(prompts), "--concurrency", str(c), "--seconds", str(args.seconds), "--settle-seconds",
           str(args.settle_seconds), "--tail-seconds", "1", "--max-tokens", str(args.max_tokens),
           "--extra-body", json.dumps({"decoding_mode": "ar"})]
    if stream:
        cmd.append("--stream")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def factors(row: dict) -> dict:
    """The ratios of one round's neighbouring windows."""
    s, b = row["stack"], row["bare"]
    out = {"tokens_per_s": s["tokens_per_s"] / b["tokens_per_s"], "busy_share": s["busy_share"] / b["busy_share"],
           "step": s["step_mean_s"] / b["step_mean_s"], "tokens_per_step": s["tokens_per_step"] / b["tokens_per_step"]}
    if row["kind"] == "sse" and s.get("itl_p50_s"):
        out["itl_over_bare_step"] = s["itl_p50_s"] / b["step_p50_s"]
        out["itl_over_stack_step"] = s["itl_p50_s"] / s["step_mean_s"]
    return out


def summarise(rows: list[dict], cases: list[tuple[str, int]]) -> list[dict]:
    names = ("tokens_per_s", "busy_share", "step", "tokens_per_step", "itl_over_bare_step", "itl_over_stack_step")
    print("\nmedians over rounds (min-max), stack over bare: tokens/s ~ busy share / step x tokens per step "
          "(step: in-stack step over bare step)")
    print(f"{'case':>8} " + " ".join(f"{n:>22}" for n in names) + f" {'stack step ms':>14} {'bare step ms':>13}")
    table = []
    for kind, c in cases:
        rs = [r for r in rows if r["kind"] == kind and r["concurrency"] == c]
        if not rs:
            continue
        f = [factors(r) for r in rs]
        cells, entry = [], {"kind": kind, "concurrency": c, "rounds": len(rs),
                            "errors": sum(sum(r["stack"]["errors_total"].values()) for r in rs)}
        for n in names:
            vals = [x[n] for x in f if n in x]
            if vals:
                entry[n] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
                cells.append("{median:.3f} ({min:.2f}-{max:.2f})".format(**entry[n]))
            else:
                cells.append("-")
        entry["stack_step_ms"] = 1000 * statistics.median(r["stack"]["step_mean_s"] for r in rs)
        entry["bare_step_ms"] = 1000 * statistics.median(r["bare"]["step_mean_s"] for r in rs)
        table.append(entry)
        print(f"{kind + ':' + str(c):>8} " + " ".join(f"{x:>22}" for x in cells)
              + f" {entry['stack_step_ms']:>14.2f} {entry['bare_step_ms']:>13.2f}")
    print(f"errors (failed or non-200 requests, every window): {sum(e['errors'] for e in table)}")
    return table


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/nld-tiny-pystdlib")
    p.add_argument("--layout", choices=("shared", "pinned"), default="shared")
    p.add_argument("--cases", type=parse_cases, default=parse_cases("json:16,json:32,sse:8,sse:32"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--settle-seconds", type=float, default=2.0)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--port", type=int, default=8700)
    p.add_argument("--out", type=Path, default=None, help="default benchmarks/results/stack_vs_bare_<layout>.json")
    args = p.parse_args(argv)
    cpus = sorted(os.sched_getaffinity(0))
    ncpu = len(cpus)
    if args.layout == "pinned" and ncpu < 2:
        p.error("--layout pinned needs at least 2 CPUs")
    pinned = args.layout == "pinned"
    args.torch_threads = 1 if pinned else None  # the bare engine's; the stack's follow --engine-cpus
    engine_cpu, serving_cpus = str(cpus[0]), ",".join(str(c) for c in cpus[1:])
    engine_prefix = ("taskset", "-c", engine_cpu) if pinned else ()
    client_prefix = ("taskset", "-c", serving_cpus) if pinned else ()
    layout_flags = ["--engine-cpus", engine_cpu, "--serving-cpus", serving_cpus] if pinned else []
    out_path = args.out or ROOT / "benchmarks" / "results" / f"stack_vs_bare_{args.layout}.json"
    work = ROOT / ".cache" / "stack_vs_bare_run"
    work.mkdir(parents=True, exist_ok=True)
    model = Path(args.model)
    args.prompts_file = work / "prompts.json"
    args.prompts_file.write_text(json.dumps(heldout_prompts(model / "split.json", model, 8, 64)))
    url, stats_url = f"http://127.0.0.1:{args.port}", f"http://127.0.0.1:{args.port + 1}/stats"
    bare = BareServer(str(model), args, prefix=engine_prefix)
    # one replica: its /stats are the counters of the one engine compared with the bare one
    stack = start_stack(str(model), args.port, None, work, "stack", None, extra=["--replicas", "1", *layout_flags])
    rows: list[dict] = []
    try:
        stack.wait_ready()
        run_client(url, args.prompts_file, 4, False, args, client_prefix)  # warm-up, unmeasured
        signal_tree(stack.proc.pid, signal.SIGSTOP)
        for rnd in range(args.rounds):
            for kind, c in args.cases:
                with thawed(stack.proc.pid):
                    time.sleep(1.0)
                    with StatsPoller(stats_url) as poller:
                        client = run_client(url, args.prompts_file, c, kind == "sse", args, client_prefix)
                client.pop("latency_by_prompt", None)
                row = {"round": rnd, "kind": kind, "concurrency": c,
                       "stack": {**client, **poller.window(*client["window_monotonic_s"])}, "bare": bare.measure(c)}
                rows.append(row)
                f = factors(row)
                print(f"round {rnd} {kind}:{c:<3} stack {row['stack']['tokens_per_s']:7.0f} tok/s, bare "
                      f"{row['bare']['tokens_per_s']:7.0f} | " + " ".join(f"{k} {v:.3f}" for k, v in f.items()),
                      flush=True)
    finally:
        signal_tree(stack.proc.pid, signal.SIGCONT)
        stack.stop()
        bare.stop()
    table = summarise(rows, args.cases)
    out_path.write_text(json.dumps({"layout": args.layout, "model": str(model), "cpus": ncpu, "seconds": args.seconds,
                                    "rounds": args.rounds, "summary": table, "rows": rows}, indent=1))
    print(f"saved {out_path}")


if __name__ == "__main__":
    main()
