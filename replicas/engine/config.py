"""Parse and validate an NLD `config.json` (the model's own facts, nothing about serving).

Contract: `ModelConfig.from_dict` / `load_model_config` accept the keys of NLD.md section 1
and raise `ConfigError` (a `ValueError`) naming the offending key for a missing required key
or an unsupported value. Non-goals: no defaults for serving limits (see `EngineConfig`), no
environment reads.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config.json key is missing or holds an unsupported value."""


_REQUIRED = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "mask_token_id",
    "eos_token_id",
    "max_position_embeddings",
)
_POSITIVE_INTS = _REQUIRED[:6] + ("max_position_embeddings",)
SUPPORTED_ROPE_TYPES = ("default", "yarn")


@dataclass(frozen=True)
class RopeConfig:
    """RoPE parameters: `default` or `yarn` (as Hugging Face computes them) plus the Llama-4 query scale."""

    rope_type: str
    rope_theta: float
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    llama_4_scaling_beta: float = 0.0

    def resolved_attention_factor(self) -> float:
        """cos/sin multiplier (1.0 for NLD: mscale == mscale_all_dim)."""
        if self.rope_type != "yarn":
            return 1.0
        if self.attention_factor is not None:
            return float(self.attention_factor)

        def get_mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if self.mscale and self.mscale_all_dim:
            return get_mscale(self.factor, self.mscale) / get_mscale(self.factor, self.mscale_all_dim)
        return get_mscale(self.factor)


@dataclass(frozen=True)
class ModelConfig:
    """The NLD architecture, validated at construction."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    mask_token_id: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    block_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeConfig
    tie_word_embeddings: bool = False
    torch_dtype: str = "bfloat16"
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        for key in _REQUIRED:
            if key not in d or d[key] is None:
                raise ConfigError(f"config.json: missing required key {key!r}")
        for key in _POSITIVE_INTS:
            _positive_int(d, key)
        heads, kv_heads = d["num_attention_heads"], d["num_key_value_heads"]
        if heads % kv_heads:
            raise ConfigError(
                f"config.json: 'num_attention_heads' ({heads}) must be a multiple of "
                f"'num_key_value_heads' ({kv_heads})"
            )
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        if not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
            raise ConfigError(f"config.json: 'head_dim' must be a positive even integer, got {head_dim!r}")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"config.json: unsupported 'hidden_act' {act!r} (NLD uses 'silu')")
        paradigm = d.get("dlm_paradigm", "bidirectional")
        if paradigm != "bidirectional":
            raise ConfigError(f"config.json: unsupported 'dlm_paradigm' {paradigm!r} (expected 'bidirectional')")
        eos = d["eos_token_id"]
        eos_ids = tuple(eos) if isinstance(eos, list) else (eos,)
        vocab = d["vocab_size"]
        for name, value in [("mask_token_id", d["mask_token_id"])] + [("eos_token_id", e) for e in eos_ids]:
            if not isinstance(value, int) or not 0 <= value < vocab:
                raise ConfigError(f"config.json: {name!r} = {value!r} is outside the vocabulary [0, {vocab})")
        block = d.get("block_size", 32)
        if not isinstance(block, int) or block < 2:
            raise ConfigError(f"config.json: 'block_size' must be an integer >= 2, got {block!r}")
        return cls(
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            vocab_size=vocab,
            mask_token_id=d["mask_token_id"],
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            block_size=block,
            max_position_embeddings=d["max_position_embeddings"],
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            rope=_parse_rope(d),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            torch_dtype=str(d.get("torch_dtype") or d.get("dtype") or "bfloat16"),
            raw=dict(d),
        )


def _positive_int(d: dict[str, Any], key: str) -> None:
    value = d[key]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"config.json: {key!r} must be a positive integer, got {value!r}")


def _parse_rope(d: dict[str, Any]) -> RopeConfig:
    params = d.get("rope_parameters")
    if params is None:  # legacy layout: rope_theta + rope_scaling at top level
        params = dict(d.get("rope_scaling") or {})
        if "rope_theta" in d:
            params.setdefault("rope_theta", d["rope_theta"])
        params.setdefault("rope_type", params.get("type", "default"))
    if not isinstance(params, dict) or "rope_theta" not in params:
        raise ConfigError("config.json: missing required key 'rope_parameters.rope_theta'")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"config.json: unsupported 'rope_parameters.rope_type' {rope_type!r} "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    factor = 1.0
    original = params.get("original_max_position_embeddings")
    if rope_type == "yarn":
        if original is None:
            raise ConfigError("config.json: yarn RoPE needs 'rope_parameters.original_max_position_embeddings'")
        factor = params.get("factor")
        if factor is None:
            factor = d["max_position_embeddings"] / original
        if factor <= 0:
            raise ConfigError(f"config.json: 'rope_parameters.factor' must be > 0, got {factor!r}")
    beta4 = params.get("llama_4_scaling_beta") or 0.0
    if beta4 and original is None:
        raise ConfigError(
            "config.json: 'rope_parameters.llama_4_scaling_beta' needs 'original_max_position_embeddings'"
        )
    return RopeConfig(
        rope_type=rope_type,
        rope_theta=float(params["rope_theta"]),
        factor=float(factor),
        original_max_position_embeddings=original,
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"),
        truncate=bool(params.get("truncate", True)),
        llama_4_scaling_beta=float(beta4),
    )


def load_model_config(model_dir: str | Path) -> ModelConfig:
    """Read `<model_dir>/config.json`."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {model_dir}")
    with path.open() as f:
        return ModelConfig.from_dict(json.load(f))
