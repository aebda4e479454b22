"""Train the tiny embedded NLD model with the published joint objective (NLD.md section 4).

    L = L_AR + alpha * L_diff,   alpha = 0.3

L_AR is next-token cross-entropy on the clean stream. L_diff is masked-token cross-entropy on a
noised copy: the window is cut into blocks (block size drawn per row from --blocks, boundaries
shifted by a random offset per row); in every block a ratio t ~ U(0, 1] of the maskable tokens
is replaced by the mask token and each masked token's loss is weighted by 1/t. One forward runs
over `[noisy | clean]` (positions of the noisy copy equal those of the clean copy) with:
clean->clean causal; noisy->noisy bidirectional inside a block; noisy->clean only the clean
tokens of earlier blocks; clean->noisy never.

Inference-matching choices (documented in docs/TRAINING.md): with probability --keep-first the
first token of a noisy block stays clean (the canvas / draft at inference is `[seed, MASK..]`,
the seed not yet cached), and with probability --suffix-prob the masked tokens are the last m
maskable ones of the block (the self-spec draft case) instead of a uniform random subset.

Corpus: the running interpreter's standard library (`Lib/`), split by file into train and
held-out sets (saved as split.json). Tokenizer: byte-level BPE trained on the train split, with
the NLD special ids (bos 1, eos 11, mask 100). Output: a checkpoint in the NLD format
(config.json, model.safetensors in bfloat16, tokenizer.json, tokenizer_config.json), plus
split.json, train_log.json and loss_curves.png.

Reproducible from --seed for a given device and thread count. Example (the shipped model):

    .venv/bin/python -m training.train_tiny --out models/nld-tiny-pystdlib --steps 600 --distill-steps 300 \
        --distill-rounds 2 --distill-samples 256 --threads 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from replicas.engine.config import ModelConfig
from replicas.engine.model import AttentionInputs, NLDModel
from replicas.engine.testing import N_SPECIAL, SPECIAL_NAMES, random_config, write_tokenizer_config

from .certainty import anchor_kl, certainty_entropy

BOS_ID, EOS_ID, MASK_ID = 1, 11, 100
EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "encodings", "pydoc_data", "__pycache__"}
MAX_FILE_BYTES = 300_000


# ----------------------------------------------------------------------------- corpus


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def collect_files(lib: Path) -> list[str]:
    """Relative paths of the .py files under `lib` that form the corpus (sorted)."""
    out = []
    for p in lib.rglob("*.py"):
        rel = p.relative_to(lib)
        if any(part in EXCLUDED_DIRS for part in rel.parts[:-1]):
            continue
        if p.stat().st_size > MAX_FILE_BYTES or p.stat().st_size == 0:
            continue
        out.append(rel.as_posix())
    return sorted(out)


def split_files(paths: list[str], seed: int, heldout_frac: float = 0.05) -> dict:
    """Deterministic split by file: a seeded shuffle, the first `heldout_frac` held out."""
    order = sorted(paths)
    random.Random(seed).shuffle(order)
    k = max(1, round(len(order) * heldout_frac))
    return {
        "python_version": sys.version.split()[0],
        "stdlib": "Lib/ of the running interpreter (sysconfig stdlib path)",
        "excluded_dirs": sorted(EXCLUDED_DIRS),
        "max_file_bytes": MAX_FILE_BYTES,
        "seed": seed,
        "train": sorted(order[k:]),
        "heldout": sorted(order[:k]),
    }


def read_text(lib: Path, rel: str) -> str:
    return (lib / rel).read_text(encoding="utf-8", errors="replace")


# ----------------------------------------------------------------------------- tokenizer


def special_tokens() -> list[str]:
    return [SPECIAL_NAMES.get(i, f"<special_{i}>") for i in range(N_SPECIAL)]


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE with the NLD special tokens at ids [0, 128) (bos 1, eos 11, mask 100)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens(),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    assert tok.token_to_id("<s>") == BOS_ID and tok.token_to_id("</s>") == EOS_ID
    assert tok.token_to_id("<mask>") == MASK_ID
    return tok


def save_tokenizer(tok, out: Path) -> None:
    tok.save(str(out / "tokenizer.json"))
    write_tokenizer_config(out)


def encode_files(tok, texts: list[str]) -> np.ndarray:
    """One stream: [bos] + file tokens + [eos] per file, concatenated."""
    parts = []
    for enc in tok.encode_batch(texts):
        parts.append(np.asarray([BOS_ID] + enc.ids + [EOS_ID], dtype=np.int32))
    return np.concatenate(parts)


# ----------------------------------------------------------------------------- masking + layout


def block_ids(t: int, block: int, offset: int) -> torch.Tensor:
    """Block index of each of t positions when boundaries sit at offset + k * block ([t] long)."""
    return (torch.arange(t) + (block - offset) % block) // block


def joint_attention_mask(t: int, block: int, offset: int) -> torch.Tensor:
    """Boolean [2t, 2t] mask (True = may attend) over `[noisy | clean]`."""
    b = block_ids(t, block, offset)
    i = torch.arange(t)
    clean_clean = i[None, :] <= i[:, None]
    noisy_noisy = b[:, None] == b[None, :]
    noisy_clean = b[None, :] < b[:, None]
    top = torch.cat([noisy_noisy, noisy_clean], dim=1)
    bottom = torch.cat([torch.zeros(t, t, dtype=torch.bool), clean_clean], dim=1)
    return torch.cat([top, bottom], dim=0)


def noise_blocks(
    tokens: torch.Tensor, block: int, offset: int, gen: torch.Generator, *,
    keep_first_prob: float, suffix_prob: float, mask_id: int = MASK_ID,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise one row [t]: returns (noisy [t], masked [t] bool, weight [t] float = 1/t on masked).

    Per block: the maskable positions are the whole block, or all but its first token (with
    probability keep_first_prob, when the block has at least 2 tokens); m ~ U{1..n} of the n
    maskable positions are masked (t = m / n, so t ~ U(0, 1]), either the last m of them
    (probability suffix_prob) or a uniformly random subset; masked tokens weigh 1 / t."""
    t = tokens.shape[0]
    b = block_ids(t, block, offset)
    masked = torch.zeros(t, dtype=torch.bool)
    weight = torch.zeros(t)
    for k in range(int(b[-1]) + 1):
        idx = (b == k).nonzero().squeeze(1)
        if len(idx) >= 2 and float(torch.rand((), generator=gen)) < keep_first_prob:
            idx = idx[1:]
        n = len(idx)
        m = int(torch.randint(1, n + 1, (), generator=gen))
        if float(torch.rand((), generator=gen)) < suffix_prob:
            chosen = idx[n - m:]
        else:
            chosen = idx[torch.randperm(n, generator=gen)[:m]]
        masked[chosen] = True
        weight[chosen] = n / m
    noisy = torch.where(masked, torch.full_like(tokens, mask_id), tokens)
    return noisy, masked, weight


