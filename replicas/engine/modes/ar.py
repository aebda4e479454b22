"""Autoregressive decoding: one causal forward over `pending`, one new token per forward."""

from __future__ import annotations

import torch

from ..sequence import ForwardPass
from .base import DecodeMode


class ARMode(DecodeMode):
    name = "ar"

    def next_pass(self) -> ForwardPass:
        s = self.seq
        return ForwardPass(tokens=[s.pending], start=s.kv.length, causal=True, all_logits=False)

    def advance(self, logits: torch.Tensor, greedy: int | None = None) -> list[int]:
        s = self.seq
        s.forward_passes += 1
        s.kv.append(1)
        return s.emit([self.choose_one(logits[-1:], greedy)])
