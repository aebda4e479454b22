"""The crossover benchmark: fixed-mode closed-loop sweeps over concurrency on the batched engine.

For each mode and each concurrency C, C clients each keep one request in flight: when a
request finishes its client submits the next one before the next engine step (closed loop,
no think time). It reports total generated tokens/s and per-request latency (p50, p90) per
mode and concurrency, the concurrency at which AR overtakes self-speculation, and the
single-request engine's batch-1 self-spec speed for comparison. Output: a table, JSON and a
PNG plot.

With `--baseline REF` the same sweep also runs the engine as of git REF (see `baseline.py`) in
the same process: each (mode, concurrency) runs both engines back to back, in an order that
alternates, for `--rounds` rounds. The table shows the medians over rounds of tokens per
wall-clock second and per CPU-second of this process (on a shared machine the wall clock
carries other work's load; the CPU time is the engine's own cost), and the median over rounds of
each round's paired ratio (current / baseline, measured back to back).

    python benchmarks/concurrency.py --model DIR [--heldout DIR/split.json] [--levels 1,2,4,8,16,32,64]
    python benchmarks/concurrency.py --model DIR --heldout DIR/split.json --baseline 3436d04 --rounds 5 \
        --out benchmarks/results/concurrency_v2_compare.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_modes import heldout_prompts, random_prompts  # noqa: E402

import replicas.engine  # noqa: E402
from baseline import load_engine  # noqa: E402
from replicas.engine import BatchEngine, DecodeParams, Engine, EngineConfig  # noqa: E402


def closed_loop(be: BatchEngine, prompts, params: DecodeParams, clients: int, requests: int) -> dict:
    """Run `requests` requests with `clients` in flight at a time; return throughput and latency."""
    submitted = 0
    started: dict[str, float] = {}
    latencies: list[float] = []
    tokens = 0

    def submit():
        nonlocal submitted
        rid = be.submit(prompts[submitted % len(prompts)], params)
        started[rid] = time.perf_counter()
        submitted += 1

    t0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(min(clients, requests)):
        submit()
    while be.has_work():
        for chunk in be.step():
            tokens += len(chunk.token_ids)
            if chunk.finish_reason:
                latencies.append(time.perf_counter() - started.pop(chunk.request_id))
                if submitted < requests:
                    submit()
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    latencies.sort()
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "cpu_seconds": cpu_seconds,  # this process only: robust to other work on a shared machine
        "tokens_per_cpu_s": tokens / cpu_seconds,
        "latency_p50_s": statistics.median(latencies),
        "latency_p90_s": latencies[int(0.9 * (len(latencies) - 1))],
        "requests": len(latencies),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--heldout", type=Path)
    p.add_argument("--levels", default="1,2,4,8,16,32,64")
    p.add_argument("--modes", default="ar,self_spec,diffusion")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--block-length", type=int, default=None)
    p.add_argument("--requests-per-level", type=int, default=0, help="0: max(2 x concurrency, 8)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--baseline", help="git ref of an engine to compare with in the same run (interleaved)")
    p.add_argument("--rounds", type=int, default=1, help="with --baseline: rounds of the whole sweep")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/concurrency.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    levels = [int(x) for x in args.levels.split(",")]
    modes = args.modes.split(",")
    if args.baseline:
        return compare(args, levels, modes)
    engine = Engine.from_pretrained(args.model, device=args.device, dtype=args.dtype,
                                    max_block_length=args.block_length)
    prompts = (heldout_prompts(args.heldout, Path(args.model), 64, args.prompt_len) if args.heldout
               else random_prompts(engine, 64, args.prompt_len))
    params = DecodeParams(max_new_tokens=args.max_new_tokens, block_length=args.block_length, ignore_eos=True)
    max_seq = args.prompt_len + args.max_new_tokens + (args.block_length or engine.config.block_size) + 1
    config = EngineConfig(max_batch_size=max(levels), max_seq_len=max_seq, max_waiting=max(levels),
                          device=args.device, dtype=args.dtype)
    be = BatchEngine(engine, config)
    closed_loop(be, prompts, params.with_(mode="ar", max_new_tokens=4), 2, 2)  # warm-up

    single = params.with_(mode="self_spec")
    t0, toks = time.perf_counter(), 0
    for prompt in prompts[:4]:
        toks += len(engine.generate(prompt, single).token_ids)
    single_tps = toks / (time.perf_counter() - t0)

    rows = []
    print(f"model {args.model} | prompt {args.prompt_len} | max_new_tokens {args.max_new_tokens} | "
          f"{args.device} {args.dtype} | threads {torch.get_num_threads()}")
    print(f"{'mode':<10} {'conc':>5} {'tok/s':>9} {'p50 s':>8} {'p90 s':>8} {'requests':>8}")
    for mode in modes:
        for c in levels:
            n = args.requests_per_level or max(2 * c, 8)
            r = closed_loop(be, prompts, params.with_(mode=mode), c, n)
            r.update(mode=mode, concurrency=c)
            rows.append(r)
            print(f"{mode:<10} {c:>5} {r['tokens_per_s']:>9.1f} {r['latency_p50_s']:>8.3f} "
                  f"{r['latency_p90_s']:>8.3f} {r['requests']:>8}", flush=True)
    by = {(r["mode"], r["concurrency"]): r for r in rows}
    crossover = next((c for c in levels if ("ar", c) in by and ("self_spec", c) in by
                      and by["ar", c]["tokens_per_s"] > by["self_spec", c]["tokens_per_s"]), None)
    summary = {
        "ar_overtakes_self_spec_at": crossover,
        "ar_c32_over_c1": (by["ar", 32]["tokens_per_s"] / by["ar", 1]["tokens_per_s"]
                           if ("ar", 32) in by and ("ar", 1) in by else None),
        "self_spec_c1_tokens_per_s": by.get(("self_spec", 1), {}).get("tokens_per_s"),
        "single_engine_self_spec_tokens_per_s": single_tps,
    }
    print(json.dumps(summary, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "device": args.device, "dtype": args.dtype,
                                    "threads": torch.get_num_threads(), "prompt_len": args.prompt_len,
                                    "max_new_tokens": args.max_new_tokens, "rows": rows, "summary": summary},
                                   indent=2))
    plot(rows, modes, args.out.with_suffix(".png"))
    print(f"saved {args.out} and {args.out.with_suffix('.png')}")


def engine_for(module, args, levels):
    """A `BatchEngine` of `module` (the current engine package or a baseline's) for the sweep."""
    engine = module.Engine.from_pretrained(args.model, device=args.device, dtype=args.dtype,
                                           max_block_length=args.block_length)
    max_seq = args.prompt_len + args.max_new_tokens + (args.block_length or engine.config.block_size) + 1
    config = module.EngineConfig(max_batch_size=max(levels), max_seq_len=max_seq, max_waiting=max(levels),
                                 device=args.device, dtype=args.dtype)
    return module.BatchEngine(engine, config)


def compare(args, levels: list[int], modes: list[str]) -> None:
    """Baseline vs current, interleaved: per round, mode and level both engines run back to back."""
    packages = {"baseline": load_engine(args.baseline), "current": replicas.engine}
    engines = {name: engine_for(mod, args, levels) for name, mod in packages.items()}
    first = engines["current"].engine
    prompts = (heldout_prompts(args.heldout, Path(args.model), 64, args.prompt_len) if args.heldout
               else random_prompts(first, 64, args.prompt_len))
    for name, be in engines.items():  # warm-up
        closed_loop(be, prompts, packages[name].DecodeParams(mode="ar", max_new_tokens=4), 2, 2)
    rows = []
    print(f"model {args.model} | prompt {args.prompt_len} | max_new_tokens {args.max_new_tokens} | baseline "
          f"{args.baseline} | rounds {args.rounds} | threads {torch.get_num_threads()}")
    for rnd in range(args.rounds):
        for mode in modes:
            for i, c in enumerate(levels):
                names = ["baseline", "current"] if (rnd + i) % 2 == 0 else ["current", "baseline"]
                for name in names:
                    params = packages[name].DecodeParams(max_new_tokens=args.max_new_tokens, mode=mode,
                                                         block_length=args.block_length, ignore_eos=True)
                    r = closed_loop(engines[name], prompts, params, c, args.requests_per_level or max(2 * c, 8))
                    r.update(engine=name, round=rnd, mode=mode, concurrency=c)
                    rows.append(r)
                print(f"round {rnd} {mode:<10} c={c:<3} " + " ".join(
                    f"{r['engine']} {r['tokens_per_s']:.1f}" for r in rows[-2:]), flush=True)
    table = []
    keys = ("tokens_per_s", "tokens_per_cpu_s", "latency_p50_s")
    for mode in modes:
        for c in levels:
            runs = {name: [r for r in rows if (r["engine"], r["mode"], r["concurrency"]) == (name, mode, c)]
                    for name in engines}
            med = {name: {k: statistics.median(r[k] for r in runs[name]) for k in keys} for name in engines}
            paired = {k: statistics.median(cur[k] / base[k] for base, cur in zip(runs["baseline"], runs["current"]))
                      for k in ("tokens_per_s", "tokens_per_cpu_s")}
            table.append({"mode": mode, "concurrency": c, "baseline": med["baseline"], "current": med["current"],
                          "tokens_per_s_ratio": med["current"]["tokens_per_s"] / med["baseline"]["tokens_per_s"],
                          "tokens_per_cpu_s_ratio": med["current"]["tokens_per_cpu_s"]
                          / med["baseline"]["tokens_per_cpu_s"],
                          "paired_ratio_median": paired})
    print(f"{'mode':<10} {'conc':>5} {'base tok/s':>11} {'new tok/s':>10} {'ratio':>6} {'base tok/cpu-s':>15} "
          f"{'new tok/cpu-s':>14} {'ratio':>6} {'paired':>7}")
    for t in table:
        print(f"{t['mode']:<10} {t['concurrency']:>5} {t['baseline']['tokens_per_s']:>11.1f} "
              f"{t['current']['tokens_per_s']:>10.1f} {t['tokens_per_s_ratio']:>6.2f} "
              f"{t['baseline']['tokens_per_cpu_s']:>15.1f} {t['current']['tokens_per_cpu_s']:>14.1f} "
              f"{t['tokens_per_cpu_s_ratio']:>6.2f} {t['paired_ratio_median']['tokens_per_cpu_s']:>7.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "baseline": args.baseline,
                                    "baseline_sha": packages["baseline"].git_sha, "device": args.device,
                                    "dtype": args.dtype, "threads": torch.get_num_threads(),
                                    "prompt_len": args.prompt_len, "max_new_tokens": args.max_new_tokens,
                                    "rounds": args.rounds, "table": table, "rows": rows}, indent=2))
    print(f"saved {args.out}")


def plot(rows, modes, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for mode in modes:
        rs = [r for r in rows if r["mode"] == mode]
        a.plot([r["concurrency"] for r in rs], [r["tokens_per_s"] for r in rs], marker="o", label=mode)
        b.plot([r["concurrency"] for r in rs], [r["latency_p50_s"] for r in rs], marker="o", label=mode)
    for ax, label in ((a, "total tokens/s"), (b, "p50 request latency (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency (closed loop)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Fixed-mode sweeps on the batched engine")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
