"""The tiny model's all-position held-out evaluation: prompts cut where a user would stop typing,
in every held-out file, at several lengths.

Prompt set (deterministic, held-out files of split.json only, so disjoint from all training):
for held-out file i (sorted) and position kind j of `training.positions.KINDS` (file start,
after a def line, mid-body, inside a class, after a comment, after an except), if the file has
a cut point of that kind, the middle one (`cands[len(cands) // 2]`) is taken, with prompt length
`lengths[(i + j) % len(lengths)]` (default 8, 32, 96, 200 tokens; shorter where the file is).
Prompts carry no bos, as /v1/completions sends them (`add_bos_token` is false).

Every prompt decodes `--new-tokens` (64) tokens greedily, ignoring eos, in: ar; self_spec block 16
with the draft LoRA on (and off with --lora-off); diffusion block 16, threshold 0.9, with the
denoise adapter `diffusion_lora/` when the model has one (and without it with --lora-off). Reported per
position kind, per prompt length and over all prompts:
- TPF = generated tokens / forward passes after prefill (draft + verify passes; denoise + commit);
- `same_as_ar`: prompts whose self_spec output equals ar's exactly;
- `loop_share` (the repetition metric): the share of output tokens inside an n-gram loop. An
  output token is inside a loop when it belongs to an n-gram (n = --ngram, 8 tokens) of the
  output that already occurred earlier in the same output (an earlier start index; overlaps
  count, so a token repeated 9 times is a loop). Only the generated tokens are scanned, not the
  prompt. Summed over prompts: marked tokens / generated tokens;
- accuracy proxies: held-out AR loss (next-token cross-entropy, 32 evenly spaced 256-token
  windows of the held-out stream, the model card's figure) and, for ar, the share of prompts
  whose first k generated tokens equal the file's real continuation (k = 1, 4, 16), and the
  mean length of the matching prefix (capped at 16); the same for every configuration (self_spec
  equals ar; diffusion's is its own accuracy proxy, printed beside ar's).

Non-goals: sampling (greedy only), timing (benchmarks/engine_modes.py), bf16 (CPU float32).

    .venv/bin/python -m training.evaluate_positions --model models/nld-tiny-pystdlib --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import sysconfig
import time
from pathlib import Path

import torch

from replicas.engine import DecodeParams, Engine

from .positions import KINDS, cut_points, prompt_at

EXACT_K = (1, 4, 16)


def heldout_prompt_set(model_dir: Path, lengths=(8, 32, 96, 200), lib: Path | None = None,
                       max_files: int = 0) -> list[dict]:
    """[{file, kind, length, prompt ids, reference continuation ids (16)}] as the docstring says."""
    from tokenizers import Tokenizer

    split = json.loads((model_dir / "split.json").read_text())
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    lib = lib or Path(sysconfig.get_paths()["stdlib"])
    files = sorted(split["heldout"])[: max_files or None]
    out = []
    for i, rel in enumerate(files):
        path = lib / rel
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        enc = tok.encode(text)
        cuts = cut_points(text)
        for j, kind in enumerate(KINDS):
            if not cuts[kind]:
                continue
            length = lengths[(i + j) % len(lengths)]
            start, end = prompt_at(enc.ids, enc.offsets, kind, cuts[kind][len(cuts[kind]) // 2], length)
            ref = enc.ids[end : end + max(EXACT_K)]
            if end - start < 4 or len(ref) < max(EXACT_K):
                continue
            out.append({"file": rel, "kind": kind, "length": length, "prompt": enc.ids[start:end], "reference": ref})
    return out


def loop_marks(tokens: list[int], n: int) -> int:
    """Number of tokens inside an n-gram loop (see the module docstring)."""
    marked = [False] * len(tokens)
    seen: set[tuple[int, ...]] = set()
    for i in range(len(tokens) - n + 1):
        gram = tuple(tokens[i : i + n])
        if gram in seen:
            marked[i : i + n] = [True] * n
        seen.add(gram)
    return sum(marked)


def configurations(block: int, threshold: float, has_lora: bool, lora_off: bool,
                   has_denoise_lora: bool = False) -> list[tuple[str, DecodeParams]]:
    """ar; self_spec with the draft LoRA (and without it: `lora_off` or no adapter); diffusion with
    the denoise adapter when one is loaded (and without it with `lora_off`)."""
    confs = [("ar", DecodeParams(mode="ar"))]
    if lora_off or not has_lora:
        confs.append((f"self_spec B{block}", DecodeParams(mode="self_spec", block_length=block, draft_lora=False)))
    if has_lora:
        confs.append((f"self_spec B{block} +LoRA", DecodeParams(mode="self_spec", block_length=block, draft_lora=True)))
    if lora_off and has_denoise_lora:
        confs.append((f"diffusion B{block} tau{threshold} no adapter", DecodeParams(
            mode="diffusion", block_length=block, threshold=threshold, denoise_lora=False)))
    confs.append((f"diffusion B{block} tau{threshold}", DecodeParams(mode="diffusion", block_length=block,
                                                                     threshold=threshold)))
    return confs


def _summarise(records: list[dict]) -> dict:
    tokens = sum(r["tokens"] for r in records)
    forwards = sum(r["forwards"] for r in records)
    row = {"prompts": len(records), "tokens": tokens, "forwards": forwards, "tpf": tokens / max(forwards, 1),
           "loop_share": sum(r["loop"] for r in records) / max(tokens, 1),
           "same_as_ar": sum(r["same"] for r in records)}
    if records and "prefix" in records[0]:
        for k in EXACT_K:
            row[f"exact@{k}"] = sum(r["prefix"] >= k for r in records) / len(records)
        row["mean_prefix"] = sum(r["prefix"] for r in records) / len(records)
    return row


def evaluate(model_dir: Path, *, lengths=(8, 32, 96, 200), new_tokens: int = 64, block: int = 16,
             threshold: float = 0.9, ngram: int = 8, lora: bool | None = None, lora_off: bool = False,
             device: str = "cpu", lib: Path | None = None, max_files: int = 0, heldout_loss: bool = True) -> dict:
    """Run every configuration on every prompt of `heldout_prompt_set`; the dict of the JSON."""
    t0 = time.perf_counter()
    engine = Engine.from_pretrained(model_dir, device=device, dtype="float32", lora=lora,
                                    denoise_lora=False if lora is False else None, max_block_length=block)
    prompts = heldout_prompt_set(model_dir, lengths, lib, max_files)
    ar_out: list[list[int]] = []
    groups: dict[str, dict[str, dict]] = {"all": {}, "by_kind": {}, "by_length": {}}
    for name, base in configurations(block, threshold, engine.has_lora, lora_off, engine.has_denoise_lora):
        params = base.with_(max_new_tokens=new_tokens, ignore_eos=True)
        recs = []
        for i, p in enumerate(prompts):
            out = engine.generate(p["prompt"], params)
            ids = out.token_ids
            rec = {"kind": p["kind"], "length": p["length"], "tokens": len(ids), "forwards": out.forward_passes,
                   "loop": loop_marks(ids, ngram)}
            ref = p["reference"]
            rec["prefix"] = next((k for k in range(len(ref)) if k >= len(ids) or ids[k] != ref[k]), len(ref))
            if name == "ar":
                ar_out.append(ids)
                rec["same"] = 1
            else:
                rec["same"] = int(ids == ar_out[i])
            recs.append(rec)
        groups["all"][name] = _summarise(recs)
        for kind in KINDS:
            groups["by_kind"].setdefault(kind, {})[name] = _summarise([r for r in recs if r["kind"] == kind])
        for length in lengths:
            groups["by_length"].setdefault(str(length), {})[name] = _summarise(
                [r for r in recs if r["length"] == length])
    res = {"model": str(model_dir), "prompts": len(prompts), "files": len({p["file"] for p in prompts}),
           "lengths": list(lengths), "new_tokens": new_tokens, "block": block, "threshold": threshold,
           "ngram": ngram, **groups}
    if heldout_loss:
        res["heldout_ar_loss"] = heldout_ar_loss(engine.model, model_dir, lib)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


def heldout_ar_loss(model, model_dir: Path, lib: Path | None) -> float:
    """The model card's held-out loss: 32 evenly spaced 256-token windows of the held-out stream."""
    from tokenizers import Tokenizer

    from . import train_tiny as tt

    split = json.loads((model_dir / "split.json").read_text())
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    lib = lib or tt.stdlib_dir()
    stream = tt.encode_files(tok, [tt.read_text(lib, f) for f in split["heldout"]])
    loss = tt.heldout_ar_loss(model, stream, 256, 32, next(model.parameters()).device)
    model.eval()
    return loss


