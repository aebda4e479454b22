"""Train the self-speculation draft LoRA (`linear_spec_lora/`, PEFT format, `o_proj` only) for a
trained tiny NLD checkpoint, with the backbone frozen.

The draft's job is to guess the model's OWN greedy continuation in one bidirectional pass over
`[seed, MASK x (B-1)]`. So the data is the model's greedy AR continuations of train-split
prompts, and every block of the noisy copy is exactly a draft: its first token clean, the rest
masked (t = 1). The `[noisy | clean]` layout of train_tiny is reused; the LoRA delta is added
to the noisy half only (the clean half never attends to the noisy half, so it is the LoRA-off
prefix the draft reads at inference). The adapter is ON only for draft passes at inference, so
it changes acceptance, never the verified output.

    .venv/bin/python -m training.train_lora --model models/nld-tiny-pystdlib --steps 480 --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from replicas.engine.loader import DIFFUSION_LORA_SUBDIR, LORA_SUBDIR, load_model

from . import positions
from . import train_tiny as tt


class OProjLoRA:
    """Per-layer (A [r, in], B [out, r]) applied as scale * x A^T B^T to the first `rows` tokens."""

    def __init__(self, model, rank: int, alpha: float, seed: int) -> None:
        cfg = model.config
        inner = cfg.num_attention_heads * cfg.head_dim
        g = torch.Generator().manual_seed(seed)
        self.scale = alpha / rank
        self.rank, self.alpha = rank, alpha
        self.a = [torch.nn.Parameter(torch.randn(rank, inner, generator=g) / math.sqrt(inner))
                  for _ in range(cfg.num_hidden_layers)]
        self.b = [torch.nn.Parameter(torch.zeros(cfg.hidden_size, rank)) for _ in range(cfg.num_hidden_layers)]
        self.rows = 0  # tokens [0, rows) of every sequence take the delta
        self.handles = [layer.self_attn.o_proj.register_forward_hook(self._hook(i))
                        for i, layer in enumerate(model.encoder.layers)]

    def _hook(self, i: int):
        def hook(module, inputs, output):
            if not self.rows:
                return output
            x = inputs[0][:, : self.rows]  # [B, rows, in]
            delta = (x @ self.a[i].T) @ self.b[i].T * self.scale  # [B, rows, out]
            return torch.cat([output[:, : self.rows] + delta, output[:, self.rows:]], dim=1)
        return hook

    def parameters(self):
        return self.a + self.b

    def save(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for i, (a, b) in enumerate(zip(self.a, self.b)):
            stem = f"base_model.model.encoder.layers.{i}.self_attn.o_proj"
            tensors[f"{stem}.lora_A.weight"] = a.detach().float().contiguous()
            tensors[f"{stem}.lora_B.weight"] = b.detach().float().contiguous()
        save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
        (out_dir / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": self.rank, "lora_alpha": self.alpha, "target_modules": ["o_proj"],
            "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM", "use_rslora": False,
            "base_model_name_or_path": None,
        }, indent=2))


def full_draft_rows(seqs: torch.Tensor, blocks: list[int], gen: torch.Generator, loss_from: int | list[int],
                    decay: float = 1.0) -> dict:
    """Every block a draft `[seed, MASK x (n-1)]` (random block size and offset per row); the loss
    covers masked positions at or after loss_from (the generated part; one value or one per row).
    A mask d positions after its block's seed weighs decay ** (d - 1): verification accepts only a
    prefix of the draft, so with decay < 1 the adapter's capacity goes to the first positions
    (1.0: unweighted, t = 1)."""
    b, t = seqs.shape
    noisy, masked, weight, masks = [], [], [], []
    for r in range(b):
        block = blocks[int(torch.randint(0, len(blocks), (), generator=gen))]
        offset = int(torch.randint(0, block, (), generator=gen))
        ids = tt.block_ids(t, block, offset)
        first = torch.ones(t, dtype=torch.bool)
        first[1:] = ids[1:] != ids[:-1]
        m = ~first
        m[: int(loss_from[r]) if isinstance(loss_from, list) else loss_from] = False
        noisy.append(torch.where(m, torch.full_like(seqs[r], tt.MASK_ID), seqs[r]))
        masked.append(m)
        i = torch.arange(t)
        after_seed = torch.minimum((i + (block - offset) % block) % block, i)  # [t] d: 0 at the seed (row start too)
        weight.append(m.float() * decay ** (after_seed - 1).clamp(min=0).float())
        masks.append(tt.joint_attention_mask(t, block, offset))
    return {"clean": seqs, "noisy": torch.stack(noisy), "masked": torch.stack(masked),
            "weight": torch.stack(weight), "mask": torch.stack(masks)[:, None],
            "loss_tokens": int(torch.stack(masked).sum())}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description="train the o_proj draft LoRA of a tiny NLD checkpoint")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast for the loss (as train_tiny --amp)")
    p.add_argument("--steps", type=int, default=480)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--blocks", default="16,32")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--file-start-frac", type=float, default=0.75,
                   help="share of prompts that are the first tokens of a train file (the rest: random windows)")
    p.add_argument("--prompt-mix", choices=["file-start", "positions"], default="file-start",
                   help="positions: the six prompt positions of training.positions at --lengths, each continued "
                        "to --total tokens (the phase-4 mix)")
    p.add_argument("--lengths", default="8,16,32,64,128,200")
    p.add_argument("--total", type=int, default=256)
    p.add_argument("--lib", type=Path, default=None)
    p.add_argument("--position-decay", type=float, default=1.0,
                   help="weight decay ** (d - 1) on a mask d positions after its draft's seed (1.0: unweighted)")
    p.add_argument("--objective", choices=["draft", "denoise"], default="draft",
                   help="draft: the self-speculation draft adapter (linear_spec_lora/) on greedy AR continuations; "
                        "denoise: the diffusion adapter (diffusion_lora/) on the model's own diffusion trajectories "
                        "(block --self-block, threshold --self-threshold), partly revealed canvases as in training, "
                        "plus --certainty times the certainty-forcing term")
    p.add_argument("--self-block", type=int, default=16)
    p.add_argument("--self-threshold", type=float, default=0.9)
    p.add_argument("--certainty", type=float, default=0.0)
    p.add_argument("--keep-first", type=float, default=0.75)
    p.add_argument("--suffix-prob", type=float, default=0.5)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    t_start = time.time()

    model = load_model(args.model, device, "float32")  # frozen: requires_grad False
    split = json.loads((args.model / "split.json").read_text())
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(args.model / "tokenizer.json"))
    lib = args.lib or tt.stdlib_dir()
    texts = [tt.read_text(lib, f) for f in split["train"]]
    stream = tt.encode_files(tok, texts)
    gen = torch.Generator().manual_seed(args.seed + 7)
    if args.prompt_mix == "positions":
        prompts = positions.sample_position_prompts(positions.encode_with_offsets(tok, texts), texts, args.samples,
                                                    [int(x) for x in args.lengths.split(",")], gen)
        gen_kw = {"mode": "diffusion", "block": args.self_block, "threshold": args.self_threshold} \
            if args.objective == "denoise" else {}
        seqs, prompt_len = tt.generate_to_length(model, prompts, args.total, **gen_kw)
    else:
        if args.objective == "denoise":
            raise SystemExit("--objective denoise needs --prompt-mix positions")
        prompts = tt.sample_prompts(stream, args.samples, args.prompt, gen, file_starts=tt.file_start_prompts(
            tok, texts, args.prompt), file_start_frac=args.file_start_frac)
        seqs, prompt_len = tt.generate_distill_set(model, prompts, args.new), torch.full((args.samples,), args.prompt)
    t_gen = time.time() - t_start
    print(f"{seqs.shape[0]} self-generated sequences of {seqs.shape[1]} tokens in {t_gen:.0f}s", flush=True)

    lora = OProjLoRA(model, args.rank, args.alpha, args.seed)
    for prm in lora.parameters():
        prm.data = prm.data.to(device)
    opt = torch.optim.AdamW(lora.parameters(), lr=args.lr, weight_decay=0.0)
    blocks = [int(x) for x in args.blocks.split(",")]
    lora.rows = seqs.shape[1]
    log = {"args": {k: str(v) for k, v in vars(args).items()}, "generate_seconds": round(t_gen, 1), "train": []}
    acc, n, acc_h = 0.0, 0, 0.0
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / 10) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        stats: dict = {}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            if args.objective == "denoise":  # partly revealed canvases, as the backbone's self-distillation
                loss, l_diff = tt.self_distill_loss(model, seqs, args.batch, prompt_len, blocks, gen, args, device,
                                                    alpha=1.0, certainty=args.certainty, stats=stats)
            else:
                rows = torch.randint(0, seqs.shape[0], (args.batch,), generator=gen)
                batch = full_draft_rows(seqs[rows], blocks, gen, loss_from=prompt_len[rows].tolist(),
                                        decay=args.position_decay)
                loss, _, l_diff = tt.joint_loss(model, batch, 1.0, device, ar=False, certainty=args.certainty,
                                                stats=stats)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lora.parameters(), 1.0)
        opt.step()
        acc, n, acc_h = acc + l_diff, n + 1, acc_h + stats.get("certainty", 0.0)
        if (step + 1) % 10 == 0 or step + 1 == args.steps:
            rec = {"step": step + 1, "draft_ce": acc / n, "seconds": round(time.time() - t_start, 1)}
            if args.certainty > 0:
                rec["certainty_entropy"] = acc_h / n
            log["train"].append(rec)
            print(f"step {step + 1:4d}  {args.objective} CE {acc / n:.3f}"
                  + (f"  H(right) {acc_h / n:.3f}" if args.certainty > 0 else "")
                  + f"  {time.time() - t_start:.0f}s", flush=True)
            acc, n, acc_h = 0.0, 0, 0.0
    subdir = DIFFUSION_LORA_SUBDIR if args.objective == "denoise" else LORA_SUBDIR
    lora.save(args.model / subdir)
    log["total_seconds"] = round(time.time() - t_start, 1)
    log_name = "diffusion_lora_train_log.json" if args.objective == "denoise" else "lora_train_log.json"
    (args.model / log_name).write_text(json.dumps(log, indent=1))
    print(f"wrote {args.model / subdir} in {log['total_seconds']:.0f}s", flush=True)
    return log


if __name__ == "__main__":
    main()