def noise_rows(clean: torch.Tensor, blocks: list[int], gen: torch.Generator, *, keep_first_prob: float,
               suffix_prob: float, loss_from: int | list[int] = 0) -> dict:
    """Noise each row of clean [B, T] with its own block size and offset; the diffusion loss only
    covers positions >= loss_from (one value, or one per row; before it the noisy copy keeps the
    clean tokens)."""
    batch, seq = clean.shape
    noisy, masked, weight, masks = [], [], [], []
    for r in range(batch):
        block = blocks[int(torch.randint(0, len(blocks), (), generator=gen))]
        offset = int(torch.randint(0, block, (), generator=gen))
        n, m, w = noise_blocks(clean[r], block, offset, gen, keep_first_prob=keep_first_prob, suffix_prob=suffix_prob)
        lf = int(loss_from[r]) if isinstance(loss_from, (list, tuple)) else loss_from
        if lf:
            m[:lf] = False
            w[:lf] = 0.0
            n[:lf] = clean[r, :lf]
        noisy.append(n), masked.append(m), weight.append(w)
        masks.append(joint_attention_mask(seq, block, offset))
    return {
        "clean": clean, "noisy": torch.stack(noisy), "masked": torch.stack(masked),
        "weight": torch.stack(weight), "mask": torch.stack(masks)[:, None],  # [B, 1, 2T, 2T]
    }


