"""A/B of the whole stack under different `nld-gateway up` options, finely interleaved.

    python benchmarks/stack_ab.py --variant base= --variant one16="--parallel-min-tokens 16"
                                  [--systems ar,adaptive] [--levels 1,4,8,16] [--rounds 3]

Why: a serving or engine setting is kept only if it raises the stack's tokens/s, and on this VM
the speed drifts by up to 2x over minutes, so two settings are only comparable in neighbouring
windows. Every variant is one `nld-gateway up` stack (same model, policy and client), started
once and kept; for each round and level the variants run one after another in rotating order,
the others frozen (SIGSTOP to their process trees, `peer_rotate`'s method), and each variant's
tokens/s is divided by the first variant's in the same (round, level, system). A system is what
the requests ask for (`ar`, `self_spec`, `adaptive` = `auto` under the stack's policy). Same
client as the peer benchmarks (`loadgen.py`: held-out prompts, 64 tokens, greedy, `ignore_eos`,
non-streaming unless --stream); every failed request is counted. Prints per-round rows and the
median (min-max) of the per-round ratios; saves JSON. Two stacks of the same code have differed
by up to about 20% here (docs/PERFORMANCE.md, "Small steps on one thread"): give the baseline
twice under two names (`--variant base= --variant base2=`) to measure that floor in the same run.
Each system keeps its own settle (adaptive's is longer): ratios compare variants of one system,
never systems. Not in CI or `make bench` (minutes per round; run it for the setting at hand).
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.engine_modes import heldout_prompts  # noqa: E402
from benchmarks.peer_rotate import signal_tree, thaw_and_stop, thawed  # noqa: E402
from benchmarks.peer_vllm import STACK_VARIANTS, run_load, start_stack  # noqa: E402


def parse_variant(text: str) -> tuple[str, list[str]]:
    """`name=--flag value ...` -> (name, [up options]); `base=` is the stack as it ships."""
    name, sep, options = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"want NAME=OPTIONS (OPTIONS may be empty), got {text!r}")
    return name, shlex.split(options)


def warm_up(url: str, prompts: Path, warm: argparse.Namespace, tries: int = 10) -> None:
    """Unmeasured load until a window has no failed request: a stack frozen while the others
    started (tens of seconds) answers 503 until Serve's health checks see its replica again."""
    for _ in range(tries):
        if not run_load(url, prompts, 4, False, STACK_VARIANTS["ar"], warm)["errors_total"]:
            return
    raise RuntimeError(f"{url}: requests still fail after {tries} warm-up windows")


def ab_ratios(rows: list[dict], variants: list[str], systems: list[str], levels: list[int]) -> dict:
    """Per (system, level, variant), the median (min-max) over rounds of its tokens/s over the first
    variant's in the same round."""
    by = {(r["variant"], r["system"], r["concurrency"], r["round"]): r["tokens_per_s"] for r in rows}
    rounds = sorted({r["round"] for r in rows})
    base = variants[0]
    out: dict = {}
    for system in systems:
        for c in levels:
            for v in variants[1:]:
                vals = [by[v, system, c, k] / by[base, system, c, k] for k in rounds
                        if by.get((v, system, c, k)) and by.get((base, system, c, k))]
                if vals:
                    out[f"{system}/{c}/{v}"] = {"median": statistics.median(vals), "min": min(vals),
                                                "max": max(vals), "rounds": len(vals)}
    return out


def error_totals(rows: list[dict]) -> dict[str, int]:
    """Failed or non-200 requests per variant over every window, settle included (none dropped)."""
    out: dict[str, int] = {}
    for r in rows:
        out[r["variant"]] = out.get(r["variant"], 0) + sum(r["errors_total"].values())
    return out


