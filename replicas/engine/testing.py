"""Tiny checkpoints in the real NLD format, for tests, benchmarks and training.

A `testing` module inside the package because users need it, not only tests: `make bench`
writes its random-weights bench model with it, `training/` builds the tiny model's config and
tokenizer with it, and `benchmarks/gpu_check.py` builds random configs on a GPU host.

Contract: `write_random_checkpoint(out_dir, ...)` writes `config.json` (yarn `rope_parameters`
as the 8B has them), `model.safetensors` with the NLD tensor names (or shards plus
`model.safetensors.index.json` with `shards > 1`), `tokenizer.json` + `tokenizer_config.json`
(a byte-level tokenizer with the NLD special ids and a simple chat template) and, with
`lora_rank > 0`, a PEFT `linear_spec_lora/` adapter on `o_proj` (`denoise_lora_rank > 0`: also a
`diffusion_lora/` one). Deterministic in `seed`.
Non-goals: meaningful weights (see `training/` for a trained tiny model).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import ModelConfig
from .loader import DIFFUSION_LORA_SUBDIR, DTYPES, LORA_SUBDIR, expected_shapes

BOS_ID, EOS_ID, MASK_ID = 1, 11, 100
N_SPECIAL = 128  # ids [0, 128) are special tokens; the 256 byte tokens follow
SPECIAL_NAMES = {0: "<unk>", BOS_ID: "<s>", 2: "<pad>", EOS_ID: "</s>", MASK_ID: "<mask>"}
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def random_config(
    *, layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=512, block_size=8,
    dtype="float32", max_position_embeddings=4096, rope_factor=4.0,
) -> dict:
    return {
        "architectures": ["NemotronLabsDiffusionModel"],
        "model_type": "nemotron_labs_diffusion",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "mask_token_id": MASK_ID,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "block_size": block_size,
        "dlm_paradigm": "bidirectional",
        "max_position_embeddings": max_position_embeddings,
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 1_000_000.0,
            "factor": rope_factor,
            "original_max_position_embeddings": int(max_position_embeddings / rope_factor),
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "llama_4_scaling_beta": 0.1,
        },
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
    }


def random_state_dict(cfg: ModelConfig, seed: int, init_std: float = 0.02) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in expected_shapes(cfg).items():
        if name.endswith("norm.weight"):
            state[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            state[name] = init_std * torch.randn(shape, generator=g)
    return state


def write_tokenizer(out_dir: Path, vocab_size: int) -> None:
    """A byte-level tokenizer: special ids [0, 128), bytes [128, 384), unused ids above."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    if vocab_size < N_SPECIAL + 256:
        raise ValueError(f"the test tokenizer needs vocab_size >= {N_SPECIAL + 256}, got {vocab_size}")
    byte_of = _gpt2_byte_table()
    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet(), key=byte_of.__getitem__)
    vocab = {SPECIAL_NAMES.get(i, f"<special_{i}>"): i for i in range(N_SPECIAL)}
    vocab.update({ch: N_SPECIAL + i for i, ch in enumerate(byte_chars)})
    vocab.update({f"<unused_{i}>": i for i in range(N_SPECIAL + 256, vocab_size)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([SPECIAL_NAMES.get(i, f"<special_{i}>") for i in range(N_SPECIAL)])
    tok.save(str(out_dir / "tokenizer.json"))
    write_tokenizer_config(out_dir)


def write_tokenizer_config(out_dir: Path) -> None:
    """`tokenizer_config.json` with the NLD special tokens and the simple chat template."""
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
        "mask_token": "<mask>", "add_bos_token": False, "chat_template": CHAT_TEMPLATE,
        "model_max_length": 4096,
    }, indent=2))


def _gpt2_byte_table() -> dict[str, int]:
    """The byte-level pre-tokenizer's printable character for each byte value, inverted."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def write_random_checkpoint(
    out_dir: str | Path,
    *,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 16,
    intermediate: int = 128,
    vocab: int = 512,
    block_size: int = 8,
    seed: int = 0,
    dtype: str = "float32",
    lora_rank: int = 0,
    lora_alpha: float | None = None,
    denoise_lora_rank: int = 0,
    init_std: float = 0.02,
    shards: int = 1,
    tokenizer: bool = True,
) -> Path:
    """Write a random NLD checkpoint; returns its directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw = random_config(layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                        intermediate=intermediate, vocab=vocab, block_size=block_size, dtype=dtype)
    cfg = ModelConfig.from_dict(raw)
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    state = {k: v.to(DTYPES[dtype]).contiguous() for k, v in random_state_dict(cfg, seed, init_std).items()}
    if shards <= 1:
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        names = list(state)
        weight_map = {}
        for i in range(shards):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: state[n] for n in names[i::shards]}
            save_file(part, str(out / fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in part})
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if tokenizer:
        write_tokenizer(out, vocab)
    if lora_rank > 0:
        write_random_lora(out / LORA_SUBDIR, cfg, rank=lora_rank, alpha=lora_alpha or 4.0 * lora_rank, seed=seed + 1)
    if denoise_lora_rank > 0:
        write_random_lora(out / DIFFUSION_LORA_SUBDIR, cfg, rank=denoise_lora_rank, alpha=4.0 * denoise_lora_rank,
                          seed=seed + 2)
    return out


def write_random_lora(out_dir: Path, cfg: ModelConfig, *, rank: int, alpha: float, seed: int) -> Path:
    """A PEFT adapter on o_proj with random A and B (B non-zero so the delta is visible)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    inner = cfg.num_attention_heads * cfg.head_dim
    tensors = {}
    for i in range(cfg.num_hidden_layers):
        stem = f"base_model.model.encoder.layers.{i}.self_attn.o_proj"
        tensors[f"{stem}.lora_A.weight"] = 0.05 * torch.randn(rank, inner, generator=g)
        tensors[f"{stem}.lora_B.weight"] = 0.05 * torch.randn(cfg.hidden_size, rank, generator=g)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out_dir / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": ["o_proj"],
        "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM", "use_rslora": False,
    }, indent=2))
    return out_dir