def make_batch(stream: np.ndarray, batch: int, seq: int, blocks: list[int], gen: torch.Generator, *,
               keep_first_prob: float, suffix_prob: float) -> dict:
    starts = torch.randint(0, len(stream) - seq, (batch,), generator=gen).tolist()
    clean = torch.stack([torch.from_numpy(stream[s:s + seq].astype(np.int64)) for s in starts])  # [B, T]
    return noise_rows(clean, blocks, gen, keep_first_prob=keep_first_prob, suffix_prob=suffix_prob)


def file_start_prompts(tok, texts: list[str], length: int) -> list[list[int]]:
    """The first `length` tokens of every text that has that many (no bos): the prompts
    `benchmarks/engine_modes.py --heldout` uses, taken here from the train split. (Encoded from
    the texts, not cut from an `encode_files` stream: a file can contain a literal `<s>`.)"""
    return [enc.ids[:length] for enc in tok.encode_batch(texts) if len(enc.ids) >= length]


def sample_prompts(stream: np.ndarray, n: int, length: int, gen: torch.Generator, *,
                   file_starts: list[list[int]] | None = None, file_start_frac: float = 0.0) -> list[list[int]]:
    """n prompts of `length` tokens: a `file_start_frac` share drawn from `file_starts`, the
    rest from random positions of the stream."""
    prompts = []
    for _ in range(n):
        if file_starts and file_start_frac > 0 and float(torch.rand((), generator=gen)) < file_start_frac:
            prompts.append(list(file_starts[int(torch.randint(0, len(file_starts), (), generator=gen))]))
        else:
            s = int(torch.randint(0, len(stream) - length, (), generator=gen))
            prompts.append(stream[s:s + length].astype(np.int64).tolist())
    return prompts


def generate_distill_set(model: NLDModel, prompts: list[list[int]], new_tokens: int) -> torch.Tensor:
    """Greedy AR continuations of `prompts` (all of one length P) by the model itself:
    [len(prompts), P + new_tokens] long (`generate_to_length` for prompts of one length).

    The self-speculation draft must predict the model's OWN greedy continuation, and diffusion
    unmasks confidently only where the model is self-consistent: these sequences teach both."""
    return generate_to_length(model, prompts, len(prompts[0]) + new_tokens)[0]


