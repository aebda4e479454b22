"""Engine v2 benchmarks (issue 13): paged KV capacity, prefix-cache TTFT, decode ITL under long
prompts. Each compares the current engine with a baseline engine (the contiguous cache and the
prefill-first scheduler, as of git `--baseline`, see `baseline.py`) in the same process.

- capacity: sequences of up to `--context` (4k) tokens in a fixed KV budget (`--budget` token
  columns: the baseline gets budget / context slots, the current engine the same memory as
  blocks of 16 and up to 128 slots). A burst of `--requests` AR requests with prompts of
  200-600 tokens and `--new-tokens` outputs; reports the sequences decoded at once (mean over
  the steps while requests wait, and the maximum), tokens per second and per CPU-second, and
  preemptions.
- ttft: requests sharing a `--system`-token system prompt plus 16-48 tokens of their own, one
  at a time, the engines taking turns (current with prefix caching on, current with it off, the
  baseline); TTFT = submit to first token. Also a burst of 8 such requests on a warm cache.
- itl: 8 AR requests decode while `--long`-token prompts arrive every `--every` decode steps;
  ITL = the time between a decode request's consecutive tokens, on the wall clock and in this
  process's CPU time (a shared machine's other work shows in the first only). Median, p90, p99
  and max, with and without the arrivals; the current engine runs with `--budget-tokens` tokens
  per step.
Not timed tests: numbers depend on the machine (docs/PERFORMANCE.md records a run).

    python benchmarks/engine_v2.py capacity|ttft|itl --model models/nld-tiny-pystdlib --baseline 3436d04
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import replicas.engine as current  # noqa: E402
from baseline import load_engine  # noqa: E402


def random_tokens(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(101, vocab) for _ in range(n)]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


# ---- capacity --------------------------------------------------------------------------------

def capacity(args) -> dict:
    base = load_engine(args.baseline)
    rng = random.Random(0)
    vocab = current.Engine.from_pretrained(args.model).config.vocab_size
    jobs = [(random_tokens(rng, rng.randint(200, 600), vocab), args.new_tokens) for _ in range(args.requests)]
    slots = args.budget // args.context
    engines = {
        "baseline": base.BatchEngine(base.Engine.from_pretrained(args.model), base.EngineConfig(
            max_batch_size=slots, max_seq_len=args.context, max_waiting=args.requests)),
        "current": current.BatchEngine(current.Engine.from_pretrained(args.model), current.EngineConfig(
            max_batch_size=128, max_seq_len=args.context, max_waiting=args.requests, kv_block_size=16,
            num_kv_blocks=args.budget // 16)),
    }
    packages = {"baseline": base, "current": current}
    out = {"budget_tokens": args.budget, "context": args.context, "requests": args.requests,
           "new_tokens": args.new_tokens, "prompt_tokens": "200-600"}
    for name, be in engines.items():
        params = packages[name].DecodeParams(mode="ar", max_new_tokens=args.new_tokens, ignore_eos=True)
        for prompt, _ in jobs:
            be.submit(prompt, params)
        running, tokens, t0, cpu0 = [], 0, time.perf_counter(), time.process_time()
        while be.has_work():
            saturated = be.stats_snapshot()["waiting"] > 0
            tokens += sum(len(c.token_ids) for c in be.step())
            if saturated:
                running.append(be.stats_snapshot()["running"])
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
        snap = be.stats_snapshot()
        out[name] = {"kv_cache_bytes": be.cache.nbytes, "mean_running_while_saturated": statistics.mean(running),
                     "max_running": max(running), "tokens_per_s": tokens / seconds, "seconds": seconds,
                     "tokens_per_cpu_s": tokens / cpu_seconds, "cpu_seconds": cpu_seconds,
                     "preemptions": snap.get("preemptions", 0), "slots": be.config.max_batch_size}
        print(name, json.dumps(out[name]), flush=True)
    out["concurrency_ratio"] = (out["current"]["mean_running_while_saturated"]
                                / out["baseline"]["mean_running_while_saturated"])
    out["throughput_ratio"] = out["current"]["tokens_per_s"] / out["baseline"]["tokens_per_s"]
    out["throughput_per_cpu_s_ratio"] = out["current"]["tokens_per_cpu_s"] / out["baseline"]["tokens_per_cpu_s"]
    return out


# ---- ttft ------------------------------------------------------------------------------------

def first_token_seconds(be, prompt, params) -> tuple[float, float]:
    """(wall, CPU) seconds from submit to the first token."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    rid = be.submit(prompt, params)
    ttft = None
    while be.has_work():
        for c in be.step():
            if c.request_id == rid and c.token_ids and ttft is None:
                ttft = time.perf_counter() - t0, time.process_time() - cpu0
    return ttft


