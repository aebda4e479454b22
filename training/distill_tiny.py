"""Phases 3 and 4 of the tiny model's training: more self-distillation, from file starts
(phase 3) or from all six prompt positions at lengths 8..200 (phase 4, `--prompt-mix positions`).

Continues a checkpoint written by `train_tiny` (in place): each round the model writes greedy AR
continuations of train-split prompts, a `--file-start-frac` share of them the first tokens of a
file (the prompt shape `benchmarks/engine_modes.py --heldout` measures), the rest random stream
windows; then it trains `L_AR` on the corpus plus the diffusion loss on its own continuations,
exactly as phase 2 of `train_tiny`. Held-out files are never read except for the held-out loss.
The log is appended to `train_log.json` (steps continue) and `loss_curves.png` is redrawn.
The draft LoRA must be retrained afterwards (`training.train_lora`): it fits the backbone.

    .venv/bin/python -m training.distill_tiny --model models/nld-tiny-pystdlib --steps 400 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from replicas.engine.loader import load_model

from . import positions
from . import train_tiny as tt


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True, help="a train_tiny checkpoint; updated in place")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast for the loss (as train_tiny --amp)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--rounds", type=int, default=2, help="self-generated sets, remade from the current model")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--file-start-frac", type=float, default=0.75)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--prompt-mix", choices=["file-start", "positions"], default="file-start",
                   help="file-start: --file-start-frac file starts, the rest random windows, --prompt tokens each "
                        "(phase 3); positions: the six prompt positions of training.positions, uniform, lengths "
                        "from --lengths, each continued to --total tokens (phase 4)")
    p.add_argument("--lengths", default="8,16,32,64,128,200", help="prompt lengths of --prompt-mix positions")
    p.add_argument("--total", type=int, default=256, help="sequence length of --prompt-mix positions")
    p.add_argument("--batch", type=int, default=8, help="corpus rows per step (L_AR + 0.3 L_diff)")
    p.add_argument("--distill-batch", type=int, default=8, help="self-generated rows per step (L_diff)")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--alpha", type=float, default=0.3)
    p.add_argument("--self-alpha", type=float, default=None,
                   help="weight of the self-generated diffusion term (default --alpha)")
    p.add_argument("--self-mode", choices=["ar", "diffusion"], default="ar",
                   help="how the model writes its own continuations: greedy AR (phases 2-4) or its own diffusion "
                        "trajectory (block --self-block, threshold --self-threshold; phase 5)")
    p.add_argument("--self-block", type=int, default=16)
    p.add_argument("--self-threshold", type=float, default=0.9)
    p.add_argument("--certainty", type=float, default=0.0,
                   help="weight of the certainty-forcing term on the self-generated set: the mean entropy of "
                        "the masked predictions whose argmax is already right (training.certainty.certainty_entropy)")
    p.add_argument("--anchor", type=float, default=0.0,
                   help="weight of KL(checkpoint as found || model) on the corpus's next-token distributions "
                        "(training.certainty.anchor_kl): keeps the AR head where it was")
    p.add_argument("--blocks", default="16,32")
    p.add_argument("--keep-first", type=float, default=0.75)
    p.add_argument("--suffix-prob", type=float, default=0.5)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--lib", type=Path, default=None)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    t_start = time.time()
    if args.self_mode != "ar" or args.certainty > 0 or args.anchor > 0:
        phase_no = 5
    else:
        phase_no = 4 if args.prompt_mix == "positions" else 3
    name = f"phase {phase_no}"
    gen_kw = {"mode": args.self_mode, "block": args.self_block, "threshold": args.self_threshold}
    from tokenizers import Tokenizer

    model = load_model(args.model, device, "float32").train().requires_grad_(True)
    teacher = load_model(args.model, device, "float32").eval().requires_grad_(False) if args.anchor > 0 else None
    raw_cfg = json.loads((args.model / "config.json").read_text())
    split = json.loads((args.model / "split.json").read_text())
    tok = Tokenizer.from_file(str(args.model / "tokenizer.json"))
    lib = args.lib or tt.stdlib_dir()
    train_texts = [tt.read_text(lib, f) for f in split["train"]]
    train_stream = tt.encode_files(tok, train_texts)
    held_stream = tt.encode_files(tok, [tt.read_text(lib, f) for f in split["heldout"]])
    starts = tt.file_start_prompts(tok, train_texts, args.prompt)
    encoded = positions.encode_with_offsets(tok, train_texts) if args.prompt_mix == "positions" else None
    lengths = [int(x) for x in args.lengths.split(",")]
    log_path = args.model / "train_log.json"
    log = json.loads(log_path.read_text()) if log_path.is_file() else {"train": [], "eval": []}
    first_step = log["train"][-1]["step"] if log["train"] else 0
    print(f"{name} from step {first_step}: {len(starts)} file-start prompts, {len(train_stream)} train tokens",
          flush=True)

    opt = tt.make_optimizer(model, args.lr)
    gen = torch.Generator().manual_seed(args.seed + 11)
    blocks = [int(x) for x in args.blocks.split(",")]
    round_len = max(1, math.ceil(args.steps / max(1, args.rounds)))
    phase = {"args": {k: str(v) for k, v in vars(args).items()}, "from_step": first_step, "rounds": []}
    acc = [0.0, 0.0, 0.0, 0, 0.0, 0.0]
    distill = None
    for step in range(args.steps):
        if step % round_len == 0:
            t0 = time.time()
            if encoded is not None:
                prompts = positions.sample_position_prompts(encoded, train_texts, args.samples, lengths, gen)
                distill, prompt_len = tt.generate_to_length(model, prompts, args.total, **gen_kw)
            else:
                prompts = tt.sample_prompts(train_stream, args.samples, args.prompt, gen, file_starts=starts,
                                            file_start_frac=args.file_start_frac)
                distill = tt.generate_to_length(model, prompts, args.prompt + args.new, **gen_kw)[0]
                prompt_len = args.prompt
            rnd = {"samples": int(distill.shape[0]), "length": int(distill.shape[1]),
                   "generate_seconds": round(time.time() - t0, 1), "from_step": first_step + step}
            phase["rounds"].append(rnd)
            log.setdefault("distill", []).append(rnd)
            print(f"{name}: {distill.shape[0]} self-generated sequences in {rnd['generate_seconds']:.0f}s", flush=True)
        for g in opt.param_groups:  # short warm-up, cosine to a tenth
            g["lr"] = args.lr * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        batch = tt.make_batch(train_stream, args.batch, args.seq, blocks, gen,
                              keep_first_prob=args.keep_first, suffix_prob=args.suffix_prob)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            stats: dict = {}
            loss, l_ar, l_diff = tt.joint_loss(model, batch, args.alpha, device, teacher=teacher, anchor=args.anchor,
                                               stats=stats)
            dloss, l_dist = tt.self_distill_loss(model, distill, args.distill_batch, prompt_len, blocks, gen, args,
                                                 device, alpha=args.self_alpha, certainty=args.certainty,
                                                 stats=stats)
            loss = loss + dloss
        tt.take_step(model, opt, loss, f"{name} step {step}")
        acc = [acc[0] + l_ar, acc[1] + l_diff, acc[2] + l_dist, acc[3] + 1, acc[4] + stats.get("certainty", 0.0),
               acc[5] + stats.get("anchor", 0.0)]
        if (step + 1) % 10 == 0 or step + 1 == args.steps:
            n = acc[3]
            rec = {"step": first_step + step + 1, "ar": acc[0] / n, "diff": acc[1] / n, "diff_self": acc[2] / n,
                   "lr": opt.param_groups[0]["lr"], "seconds": round(time.time() - t_start, 1), "phase": phase_no}
            if args.certainty > 0:
                rec["certainty_entropy"] = acc[4] / n
            if args.anchor > 0:
                rec["anchor_kl"] = acc[5] / n
            log["train"].append(rec)
            acc = [0.0, 0.0, 0.0, 0, 0.0, 0.0]
            print(f"step {rec['step']:5d}  L_AR {rec['ar']:.3f}  L_diff {rec['diff']:.3f}  "
                  f"L_diff(self) {rec['diff_self']:.3f}"
                  + (f"  H(right) {rec['certainty_entropy']:.3f}" if args.certainty > 0 else "")
                  + (f"  KL(anchor) {rec['anchor_kl']:.4f}" if args.anchor > 0 else "")
                  + f"  {rec['seconds']:.0f}s", flush=True)
    ev = tt.heldout_ar_loss(model, held_stream, args.seq, args.eval_windows, device)
    log["eval"].append({"step": first_step + args.steps, "heldout_ar": ev})
    log["heldout_ar_final"] = ev
    phase["seconds"] = round(time.time() - t_start, 1)
    log[f"phase{phase_no}"] = phase
    tt.save_checkpoint(model, raw_cfg, args.model)
    log_path.write_text(json.dumps(log, indent=1))
    tt.plot_losses(log, args.model / "loss_curves.png")
    print(f"{name} done in {phase['seconds']:.0f}s; held-out L_AR {ev:.3f}", flush=True)
    return log


if __name__ == "__main__":
    main()
