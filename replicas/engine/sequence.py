"""One request's decoding state, shared by every mode, and the forward-pass request a mode makes.

Contract: between cycles every sequence satisfies ONE invariant, whatever its mode: the KV
cache holds the verified prefix [0, kv.length), and `pending` is the last emitted token, sitting
at position kv.length and not yet cached. Prefill establishes it; each mode's cycle restores
it. That shared boundary is what lets a request change mode between cycles.
`emit` appends final tokens and applies EOS, stop ids and `max_new_tokens`.
Non-goals: choosing tokens (see `sampling`), running the model (see `runner`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kv_cache import SequenceKV
from .model import DRAFT_ADAPTER
from .params import DecodeParams


@dataclass
class ForwardPass:
    """What a sequence needs from the next batched forward."""

    tokens: list[int]  # [T] token ids, tokens[0] at position `start`
    start: int
    causal: bool  # False: bidirectional over these tokens (plus the whole cached prefix)
    lora: bool = False  # apply the o_proj adapter `adapter` (self-spec drafts; diffusion denoise passes)
    all_logits: bool = True  # False: only the last position's logits are needed
    mask: torch.Tensor | None = None  # [T, T] bool: which of this pass's tokens each token sees
    # (overrides `causal`; the cached prefix is always visible; each query must see something)
    # [T] RoPE positions; None: start + i. Token i is STORED at column start + i whatever its
    # position (quadratic self-spec puts several mask groups at overlapping positions)
    positions: list[int] | None = None
    lora_tokens: list[bool] | None = None  # [T] per-token LoRA (overrides `lora`)
    adapter: int = DRAFT_ADAPTER  # which adapter `lora` / `lora_tokens` turn on (model.DRAFT_ADAPTER, DENOISE_ADAPTER)

    @property
    def wants_lora(self) -> bool:
        return any(self.lora_tokens) if self.lora_tokens is not None else self.lora

    def lora_weights(self) -> list[float]:
        """[T] the adapter id where the o_proj adapter applies, else 0.0 (`AttentionInputs.lora_weight`)."""
        on = self.lora_tokens if self.lora_tokens is not None else [self.lora] * len(self.tokens)
        return [float(self.adapter) if x else 0.0 for x in on]


class Sequence:
    def __init__(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: DecodeParams,
        *,
        kv: SequenceKV,
        eos_token_ids: tuple[int, ...],
        mask_token_id: int,
        generator: torch.Generator | None,
    ) -> None:
        self.request_id = request_id
        self.arrival = 0  # submission order: the scheduler's FCFS key and preemption victim order
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.kv = kv
        self.mask_token_id = mask_token_id
        self.generator = generator
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
        self.pending: int | None = None
        self.output: list[int] = []
        self.finish_reason: str | None = None
        self.forward_passes = 0  # after prefill
        self.accepted_lengths: list[int] = []
        self.draft_blocks: list[int] = []  # self-spec block length of each cycle
        self.downgraded = False  # moved from self_spec to ar by a load policy
        self.denoise_passes: list[int] = []

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def emit(self, tokens: list[int]) -> list[int]:
        """Append final tokens until a stop condition; returns the tokens actually appended."""
        out: list[int] = []
        for tok in tokens:
            if self.finished:
                break
            self.output.append(tok)
            out.append(tok)
            if tok in self.stop_ids:
                self.finish_reason = "stop"
            elif len(self.output) >= self.params.max_new_tokens:
                self.finish_reason = "length"
        if out:
            self.pending = out[-1]
        return out