def print_summary(rows: list[dict], ratios: dict, variants: list[str], systems: list[str], levels: list[int]) -> None:
    med = {}
    for r in rows:
        med.setdefault((r["variant"], r["system"], r["concurrency"]), []).append(r["tokens_per_s"])
    print(f"\ntokens/s, median over rounds; ratio = per-round variant / {variants[0]}, median (min-max)")
    print(f"{'system':>9} {'conc':>5} " + " ".join(f"{v:>12}" for v in variants)
          + "".join(f" {v + ' / ' + variants[0]:>22}" for v in variants[1:]))
    for system in systems:
        for c in levels:
            cells = [f"{statistics.median(med[(v, system, c)]):>12,.0f}" if (v, system, c) in med else f"{'-':>12}"
                     for v in variants]
            for v in variants[1:]:
                x = ratios.get(f"{system}/{c}/{v}")
                cells.append(f"{'-':>22}" if x is None else f"{'{median:.2f} ({min:.2f}-{max:.2f})'.format(**x):>22}")
            print(f"{system:>9} {c:>5} " + " ".join(cells))
    print("failed or non-200 requests, every window: "
          + ", ".join(f"{v} {n}" for v, n in error_totals(rows).items()))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", type=parse_variant, action="append", required=True,
                   help="NAME=UP_OPTIONS, at least two; the first is the baseline of the ratios")
    p.add_argument("--model", default="models/nld-tiny-pystdlib")
    p.add_argument("--policy", type=Path, default=ROOT / "policies" / "presets" / "adaptive.yaml")
    p.add_argument("--systems", default="ar", help=f"comma-separated, of {', '.join(STACK_VARIANTS)}")
    p.add_argument("--levels", default="1,4,8,16")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--stream", action="store_true", help="streamed requests (SSE) instead of non-streaming")
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--settle-seconds", type=float, default=2.0)
    p.add_argument("--adaptive-settle-seconds", type=float, default=8.0)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--port", type=int, default=8800, help="first stack's port; each next one 10 above")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "stack_ab.json")
    args = p.parse_args(argv)
    if len(args.variant) < 2 or len({n for n, _ in args.variant}) != len(args.variant):
        p.error("give at least two --variant, with distinct names")
    systems = args.systems.split(",")
    unknown = [s for s in systems if s not in STACK_VARIANTS]
    if unknown:
        p.error(f"unknown system(s) {unknown}: choose from {', '.join(STACK_VARIANTS)}")
    levels = [int(x) for x in args.levels.split(",")]
    variants = [n for n, _ in args.variant]
    work = ROOT / ".cache" / "stack_ab_run"
    work.mkdir(parents=True, exist_ok=True)
    model = Path(args.model)
    prompts = work / "prompts.json"
    prompts.write_text(json.dumps(heldout_prompts(model / "split.json", model, 8, 64)))
    servers: dict = {}
    try:
        for i, (name, options) in enumerate(args.variant):
            servers[name] = start_stack(str(model), args.port + 10 * i, args.policy, work, name, None, options)
            print(f"{name} ({' '.join(options) or 'as shipped'}) ready in {servers[name].wait_ready():.0f} s",
                  flush=True)
            signal_tree(servers[name].proc.pid, signal.SIGSTOP)
        url = {name: f"http://127.0.0.1:{args.port + 10 * i}" for i, name in enumerate(variants)}
        warm = argparse.Namespace(**{**vars(args), "seconds": 3, "settle_seconds": 0})
        for name in variants:  # unmeasured: a stack's first requests after its freeze
            with thawed(servers[name].proc.pid):
                warm_up(url[name], prompts, warm)
        rows: list[dict] = []
        for rnd in range(args.rounds):
            for i, c in enumerate(levels):
                k = (rnd + i) % len(variants)
                for name in variants[k:] + variants[:k]:
                    with thawed(servers[name].proc.pid):
                        for system in systems:
                            settle = args.adaptive_settle_seconds if system == "adaptive" else args.settle_seconds
                            level_args = argparse.Namespace(**{**vars(args), "settle_seconds": settle})
                            r = run_load(url[name], prompts, c, args.stream, STACK_VARIANTS[system], level_args)
                            rows.append({**r, "variant": name, "system": system, "concurrency": c, "round": rnd})
                            print(f"round {rnd} {name} {system} c={c}: {r['tokens_per_s']:.0f} tok/s "
                                  f"p50 {r['latency_p50_s'] or 0:.3f} s errors {r['errors_total']}"
                                  + (f" modes {r['modes']}" if r.get("modes") else ""), flush=True)
        ratios = ab_ratios(rows, variants, systems, levels)
        print_summary(rows, ratios, variants, systems, levels)
        args.out.write_text(json.dumps({"model": str(model), "variants": dict(args.variant), "systems": systems,
                                        "levels": levels, "rounds": args.rounds, "seconds": args.seconds,
                                        "stream": args.stream, "ratios": ratios, "errors": error_totals(rows),
                                        "round_rows": rows}, indent=1))
        print(f"saved {args.out}")
    finally:
        thaw_and_stop(servers.values())


if __name__ == "__main__":
    main()
