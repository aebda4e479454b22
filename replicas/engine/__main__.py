"""CLI: decode one prompt of token ids with a checkpoint and print one JSON object.

    python -m replicas.engine --model DIR --mode self_spec --prompt-ids 1,2,3 --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import json
import sys

from .engine import Engine
from .params import MODES, DecodeParams


def parse_ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m replicas.engine", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="NLD checkpoint directory")
    p.add_argument("--mode", choices=MODES, default="ar")
    p.add_argument("--prompt-ids", type=parse_ids, required=True, help="comma-separated token ids")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--block-length", type=int, default=None)
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-draft-lora", action="store_true", help="draft without the LoRA adapter")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        engine = Engine.from_pretrained(args.model, device=args.device, dtype=args.dtype)
        params = DecodeParams(
            mode=args.mode, max_new_tokens=args.max_new_tokens, block_length=args.block_length,
            threshold=args.threshold, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
            seed=args.seed, draft_lora=False if args.no_draft_lora else None,
        )
        out = engine.generate(args.prompt_ids, params)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({
        "mode": out.mode,
        "token_ids": out.token_ids,
        "finish_reason": out.finish_reason,
        "forward_passes": out.forward_passes,
        "tokens_per_forward": round(out.tokens_per_forward, 4),
        "accepted_lengths": out.accepted_lengths,
        "denoise_passes": out.denoise_passes,
        "seconds": round(out.seconds, 4),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
