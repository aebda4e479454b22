"""Greedy agreement of self-speculation with AR, per dtype, on the embedded model's held-out prompts.

Greedy self-spec accepts a draft only when it equals the argmax of the causal verify logits, so
its output is AR greedy's exactly when those logits are the ones AR computes. They are computed
differently: AR runs one token per forward, the verify pass a block of tokens in one forward
(other matmul shapes, other summation orders). In float32 the rounding differences are far
below the gaps between the top logits and the outputs are identical; in bfloat16 (8 bits of
mantissa) a near-tie can flip, after which the two outputs continue from different prefixes.
This measures, per dtype and self-spec setting, over the held-out prompts (the start of each
held-out file, as `engine_modes.py --heldout`; every generation runs to --max-new-tokens with
EOS ignored): the tokens before the first difference from AR (all of them when none), and the
share of prompts whose whole output is identical; and, where they part, the gap between the two
best float32 logits of AR's next token there (a near-tie shows the split is rounding, not a
bug). Results: a table and --out (JSON).

    python benchmarks/bf16_agreement.py [--model models/nld-tiny-pystdlib] [--prompts 30]
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

from benchmarks.engine_modes import heldout_prompts  # noqa: E402
from replicas.engine import DecodeParams, Engine  # noqa: E402
from replicas.engine.sequence import ForwardPass  # noqa: E402


def first_difference(a: list[int], b: list[int]) -> int:
    """Tokens before the first position where `a` and `b` differ (the shorter length if none)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def agreement(reference: list[list[int]], outputs: list[list[int]]) -> dict:
    """Per-prompt tokens to the first difference, and the share of identical outputs."""
    firsts = [first_difference(r, o) for r, o in zip(reference, outputs)]
    identical = [r == o for r, o in zip(reference, outputs)]
    diverged = [f for f, same in zip(firsts, identical) if not same]
    return {
        "prompts": len(reference),
        "identical": sum(identical),
        "identical_share": sum(identical) / len(reference),
        "first_difference": firsts,
        "first_difference_median_of_diverged": statistics.median(diverged) if diverged else None,
        "first_difference_min": min(firsts),
    }


def float32_gaps(model: Path, prompts: list[list[int]], ar: list[list[int]], firsts: list[int]) -> dict[int, float]:
    """For each prompt whose outputs part at token f: the gap between the two largest float32
    logits of the next token after the prompt and AR's first f tokens."""
    engine = Engine.from_pretrained(model, device="cpu", dtype="float32")
    gaps = {}
    for i, (prompt, out, f) in enumerate(zip(prompts, ar, firsts)):
        if f < len(out):
            ctx = prompt + out[:f]
            logits = engine.runner_for(len(ctx) + 1).run([(0, ForwardPass(tokens=ctx, start=0, causal=True))])[0][-1]
            top = logits.float().topk(2).values
            gaps[i] = round(float(top[0] - top[1]), 5)
    return gaps


def run(model: Path, prompts: list[list[int]], dtype: str, settings: list[dict], max_new: int) -> list[dict]:
    engine = Engine.from_pretrained(model, device="cpu", dtype=dtype)
    greedy = DecodeParams(mode="ar", max_new_tokens=max_new, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    ar = [engine.generate(p, greedy).token_ids for p in prompts]
    rows = []
    for s in settings:
        params = greedy.with_(mode="self_spec", block_length=s["block_length"], draft_lora=s["draft_lora"])
        spec = [engine.generate(p, params).token_ids for p in prompts]
        row = {"dtype": dtype, "mode": "self_spec", **s, "max_new_tokens": max_new, **agreement(ar, spec)}
        row["float32_top2_gap_where_parted"] = float32_gaps(model, prompts, ar, row["first_difference"])
        rows.append(row)
        print(f"{dtype:<9} block {s['block_length']:>3} lora {str(s['draft_lora']):<5} identical "
              f"{row['identical']:>3}/{row['prompts']:<3} ({100 * row['identical_share']:5.1f}%)  first difference: "
              f"min {row['first_difference_min']:>4}, median of the diverged "
              f"{row['first_difference_median_of_diverged'] if row['first_difference_median_of_diverged'] is not None else '-':>5}"
              f"  [{time.perf_counter() - t0:.0f} s]", flush=True)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=ROOT / "models/nld-tiny-pystdlib")
    p.add_argument("--heldout", type=Path, default=None, help="split JSON (default: <model>/split.json)")
    p.add_argument("--prompts", type=int, default=30)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--block-lengths", default="32,8")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/bf16_agreement.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    prompts = heldout_prompts(args.heldout or args.model / "split.json", args.model, args.prompts, args.prompt_len)
    settings = [{"block_length": int(b), "draft_lora": lora} for b in args.block_lengths.split(",") for lora in
                (True, False)]
    rows = []
    for dtype in args.dtypes.split(","):
        rows += run(args.model, prompts, dtype, settings, args.max_new_tokens)
    summary = {}
    for dtype in args.dtypes.split(","):
        mine = [r for r in rows if r["dtype"] == dtype]
        # every output has max_new_tokens tokens (EOS ignored): a first difference short of it is a divergence
        diverged = [f for r in mine for f in r["first_difference"] if f < r["max_new_tokens"]]
        summary[dtype] = {"identical": sum(r["identical"] for r in mine), "generations": sum(r["prompts"] for r in mine),
                          "first_difference_median_of_diverged": statistics.median(diverged) if diverged else None}
    result = {"model": str(args.model.relative_to(ROOT) if args.model.is_relative_to(ROOT) else args.model),
              "device": "cpu", "torch": torch.__version__, "prompts": len(prompts), "prompt_len": args.prompt_len,
              "max_new_tokens": args.max_new_tokens, "summary": summary, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
