"""Do self-speculation and diffusion pay on a user's prompt? Timed single-request decoding of the
all-position held-out prompts (training/evaluate_positions.py), AR against the other modes,
interleaved over rounds.

    python benchmarks/positions_speed.py [--model models/nld-tiny-pystdlib] [--compare-lora DIR] [--rounds 3]

Every --every-th prompt of the 147-prompt all-position set (file start, after a def line,
mid-body, inside a class, after a comment, after an except; 8-200 tokens), 64 new tokens each,
greedy, one request at a time, the engine's torch threads as given. Configurations: ar;
self_spec at block 16 (the evaluation's) and 8 with the model's draft LoRA; block 16 without it;
diffusion block 16, tau 0.9, with and without the model's denoise adapter (`diffusion_lora/`,
when it has one); with --compare-lora, self_spec block 16 with that other adapter directory. Each round runs every
configuration over the whole prompt set, in an order that reverses every round, so the
machine's drift hits all alike; reported: tokens/s (median over rounds), TPF, time per forward,
and each configuration's tokens/s over ar's in the same round. Output: a table and JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from replicas.engine import DecodeParams, Engine  # noqa: E402
from training.evaluate_positions import heldout_prompt_set  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=ROOT / "models" / "nld-tiny-pystdlib")
    p.add_argument("--compare-lora", type=Path, default=None, help="another adapter directory, self_spec B16 with it")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--every", type=int, default=3, help="take every k-th prompt of the set")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "positions_speed.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    prompts = [x["prompt"] for x in heldout_prompt_set(args.model)][:: args.every]
    engines = {"model": Engine.from_pretrained(args.model, dtype="float32")}
    confs = [("ar", "model", DecodeParams(mode="ar")),
             ("self_spec B16", "model", DecodeParams(mode="self_spec", block_length=16, draft_lora=True)),
             ("self_spec B8", "model", DecodeParams(mode="self_spec", block_length=8, draft_lora=True)),
             ("self_spec B16 no LoRA", "model", DecodeParams(mode="self_spec", block_length=16, draft_lora=False))]
    diffusion = DecodeParams(mode="diffusion", block_length=16, threshold=0.9)
    if engines["model"].has_denoise_lora:
        confs += [("diffusion B16 adapter", "model", diffusion.with_(denoise_lora=True)),
                  ("diffusion B16 no adapter", "model", diffusion.with_(denoise_lora=False))]
    else:
        confs.append(("diffusion B16", "model", diffusion))
    if args.compare_lora:
        engines["other"] = Engine.from_pretrained(args.model, dtype="float32", lora=args.compare_lora)
        confs.append(("self_spec B16 other LoRA", "other", confs[1][2]))
    for engine in engines.values():  # warm-up, unmeasured
        engine.generate(prompts[0], DecodeParams(mode="self_spec", block_length=16, max_new_tokens=32))
    rows = []
    for rnd in range(args.rounds):
        for name, which, base in (confs if rnd % 2 == 0 else confs[::-1]):
            tokens = forwards = 0
            t0 = time.perf_counter()
            for prompt in prompts:
                out = engines[which].generate(prompt, base.with_(max_new_tokens=args.max_tokens, ignore_eos=True))
                tokens, forwards = tokens + len(out.token_ids), forwards + out.forward_passes
            seconds = time.perf_counter() - t0
            rows.append({"config": name, "round": rnd, "tokens_per_s": tokens / seconds, "tpf": tokens / forwards,
                         "ms_per_forward": 1e3 * seconds / forwards})
            print(f"round {rnd} {name:<26} {tokens / seconds:7.1f} tok/s  TPF {tokens / forwards:.2f}", flush=True)
    ar = {r["round"]: r["tokens_per_s"] for r in rows if r["config"] == "ar"}
    summary = []
    print(f"\n{len(prompts)} prompts, {args.max_tokens} new tokens, one request, {args.threads} threads; "
          f"medians of {args.rounds} rounds")
    print(f"{'configuration':<26} {'tok/s':>7} {'TPF':>5} {'ms/fwd':>7}  vs ar (per round)")
    for name, _, _ in confs:
        rs = [r for r in rows if r["config"] == name]
        ratios = [r["tokens_per_s"] / ar[r["round"]] for r in rs]
        s = {"config": name, "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs), "tpf": rs[0]["tpf"],
             "ms_per_forward": statistics.median(r["ms_per_forward"] for r in rs),
             "over_ar_per_round": ratios, "over_ar_median": statistics.median(ratios)}
        summary.append(s)
        print(f"{name:<26} {s['tokens_per_s']:7.1f} {s['tpf']:5.2f} {s['ms_per_forward']:7.2f}  "
              f"{s['over_ar_median']:.2f} ({', '.join(f'{x:.2f}' for x in ratios)})")
    result = {"model": str(args.model), "compare_lora": str(args.compare_lora) if args.compare_lora else None,
              "prompts": len(prompts), "max_tokens": args.max_tokens, "threads": args.threads, "summary": summary,
              "rows": rows}
    args.out.write_text(json.dumps(result, indent=1))
    print(f"saved {args.out}")
    return result


if __name__ == "__main__":
    main()