def ttft(args) -> dict:
    base = load_engine(args.baseline)
    rng = random.Random(1)
    model = current.Engine.from_pretrained(args.model)
    system = random_tokens(rng, args.system, model.config.vocab_size)
    prompts = [system + random_tokens(rng, rng.randint(16, 48), model.config.vocab_size)
               for _ in range(args.requests)]
    max_len = args.system + 48 + 8 + 64
    engines = {
        "prefix_cache_on": (current, current.BatchEngine(model, current.EngineConfig(max_batch_size=8, max_seq_len=max_len))),
        "prefix_cache_off": (current, current.BatchEngine(model, current.EngineConfig(
            max_batch_size=8, max_seq_len=max_len, enable_prefix_caching=False))),
        "baseline": (base, base.BatchEngine(base.Engine.from_pretrained(args.model),
                                            base.EngineConfig(max_batch_size=8, max_seq_len=max_len))),
    }
    times = {name: [] for name in engines}
    for prompt in prompts:  # one at a time, the engines taking turns
        for name, (pkg, be) in engines.items():
            times[name].append(first_token_seconds(be, prompt, pkg.DecodeParams(max_new_tokens=8, ignore_eos=True)))
    out = {"system_tokens": args.system, "requests": args.requests}
    for name, (pkg, be) in engines.items():
        warm = [wall for wall, _ in times[name][1:]]  # the first request fills the cache
        warm_cpu = [cpu for _, cpu in times[name][1:]]
        burst_prompts = [system + random_tokens(rng, 32, model.config.vocab_size) for _ in range(8)]
        params = pkg.DecodeParams(max_new_tokens=8, ignore_eos=True)
        t0, first = time.perf_counter(), {}
        ids = {be.submit(p, params): i for i, p in enumerate(burst_prompts)}
        while be.has_work():
            for c in be.step():
                if c.token_ids and c.request_id not in first:
                    first[c.request_id] = time.perf_counter() - t0
        out[name] = {"first_request_s": times[name][0][0], "median_ttft_s": statistics.median(warm),
                     "p90_ttft_s": percentile(warm, 0.9), "median_ttft_cpu_s": statistics.median(warm_cpu),
                     "burst8_mean_ttft_s": statistics.mean(first.values()),
                     "prefix_cache_hit_rate": be.stats_snapshot().get("prefix_cache_hit_rate")}
        print(name, json.dumps(out[name]), flush=True)
        assert len(ids) == 8
    out["speedup_on_vs_off"] = out["prefix_cache_off"]["median_ttft_s"] / out["prefix_cache_on"]["median_ttft_s"]
    out["cpu_speedup_on_vs_off"] = (out["prefix_cache_off"]["median_ttft_cpu_s"]
                                    / out["prefix_cache_on"]["median_ttft_cpu_s"])
    out["speedup_on_vs_baseline"] = out["baseline"]["median_ttft_s"] / out["prefix_cache_on"]["median_ttft_s"]
    out["burst_speedup_on_vs_off"] = (out["prefix_cache_off"]["burst8_mean_ttft_s"]
                                      / out["prefix_cache_on"]["burst8_mean_ttft_s"])
    return out


# ---- itl -------------------------------------------------------------------------------------

def spread(values: list[float]) -> dict:
    return {"median_s": statistics.median(values), "p90_s": percentile(values, 0.9),
            "p99_s": percentile(values, 0.99), "max_s": max(values)}


def decode_itl(pkg, be, *, rows: int, new_tokens: int, long_prompts: list[list[int]], every: int) -> dict:
    """ITLs of `rows` AR requests while `long_prompts` arrive, one every `every` decode steps: wall
    clock, and this process's CPU time (what the engine itself spent between two tokens)."""
    rng = random.Random(2)
    vocab = be.engine.config.vocab_size
    decode = {be.submit(random_tokens(rng, 32, vocab), pkg.DecodeParams(max_new_tokens=new_tokens, ignore_eos=True))
              for _ in range(rows)}
    last: dict[str, tuple[float, float]] = {}
    wall, cpu, long_ttft, pending, submitted = [], [], [], list(long_prompts), {}
    steps = 0
    while be.has_work() or pending:
        if pending and steps and steps % every == 0:
            submitted[be.submit(pending.pop(0), pkg.DecodeParams(max_new_tokens=1))] = time.perf_counter()
        chunks = be.step()
        now, now_cpu = time.perf_counter(), time.process_time()
        for c in chunks:
            if c.request_id in decode and c.token_ids:
                if c.request_id in last:
                    wall.append((now - last[c.request_id][0]) / len(c.token_ids))
                    cpu.append((now_cpu - last[c.request_id][1]) / len(c.token_ids))
                last[c.request_id] = now, now_cpu
            elif c.request_id in submitted and c.token_ids:
                long_ttft.append(now - submitted.pop(c.request_id))
        if all(rid in last for rid in decode):
            steps += 1
    return {"wall": spread(wall), "cpu": spread(cpu), "long_prompt_ttft_s": long_ttft, "intervals": len(wall)}


