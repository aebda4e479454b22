"""Load an NLD checkpoint directory into an `NLDModel`: weights once, memory-mapped, validated.

Contract: `load_model(dir, device, dtype)` reads `config.json` and either `model.safetensors`
or `model.safetensors.index.json` (shards), checks every tensor name and shape against the
architecture before anything is materialised, and raises `CheckpointError` naming the tensor
(and both shapes) for a missing, unexpected or mis-shaped tensor. The model is built on the
meta device and each tensor is read once, straight into its final device and dtype.
`load_lora(dir, cfg)` reads a PEFT adapter (`adapter_config.json`, `adapter_model.safetensors`)
that targets `o_proj` and returns per-layer (A, scale * B).
Non-goals: downloading from a hub, quantised formats.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open

from .config import ModelConfig, load_model_config
from .model import NLDModel
from .rope import compute_inv_freq

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LORA_SUBDIR = "linear_spec_lora"
DIFFUSION_LORA_SUBDIR = "diffusion_lora"  # ours: the tiny model's denoise-pass adapter (docs/TRAINING.md)


class CheckpointError(ValueError):
    """The checkpoint's tensors do not match the architecture in its config.json."""


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r} (choose one of {', '.join(DTYPES)})")
    return DTYPES[dtype]


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name of the NLD format with its shape."""
    h, d = cfg.hidden_size, cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "encoder.embed_tokens.weight": (cfg.vocab_size, h),
        "encoder.norm.weight": (h,),
    }
    if not cfg.tie_word_embeddings:
        shapes["diffusion_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_hidden_layers):
        p = f"encoder.layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = (cfg.num_attention_heads * d, h)
        shapes[p + "self_attn.k_proj.weight"] = (cfg.num_key_value_heads * d, h)
        shapes[p + "self_attn.v_proj.weight"] = (cfg.num_key_value_heads * d, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, cfg.num_attention_heads * d)
        shapes[p + "mlp.gate_proj.weight"] = (cfg.intermediate_size, h)
        shapes[p + "mlp.up_proj.weight"] = (cfg.intermediate_size, h)
        shapes[p + "mlp.down_proj.weight"] = (h, cfg.intermediate_size)
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
    return shapes


def _weight_files(model_dir: Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file that holds it."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / fname for name, fname in weight_map.items()}
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(f"{model_dir}: neither model.safetensors nor model.safetensors.index.json")
    with safe_open(str(single), framework="pt") as f:
        return {name: single for name in f.keys()}


def load_model(model_dir: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32") -> NLDModel:
    model_dir = Path(model_dir)
    cfg = load_model_config(model_dir)
    torch_dtype = resolve_dtype(dtype)
    files = _weight_files(model_dir)
    expected = expected_shapes(cfg)
    missing = sorted(set(expected) - set(files))
    if missing:
        raise CheckpointError(f"missing tensor {missing[0]!r} (expected shape {expected[missing[0]]})"
                              + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    unexpected = sorted(set(files) - set(expected))
    if unexpected:
        raise CheckpointError(f"unexpected tensor {unexpected[0]!r} in {files[unexpected[0]].name}"
                              + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""))
    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    for path, names in by_file.items():  # validate every shape before reading any data
        with safe_open(str(path), framework="pt") as f:
            for name in names:
                shape = tuple(f.get_slice(name).get_shape())
                if shape != expected[name]:
                    raise CheckpointError(
                        f"tensor {name!r} has shape {shape}, expected {expected[name]} from config.json"
                    )
    with torch.device("meta"):
        model = NLDModel(cfg)
    state: dict[str, torch.Tensor] = {}
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for name in names:
                state[name] = f.get_tensor(name).to(torch_dtype)
    if cfg.tie_word_embeddings:
        state["diffusion_head.weight"] = state["encoder.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.inv_freq = compute_inv_freq(cfg.rope, cfg.head_dim).to(device)
    return model.eval().requires_grad_(False)


def load_lora(adapter_dir: str | Path, cfg: ModelConfig, device, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer o_proj deltas (A [r, in], scale * B [out, r]) from a PEFT adapter directory."""
    adapter_dir = Path(adapter_dir)
    conf_path = adapter_dir / "adapter_config.json"
    weights = adapter_dir / "adapter_model.safetensors"
    if not conf_path.is_file() or not weights.is_file():
        raise CheckpointError(f"{adapter_dir}: a PEFT adapter needs adapter_config.json and adapter_model.safetensors")
    conf = json.loads(conf_path.read_text())
    targets = conf.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    if list(targets) != ["o_proj"]:
        raise CheckpointError(f"{conf_path}: target_modules must be ['o_proj'], got {targets!r}")
    r = int(conf.get("r", 0))
    if r <= 0:
        raise CheckpointError(f"{conf_path}: 'r' must be a positive integer, got {conf.get('r')!r}")
    alpha = float(conf.get("lora_alpha", r))
    scale = alpha / math.sqrt(r) if conf.get("use_rslora") else alpha / r
    inner = cfg.num_attention_heads * cfg.head_dim
    deltas = []
    with safe_open(str(weights), framework="pt", device=str(device)) as f:
        names = {n.removeprefix("base_model.model."): n for n in f.keys()}
        for i in range(cfg.num_hidden_layers):
            stem = f"encoder.layers.{i}.self_attn.o_proj"
            pair = []
            for part, shape in (("lora_A", (r, inner)), ("lora_B", (cfg.hidden_size, r))):
                key = f"{stem}.{part}.weight"
                if key not in names:
                    raise CheckpointError(f"{weights}: missing LoRA tensor {'base_model.model.' + key!r}")
                t = f.get_tensor(names[key])
                if tuple(t.shape) != shape:
                    raise CheckpointError(f"LoRA tensor {key!r} has shape {tuple(t.shape)}, expected {shape}")
                pair.append(t)
            deltas.append((pair[0].to(dtype), (pair[1].float() * scale).to(dtype)))
        extra = [n for n in names if not n.startswith("encoder.layers.") or ".self_attn.o_proj.lora_" not in n]
        if extra:
            raise CheckpointError(f"{weights}: unexpected LoRA tensor {names[extra[0]]!r}")
    return deltas
