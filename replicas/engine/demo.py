"""`make run` until the serving stack lands: decode one prompt in all three modes and print a table.

Writes a random test checkpoint to --model on first use when the directory has no config.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .engine import Engine
from .params import DecodeParams
from .testing import write_random_checkpoint


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=".cache/random-nld")
    p.add_argument("--max-new-tokens", type=int, default=48)
    args = p.parse_args(argv)
    model = Path(args.model)
    if not (model / "config.json").is_file():
        print(f"writing a random NLD test checkpoint to {model} ...", flush=True)
        write_random_checkpoint(model, lora_rank=8)
    print(f"loading {model} ...", flush=True)
    engine = Engine.from_pretrained(model)
    prompt = [engine.config.bos_token_id or 1, 200, 201, 202, 203]
    print(f"prompt ids: {prompt}\n")
    print(f"{'mode':<10} {'tokens':>6} {'forwards':>8} {'tok/fwd':>7} {'seconds':>8}  first tokens")
    outputs = {}
    for mode in ("ar", "diffusion", "self_spec"):
        out = engine.generate(prompt, DecodeParams(mode=mode, max_new_tokens=args.max_new_tokens))
        outputs[mode] = out.token_ids
        print(f"{mode:<10} {len(out.token_ids):>6} {out.forward_passes:>8} {out.tokens_per_forward:>7.2f} "
              f"{out.seconds:>8.3f}  {out.token_ids[:10]}")
    same = outputs["ar"] == outputs["self_spec"]
    print(f"\ngreedy self_spec output identical to ar: {same}")


if __name__ == "__main__":
    main()