def itl(args) -> dict:
    base = load_engine(args.baseline)
    rng = random.Random(3)
    model = current.Engine.from_pretrained(args.model)
    longs = [random_tokens(rng, args.long, model.config.vocab_size) for _ in range(args.arrivals)]
    max_len = args.long + 64
    make = {
        "baseline": lambda: (base, base.BatchEngine(base.Engine.from_pretrained(args.model), base.EngineConfig(
            max_batch_size=16, max_seq_len=max_len, prefill_chunk=512))),
        "current": lambda: (current, current.BatchEngine(model, current.EngineConfig(
            max_batch_size=16, max_seq_len=max_len, prefill_chunk=512, max_num_batched_tokens=args.budget_tokens))),
    }
    out = {"long_prompt_tokens": args.long, "arrivals": args.arrivals, "every_decode_steps": args.every,
           "decode_rows": 8, "budget_tokens": args.budget_tokens, "rounds": args.rounds}
    new_tokens = args.every * (args.arrivals + 1)
    for rnd in range(args.rounds):  # the engines take turns
        for name in (("baseline", "current") if rnd % 2 == 0 else ("current", "baseline")):
            pkg, be = make[name]()
            quiet = decode_itl(pkg, be, rows=8, new_tokens=new_tokens, long_prompts=[], every=args.every)
            loaded = decode_itl(pkg, be, rows=8, new_tokens=new_tokens, long_prompts=longs, every=args.every)
            out.setdefault(f"{name}_runs", []).append({"without_arrivals": quiet, "with_long_prompts": loaded})
            print(name, rnd, json.dumps({k: loaded[k] for k in ("wall", "cpu")}), flush=True)
    for name in ("baseline", "current"):
        summary = {}
        for clock in ("wall", "cpu"):
            loaded = [r["with_long_prompts"][clock] for r in out[f"{name}_runs"]]
            quiet = [r["without_arrivals"][clock] for r in out[f"{name}_runs"]]
            summary[clock] = {
                "quiet_median_s": statistics.median(q["median_s"] for q in quiet),
                "quiet_p99_over_median": statistics.median(q["p99_s"] / q["median_s"] for q in quiet),
                "median_s": statistics.median(x["median_s"] for x in loaded),
                "p99_s": statistics.median(x["p99_s"] for x in loaded),
                "max_s": statistics.median(x["max_s"] for x in loaded),
                "p99_over_median": statistics.median(x["p99_s"] / x["median_s"] for x in loaded),
            }
        summary["long_prompt_ttft_s"] = statistics.median(
            t for r in out[f"{name}_runs"] for t in r["with_long_prompts"]["long_prompt_ttft_s"])
        out[name] = summary
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("which", choices=["capacity", "ttft", "itl"])
    p.add_argument("--model", default="models/nld-tiny-pystdlib")
    p.add_argument("--baseline", default="3436d04", help="git ref of the engine before v2")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--budget", type=int, default=8 * 4096, help="capacity: KV token columns")
    p.add_argument("--context", type=int, default=4096, help="capacity: max_seq_len")
    p.add_argument("--requests", type=int, default=0, help="capacity: 64; ttft: 12")
    p.add_argument("--new-tokens", type=int, default=256, help="capacity: output tokens per request")
    p.add_argument("--system", type=int, default=1000, help="ttft: system prompt tokens")
    p.add_argument("--long", type=int, default=2000, help="itl: long prompt tokens")
    p.add_argument("--arrivals", type=int, default=6, help="itl: long prompts")
    p.add_argument("--every", type=int, default=60, help="itl: decode steps between arrivals")
    p.add_argument("--budget-tokens", type=int, default=48, help="itl: max_num_batched_tokens of the current engine")
    p.add_argument("--rounds", type=int, default=3, help="itl: rounds")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.requests = args.requests or {"capacity": 64, "ttft": 12}.get(args.which, 0)
    result = {"capacity": capacity, "ttft": ttft, "itl": itl}[args.which](args)
    result.update(model=args.model, baseline_ref=args.baseline, threads=args.threads, date=time.strftime("%Y-%m-%d"))
    out = args.out or Path(f"benchmarks/results/engine_v2_{args.which}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, list)}, indent=2)[:3000])


if __name__ == "__main__":
    main()
