"""Benchmark the single-request engine per decoding mode.

For each mode (and block length; self_spec for each algorithm: linear, two forwards per cycle,
and quadratic, one) it prints forward passes after prefill, tokens per forward,
tokens/s, and the engine's per-step overhead: the wall time of `Engine.generate` against the
time of the bare model forwards it made (the same inputs replayed through `NLDModel` alone,
so overhead = input building, sampling, acceptance and bookkeeping). Prompts are random token
ids, or with --heldout the start of held-out files (a split JSON written by the training
script; its tokenizer.json is the model's). Results go to stdout and --out (JSON).

    python benchmarks/engine_modes.py --model DIR [--heldout DIR/split.json] [--block-lengths 16,32]
        [--algorithms linear,quadratic] [--no-diffusion]
"""

from __future__ import annotations

import argparse
import json
import random
import sysconfig
import time
from pathlib import Path

import torch

from replicas.engine import DecodeParams, Engine
from replicas.engine.runner import ModelRunner


class RecordingRunner(ModelRunner):
    """A runner that keeps the inputs of every forward so they can be replayed bare."""

    log: list = []

    def run_with_greedy(self, items):  # what BatchEngine calls (run() goes through it too)
        RecordingRunner.log.append((self.cache, *self.build_inputs(items), items))
        return super().run_with_greedy(items)


def bare_seconds(engine: Engine, log: list) -> float:
    """Replay the recorded forwards through the model alone (plus the logits head)."""
    model = engine.model
    t0 = time.perf_counter()
    with torch.inference_mode():
        for cache, tokens, positions, attn, offsets, items in log:
            hidden = model(tokens, positions, cache, attn)[0]  # [N, hidden], packed
            rows = [hidden[o : o + len(p.tokens)] if p.all_logits else hidden[o + len(p.tokens) - 1 : o + len(p.tokens)]
                    for o, (_, p) in zip(offsets, items)]
            model.logits(torch.cat(rows))
    sync(engine)
    return time.perf_counter() - t0