@torch.no_grad()
def generate_to_length(model: NLDModel, prompts: list[list[int]], total: int, *, mode: str = "ar",
                       block: int = 16, threshold: float = 0.9) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy continuations of prompts of any lengths (each < total), each continued to `total`
    tokens: (sequences [n, total] long, prompt lengths [n] long). `mode` "ar" (the default) or
    "diffusion" (the model's own denoising trajectory: canvases of `block`, threshold `threshold`)."""
    from replicas.engine import DecodeParams, Engine

    was_training = model.training
    model.eval()
    engine = Engine(model, max_block_length=max(64, block))
    rows = []
    for prompt in prompts:
        new = total - len(prompt)
        params = DecodeParams(mode=mode, max_new_tokens=new, ignore_eos=True, block_length=block, threshold=threshold)
        out = engine.generate(prompt, params).token_ids
        rows.append(torch.tensor(prompt + out[:new]))
    model.train(was_training)
    return torch.stack(rows), torch.tensor([len(p) for p in prompts])


# ----------------------------------------------------------------------------- model + loss


def model_config(args) -> dict:
    raw = random_config(
        layers=args.layers, hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
        intermediate=args.intermediate, vocab=args.vocab, block_size=args.block_size, dtype="bfloat16",
        max_position_embeddings=4096, rope_factor=4.0,
    )
    return raw


def init_model(cfg: ModelConfig, seed: int) -> NLDModel:
    torch.manual_seed(seed)
    model = NLDModel(cfg)
    std = 0.02
    resid_std = std / math.sqrt(2 * cfg.num_hidden_layers)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            torch.nn.init.ones_(p)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            torch.nn.init.normal_(p, 0.0, resid_std)
        else:
            torch.nn.init.normal_(p, 0.0, std)
    return model


def joint_loss(model: NLDModel, batch: dict, alpha: float, device, ar: bool = True, certainty: float = 0.0,
               teacher: NLDModel | None = None, anchor: float = 0.0,
               stats: dict | None = None) -> tuple[torch.Tensor, float, float]:
    """(L_AR + alpha * L_diff [+ certainty * H] [+ anchor * KL], L_AR, L_diff) for one batch
    (ar=False: no L_AR and no KL).

    `certainty` > 0 adds the certainty-forcing term H (`training.certainty.certainty_entropy`) of
    the masked positions; `anchor` > 0 with a `teacher` adds KL(teacher || model) of the clean
    half's next-token distributions (`training.certainty.anchor_kl`). Their values go to
    `stats["certainty"]` / `stats["anchor"]` when a dict is given."""
    clean = batch["clean"].to(device)
    noisy = batch["noisy"].to(device)
    b, t = clean.shape
    tokens = torch.cat([noisy, clean], dim=1)  # [B, 2T]
    pos = torch.arange(t, device=device).repeat(2)[None].expand(b, -1)  # [B, 2T]
    attn = AttentionInputs(write_index=pos, mask=batch["mask"].to(device))
    h = model(tokens, pos, None, attn)  # [B, 2T, H]
    # AR: clean logit at i predicts clean token i+1
    if ar:
        ar_logits = model.logits(h[:, t:-1])  # [B, T-1, V]
        l_ar = F.cross_entropy(ar_logits.reshape(-1, ar_logits.shape[-1]), clean[:, 1:].reshape(-1))
        if anchor > 0 and teacher is not None:
            with torch.no_grad():
                t_logits = teacher.logits(teacher(tokens, pos, None, attn)[:, t:-1])  # [B, T-1, V]
            kl = anchor_kl(ar_logits, t_logits)
            l_ar_total = l_ar + anchor * kl
            if stats is not None:
                stats["anchor"] = float(kl.detach())
        else:
            l_ar_total = l_ar
    else:
        l_ar = l_ar_total = torch.zeros((), device=device)
    # diffusion: noisy logit at i predicts the clean token at i, on masked positions, weighted 1/t
    masked = batch["masked"].to(device)
    weight = batch["weight"].to(device)
    d_logits = model.logits(h[:, :t][masked])  # [M, V]
    ce = F.cross_entropy(d_logits, clean[masked], reduction="none")  # [M]
    n_loss = int(batch.get("loss_tokens", b * t))
    l_diff = (ce * weight[masked]).sum() / n_loss
    loss = l_ar_total + alpha * l_diff
    if certainty > 0:
        h_cert = certainty_entropy(d_logits, clean[masked])
        loss = loss + certainty * h_cert
        if stats is not None:
            stats["certainty"] = float(h_cert.detach())
    return loss, float(l_ar.detach()), float(l_diff.detach())


def make_optimizer(model: NLDModel, lr: float, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW, betas (0.9, 0.95): weight decay 0.1 on tensors of 2+ dims (matrices, embeddings),
    none on vectors (norm weights)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)


def take_step(model: NLDModel, opt: torch.optim.Optimizer, loss: torch.Tensor, where: str) -> None:
    """One optimiser step (gradients clipped to norm 1); a non-finite loss stops training."""
    if not math.isfinite(float(loss.detach())):
        raise FloatingPointError(f"{where}: loss is {float(loss.detach())}")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def self_distill_loss(model: NLDModel, distill: torch.Tensor, rows: int, prompt_len: int | torch.Tensor,
                      blocks: list[int], gen: torch.Generator, args, device,
                      alpha: float | None = None, certainty: float = 0.0,
                      stats: dict | None = None) -> tuple[torch.Tensor, float]:
    """(alpha * L_diff [+ certainty * H], L_diff) on `rows` random self-generated sequences of
    `distill` [n, P + N]: the usual noising, the loss only on the generated part (positions >=
    prompt_len; an int, or a [n] tensor of per-sequence prompt lengths). `alpha`: the term's
    weight (default args.alpha); `certainty`, `stats`: as `joint_loss`."""
    picked = torch.randint(0, distill.shape[0], (rows,), generator=gen)
    if isinstance(prompt_len, torch.Tensor):
        loss_from = prompt_len[picked].tolist()
    else:
        loss_from = prompt_len
    batch = noise_rows(distill[picked], blocks, gen, keep_first_prob=args.keep_first,
                       suffix_prob=args.suffix_prob, loss_from=loss_from)
    batch["loss_tokens"] = (rows * distill.shape[1] - sum(loss_from)) if isinstance(loss_from, list) \
        else rows * (distill.shape[1] - prompt_len)
    loss, _, l_diff = joint_loss(model, batch, args.alpha if alpha is None else alpha, device, ar=False,
                                 certainty=certainty, stats=stats)
    return loss, l_diff


@torch.no_grad()
def heldout_ar_loss(model: NLDModel, stream: np.ndarray, seq: int, n_windows: int, device) -> float:
    """Mean next-token loss over n_windows evenly spaced held-out windows (causal attention)."""
    model.eval()
    starts = np.linspace(0, len(stream) - seq - 1, n_windows).astype(int)
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()[None, None].to(device)
    pos = torch.arange(seq, device=device)[None]
    total, count = 0.0, 0
    for chunk in np.array_split(starts, max(1, n_windows // 8)):
        x = torch.stack([torch.from_numpy(stream[s:s + seq].astype(np.int64)) for s in chunk]).to(device)
        p = pos.expand(len(chunk), -1)
        h = model(x, p, None, AttentionInputs(write_index=p, mask=causal.expand(len(chunk), -1, -1, -1)))
        logits = model.logits(h[:, :-1])
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"))
        count += x[:, 1:].numel()
    model.train()
    return total / count


def save_checkpoint(model: NLDModel, raw_cfg: dict, out: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(raw_cfg, indent=2))


def plot_losses(log: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in log["train"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["ar"] for r in log["train"]], label="train L_AR")
    ax.plot(steps, [r["diff"] for r in log["train"]], label="train L_diff (1/t weighted)")
    dist = [(r["step"], r["diff_self"]) for r in log["train"] if "diff_self" in r]
    if dist:
        ax.plot(*zip(*dist), label="train L_diff on own greedy text (phases 2-3)")
        for i, rnd in enumerate(log.get("distill", [])):
            ax.axvline(rnd["from_step"], color="grey", ls=":", lw=1, label="self-generated set (re)made" if i == 0 else None)
    if log["eval"]:
        ax.plot([r["step"] for r in log["eval"]], [r["heldout_ar"] for r in log["eval"]], "o-", label="held-out L_AR")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("nld-tiny: L = L_AR + 0.3 L_diff")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--amp", action="store_true",
                   help="bfloat16 autocast on CPU too (always on cuda): about 1.4x faster steps where the CPU has "
                        "AMX/AVX512-BF16; generation and the saved weights are unchanged")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--alpha", type=float, default=0.3)
    p.add_argument("--blocks", default="16,32", help="training block sizes, one drawn per row")
    p.add_argument("--keep-first", type=float, default=0.75)
    p.add_argument("--suffix-prob", type=float, default=0.5)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--block-size", type=int, default=32, help="config.json block_size")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--distill-steps", type=int, default=300,
                   help="phase 2 steps: each adds alpha * L_diff on the model's own greedy continuations")
    p.add_argument("--distill-samples", type=int, default=256, help="self-generated sequences for phase 2")
    p.add_argument("--distill-prompt", type=int, default=64)
    p.add_argument("--distill-new", type=int, default=128)
    p.add_argument("--distill-batch", type=int, default=8)
    p.add_argument("--distill-rounds", type=int, default=2,
                   help="regenerate the self-generated set this many times during phase 2 (evenly spaced)")
    p.add_argument("--lib", type=Path, default=None, help="corpus root (default: the interpreter's Lib/)")
    p.add_argument("--max-files", type=int, default=0, help="use only the first N corpus files (tests)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    lib = args.lib or stdlib_dir()
    files = collect_files(lib)
    if args.max_files:
        files = files[: args.max_files]
    split = split_files(files, args.seed)
    (out / "split.json").write_text(json.dumps(split, indent=1))
    train_texts = [read_text(lib, f) for f in split["train"]]
    held_texts = [read_text(lib, f) for f in split["heldout"]]
    tok = train_tokenizer(train_texts, args.vocab)
    save_tokenizer(tok, out)
    vocab = args.vocab
    train_stream, held_stream = encode_files(tok, train_texts), encode_files(tok, held_texts)
    print(f"corpus: {len(split['train'])} train files ({len(train_stream)} tokens), "
          f"{len(split['heldout'])} held-out ({len(held_stream)} tokens), vocab {tok.get_vocab_size()}, "
          f"prep {time.time() - t_start:.0f}s", flush=True)

    args.vocab = vocab
    raw = model_config(args)
    cfg = ModelConfig.from_dict(raw)
    model = init_model(cfg, args.seed).to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters", flush=True)

    opt = make_optimizer(model, args.lr, fused=True)

    total_steps = args.steps + args.distill_steps

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        frac = (step - args.warmup) / max(1, total_steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))

    gen = torch.Generator().manual_seed(args.seed + 1)
    blocks = [int(x) for x in args.blocks.split(",")]
    log = {"args": {k: str(v) for k, v in vars(args).items()}, "params": n_params, "train": [], "eval": []}
    use_amp = device.type == "cuda" or args.amp
    acc_ar = acc_diff = acc_dist = 0.0
    acc_n = 0
    distill = None
    t_train = time.time()
    for step in range(total_steps):
        round_len = max(1, args.distill_steps // max(1, args.distill_rounds))
        if args.distill_steps and step >= args.steps and (step - args.steps) % round_len == 0 \
                and (step - args.steps) // round_len < args.distill_rounds:
            t0 = time.time()
            prompts = sample_prompts(train_stream, args.distill_samples, args.distill_prompt, gen)
            distill = generate_distill_set(model, prompts, args.distill_new)
            log.setdefault("distill", []).append({"samples": int(distill.shape[0]), "length": int(distill.shape[1]),
                                                  "generate_seconds": round(time.time() - t0, 1), "from_step": step})
            print(f"phase 2: {distill.shape[0]} self-generated sequences in {time.time() - t0:.0f}s", flush=True)
        batch = make_batch(train_stream, args.batch, args.seq, blocks, gen,
                           keep_first_prob=args.keep_first, suffix_prob=args.suffix_prob)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        l_dist = 0.0
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss, l_ar, l_diff = joint_loss(model, batch, args.alpha, device)
            if distill is not None:
                dloss, l_dist = self_distill_loss(model, distill, args.distill_batch, args.distill_prompt, blocks, gen,
                                                  args, device)
                loss = loss + dloss
        take_step(model, opt, loss, f"step {step}")
        acc_ar, acc_diff, acc_dist, acc_n = acc_ar + l_ar, acc_diff + l_diff, acc_dist + l_dist, acc_n + 1
        if (step + 1) % args.log_every == 0 or step + 1 == total_steps:
            rec = {"step": step + 1, "ar": acc_ar / acc_n, "diff": acc_diff / acc_n, "lr": lr_at(step),
                   "seconds": round(time.time() - t_train, 1)}
            if distill is not None:
                rec["diff_self"] = acc_dist / acc_n
            log["train"].append(rec)
            acc_ar = acc_diff = acc_dist = 0.0
            acc_n = 0
            print(f"step {rec['step']:5d}  L_AR {rec['ar']:.3f}  L_diff {rec['diff']:.3f}  "
                  + (f"L_diff(self) {rec['diff_self']:.3f}  " if distill is not None else "")
                  + f"lr {rec['lr']:.2e}  {rec['seconds']:.0f}s", flush=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == total_steps:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                ev = heldout_ar_loss(model, held_stream, args.seq, args.eval_windows, device)
            log["eval"].append({"step": step + 1, "heldout_ar": ev})
            print(f"step {step + 1:5d}  held-out L_AR {ev:.3f}", flush=True)
    log["train_seconds"] = round(time.time() - t_train, 1)
    log["total_seconds"] = round(time.time() - t_start, 1)
    log["heldout_ar_final"] = log["eval"][-1]["heldout_ar"] if log["eval"] else None
    log["tokens"] = {"train": int(len(train_stream)), "heldout": int(len(held_stream))}
    save_checkpoint(model, raw, out)
    (out / "train_log.json").write_text(json.dumps(log, indent=1))
    plot_losses(log, out / "loss_curves.png")
    print(f"done in {log['total_seconds']:.0f}s; held-out L_AR {log['heldout_ar_final']}", flush=True)
    return log


if __name__ == "__main__":
    main()
