"""Measure the tiny model's decoding modes on held-out files: tokens per forward (TPF) per mode
and block length, LoRA on/off, and whether greedy self-speculation reproduces greedy AR.

Prompts: from each held-out file (split.json), a window of --prompt-tokens tokens starting at a
deterministic offset (after its first --skip tokens when the file is long enough), prefixed
with bos. Each prompt decodes --new-tokens tokens greedily in every configuration; TPF is the
total generated tokens over the total forward passes after prefill (draft and verify passes both
count; diffusion counts denoise and commit passes).

    .venv/bin/python -m training.evaluate_tiny --model models/nld-tiny-pystdlib
"""

from __future__ import annotations

import argparse
import json
import sysconfig
import time
from pathlib import Path

import torch

from replicas.engine import DecodeParams, Engine


def load_prompts(model_dir: Path, n: int, prompt_tokens: int, skip: int, lib: Path | None = None) -> list[list[int]]:
    from tokenizers import Tokenizer

    split = json.loads((model_dir / "split.json").read_text())
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    lib = lib or Path(sysconfig.get_paths()["stdlib"])
    prompts = []
    for rel in split["heldout"]:
        path = lib / rel
        if not path.is_file():
            continue
        ids = tok.encode(path.read_text(encoding="utf-8", errors="replace")).ids
        if len(ids) < prompt_tokens + 16:
            continue
        start = skip if len(ids) >= skip + prompt_tokens + 16 else 0
        prompts.append([1] + ids[start : start + prompt_tokens - 1])
        if len(prompts) == n:
            break
    return prompts


def configurations(blocks: list[int], has_lora: bool, threshold: float) -> list[tuple[str, DecodeParams]]:
    confs: list[tuple[str, DecodeParams]] = [("ar", DecodeParams(mode="ar"))]
    for b in blocks:
        confs.append((f"self_spec B{b}", DecodeParams(mode="self_spec", block_length=b, draft_lora=False)))
        if has_lora:
            confs.append((f"self_spec B{b} +LoRA", DecodeParams(mode="self_spec", block_length=b, draft_lora=True)))
    for b in blocks:
        confs.append((f"diffusion B{b} tau{threshold}", DecodeParams(mode="diffusion", block_length=b, threshold=threshold)))
    return confs


def evaluate(model_dir: Path, *, n_prompts: int = 20, prompt_tokens: int = 64, new_tokens: int = 128,
             blocks=(16, 32), threshold: float = 0.9, skip: int = 200, lora: bool | None = None,
             device: str = "cpu", lib: Path | None = None) -> dict:
    engine = Engine.from_pretrained(model_dir, device=device, dtype="float32", lora=lora,
                                    max_block_length=max(blocks))
    prompts = load_prompts(model_dir, n_prompts, prompt_tokens, skip, lib)
    rows = {}
    ar_out: list[list[int]] = []
    for name, base in configurations(list(blocks), engine.has_lora, threshold):
        params = base.with_(max_new_tokens=new_tokens, ignore_eos=False)
        tokens = forwards = 0
        same = 0
        accepted: list[int] = []
        t0 = time.perf_counter()
        for i, prompt in enumerate(prompts):
            out = engine.generate(prompt, params)
            tokens += len(out.token_ids)
            forwards += out.forward_passes
            accepted += out.accepted_lengths
            if name == "ar":
                ar_out.append(out.token_ids)
            elif out.token_ids == ar_out[i]:
                same += 1
        rows[name] = {
            "tokens": tokens, "forwards": forwards, "tpf": tokens / max(forwards, 1),
            "same_as_ar": same if name != "ar" else len(prompts),
            "mean_accepted": (sum(accepted) / len(accepted)) if accepted else None,
            "seconds": round(time.perf_counter() - t0, 2),
        }
    return {"model": str(model_dir), "prompts": len(prompts), "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens, "threshold": threshold, "rows": rows}


def format_table(res: dict) -> str:
    n = res["prompts"]
    lines = [f"{res['model']}: {n} held-out prompts x {res['prompt_tokens']} tokens, {res['new_tokens']} new tokens, greedy",
             f"{'configuration':28s} {'tokens':>7s} {'forwards':>8s} {'TPF':>6s} {'mean acc.':>9s} {'== AR':>7s}"]
    for name, r in res["rows"].items():
        acc = f"{r['mean_accepted']:.2f}" if r["mean_accepted"] is not None else "-"
        lines.append(f"{name:28s} {r['tokens']:7d} {r['forwards']:8d} {r['tpf']:6.2f} {acc:>9s} {r['same_as_ar']:>3d}/{n:<3d}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description="TPF per decoding mode of the tiny NLD on held-out prompts")
    p.add_argument("--model", type=Path, default=Path("models/nld-tiny-pystdlib"))
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--blocks", default="16,32")
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--skip", type=int, default=200, help="prompt start offset (tokens) inside each file")
    p.add_argument("--no-lora", action="store_true", help="do not load linear_spec_lora/")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--lib", type=Path, default=None, help="corpus root (default: the interpreter's Lib/)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = evaluate(args.model, n_prompts=args.prompts, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                   blocks=tuple(int(b) for b in args.blocks.split(",")), threshold=args.threshold, skip=args.skip,
                   lora=False if args.no_lora else None, device=args.device, lib=args.lib)
    print(format_table(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