def sync(engine: Engine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize()


def heldout_prompts(split_file: Path, model_dir: Path, n: int, length: int) -> list[list[int]]:
    from tokenizers import Tokenizer

    split = json.loads(split_file.read_text())
    files = split.get("heldout") or split.get("held_out") or split.get("test")
    root = Path(split.get("lib_dir") or split.get("root") or sysconfig.get_paths()["stdlib"])
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    prompts = []
    for rel in files:
        path = root / rel
        if not path.is_file():
            continue
        ids = tok.encode(path.read_text(errors="replace")).ids
        if len(ids) >= length:
            prompts.append(ids[:length])
        if len(prompts) == n:
            break
    if not prompts:
        raise SystemExit(f"no held-out file under {root} has {length} tokens")
    return prompts


def random_prompts(engine: Engine, n: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    vocab, mask = engine.config.vocab_size, engine.config.mask_token_id
    return [[t if t != mask else t + 1 for t in (rng.randrange(vocab) for _ in range(length))] for _ in range(n)]


def measure(engine: Engine, prompts, params: DecodeParams, repeats: int = 3) -> dict:
    """Each prompt: one generate (timed), then its forwards replayed bare (timed), interleaved
    so that machine noise hits both sides alike; the best of `repeats` rounds is kept."""
    tokens = passes = 0
    seconds = bare = 0.0
    outputs = []
    for prompt in prompts:
        best_engine = best_bare = float("inf")
        for _ in range(repeats):
            RecordingRunner.log = []
            sync(engine)
            t0 = time.perf_counter()
            out = engine.generate(prompt, params)
            sync(engine)
            best_engine = min(best_engine, time.perf_counter() - t0)
            best_bare = min(best_bare, bare_seconds(engine, RecordingRunner.log))
        seconds += best_engine
        bare += best_bare
        tokens += len(out.token_ids)
        passes += out.forward_passes
        outputs.append(out.token_ids)
    return {
        "mode": params.mode,
        "spec_algorithm": params.spec_algorithm if params.mode == "self_spec" else None,
        "block_length": params.block_length if params.mode != "ar" else None,
        "draft_lora": params.draft_lora,
        "denoise_lora": params.denoise_lora,
        "forward_passes": passes,
        "tokens": tokens,
        "tokens_per_forward": tokens / max(passes, 1),
        "tokens_per_s": tokens / seconds,
        "engine_s": seconds,
        "bare_forward_s": bare,
        "overhead_pct": 100.0 * (seconds - bare) / bare,
        "outputs": outputs,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--heldout", type=Path, help="split JSON whose held-out files give the prompts")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--block-lengths", default="", help="comma-separated; default: the config block_size")
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--algorithms", default="linear,quadratic", help="self_spec algorithms to run")
    p.add_argument("--no-diffusion", action="store_true", help="ar and self_spec rows only")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/engine_modes.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    blocks = [int(b) for b in args.block_lengths.split(",") if b]
    engine = Engine.from_pretrained(args.model, device=args.device, dtype=args.dtype,
                                    max_block_length=max(blocks) if blocks else None)
    engine.runner_cls = RecordingRunner
    blocks = blocks or [engine.config.block_size]
    prompts = (heldout_prompts(args.heldout, Path(args.model), args.prompts, args.prompt_len) if args.heldout
               else random_prompts(engine, args.prompts, args.prompt_len))
    base = DecodeParams(max_new_tokens=args.max_new_tokens, threshold=args.threshold)
    engine.generate(prompts[0], base.with_(max_new_tokens=4))  # warm-up
    runs = [base.with_(mode="ar")]
    algorithms = [a for a in args.algorithms.split(",") if a]
    for b in blocks:
        if not args.no_diffusion:
            runs.append(base.with_(mode="diffusion", block_length=b))
            if engine.has_denoise_lora:
                runs.append(base.with_(mode="diffusion", block_length=b, denoise_lora=False))
        for alg in algorithms:
            runs.append(base.with_(mode="self_spec", block_length=b, spec_algorithm=alg))
            if engine.has_lora:
                runs.append(base.with_(mode="self_spec", block_length=b, draft_lora=False, spec_algorithm=alg))
    rows = [measure(engine, prompts, params) for params in runs]
    ar_out = rows[0]["outputs"]
    print(f"model {args.model} | {len(prompts)} prompts x {args.prompt_len} tokens | max_new_tokens "
          f"{args.max_new_tokens} | threshold {args.threshold} | {args.device} {args.dtype}")
    print(f"{'mode':<10} {'alg':>9} {'block':>5} {'lora':>5} {'fwd':>6} {'tokens':>7} {'tok/fwd':>8} {'tok/s':>9} "
          f"{'overhead':>9} {'==ar':>5}")
    for r in rows:
        r["identical_to_ar"] = r["outputs"] == ar_out
        if r["mode"] == "self_spec":
            lora = "off" if r["draft_lora"] is False or not engine.has_lora else "on"
        elif r["mode"] == "diffusion" and engine.has_denoise_lora:  # the denoise adapter
            lora = "off" if r.get("denoise_lora") is False else "on"
        else:
            lora = "-"
        print(f"{r['mode']:<10} {r['spec_algorithm'] or '-':>9} {r['block_length'] or '-':>5} {lora:>5} {r['forward_passes']:>6} {r['tokens']:>7} "
              f"{r['tokens_per_forward']:>8.2f} {r['tokens_per_s']:>9.1f} {r['overhead_pct']:>8.1f}% "
              f"{'yes' if r['identical_to_ar'] else 'no':>5}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "model": str(args.model), "device": args.device, "dtype": args.dtype, "prompts": len(prompts),
        "prompt_len": args.prompt_len, "max_new_tokens": args.max_new_tokens, "threshold": args.threshold,
        "heldout": str(args.heldout) if args.heldout else None,
        "rows": [{k: v for k, v in r.items() if k != "outputs"} for r in rows],
    }, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