def format_table(res: dict) -> str:
    names = list(res["all"])
    head = f"{'group':16s} {'n':>4s} " + " ".join(f"{n[:22]:>22s}" for n in names)
    lines = [f"{res['model']}: {res['prompts']} held-out prompts from {res['files']} files, {res['new_tokens']} new "
             f"tokens, greedy, block {res['block']}, tau {res['threshold']}; cells: TPF / loop share "
             f"({res['ngram']}-gram) / == AR", head]

    def row(label: str, group: dict) -> str:
        n = group[names[0]]["prompts"]
        cells = [f"{g['tpf']:5.2f} / {g['loop_share']:.2f} / {g['same_as_ar']:3d}" for g in group.values()]
        return f"{label:16s} {n:4d} " + " ".join(f"{c:>22s}" for c in cells)

    lines.append(row("all", res["all"]))
    for kind, group in res["by_kind"].items():
        lines.append(row(kind, group))
    for length, group in res["by_length"].items():
        lines.append(row(f"length {length}", group))
    for name, g in res["all"].items():
        if name == "ar" or name.startswith("diffusion"):
            lines.append(f"{name} vs the file's real continuation: "
                         + ", ".join(f"exact@{k} {g[f'exact@{k}']:.2f}" for k in EXACT_K)
                         + f", mean matching prefix {g['mean_prefix']:.2f} tokens")
    if "heldout_ar_loss" in res:
        lines.append(f"held-out AR loss {res['heldout_ar_loss']:.3f} nats/token; {res['seconds']:.0f} s")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description="all-position held-out evaluation of the tiny NLD")
    p.add_argument("--model", type=Path, default=Path("models/nld-tiny-pystdlib"))
    p.add_argument("--lengths", default="8,32,96,200")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--block", type=int, default=16)
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--ngram", type=int, default=8)
    p.add_argument("--lora-off", action="store_true",
                   help="also run self_spec without the draft LoRA and diffusion without the denoise adapter")
    p.add_argument("--no-lora", action="store_true", help="load neither linear_spec_lora/ nor diffusion_lora/")
    p.add_argument("--max-files", type=int, default=0, help="only the first N held-out files (tests)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--lib", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = evaluate(args.model, lengths=tuple(int(x) for x in args.lengths.split(",")), new_tokens=args.new_tokens,
                   block=args.block, threshold=args.threshold, ngram=args.ngram,
                   lora=False if args.no_lora else None, lora_off=args.lora_off, device=args.device,
                   lib=args.lib, max_files=args.max_files)
    print(format_table(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
