"""Rotary position embeddings for NLD: `default` and YaRN inverse frequencies (Hugging Face's
formulas), cos/sin computed on the fly from absolute positions, and the Llama-4 query scale.

Contract: pure functions of `RopeConfig` and position tensors; no caching of tables (positions
can reach 262144, so tables are computed per call from the positions actually used).
"""

from __future__ import annotations

import math

import torch

from .config import RopeConfig


def compute_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] in float32."""
    dim = head_dim
    base = rope.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)  # [D/2]
    inv_extra = 1.0 / pos_freqs
    if rope.rope_type == "default":
        return inv_extra
    inv_inter = 1.0 / (rope.factor * pos_freqs)
    orig = rope.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extra_factor = 1 - ramp
    return inv_inter * (1 - extra_factor) + inv_extra * extra_factor


def rotary_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, attention_factor: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [B, T] -> cos, sin [B, 1, T, head_dim] (broadcast over heads)."""
    freqs = positions.to(torch.float32)[..., None] * inv_freq  # [B, T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, D]
    cos = (emb.cos() * attention_factor).to(dtype)
    sin = (emb.sin() * attention_factor).to(dtype)
    return cos[:, None], sin[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D] rotated by the half-split convention."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def llama4_query_scale(positions: torch.Tensor, rope: RopeConfig) -> torch.Tensor | None:
    """Per-position query multiplier [B, 1, T, 1], or None when the scale is disabled."""
    if not rope.llama_4_scaling_beta:
        return None
    orig = rope.original_max_position_embeddings
    scale = 1 + rope.llama_4_scaling_beta * torch.log1p(torch.floor(positions.to(torch.float32) / orig))
    return scale[:, None, :, None]
