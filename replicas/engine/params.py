"""Per-request decoding parameters and the result of one generation.

Contract: `DecodeParams` validates everything it can on its own at construction and raises
`ValueError` with the field name; checks that need the model (vocabulary, block limit,
positions) happen in `Engine.check_request`. Non-goals: OpenAI field names (the gateway maps
them), tokenisation.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

# the one vocabulary (a torch-free leaf module); self_spec algorithms: two forwards per cycle, or one (NLD.md)
from replicas.wire import MODES, SPEC_ALGORITHMS, tokens_per_forward


@dataclass(frozen=True)
class DecodeParams:
    mode: str = "ar"
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    block_length: int | None = None  # diffusion canvas / self-spec draft; None = config block_size
    threshold: float = 0.9  # diffusion confidence threshold
    draft_lora: bool | None = None  # self-spec draft LoRA; None = on when an adapter is loaded
    denoise_lora: bool | None = None  # diffusion denoise-pass adapter (diffusion_lora/); None = on when loaded
    spec_algorithm: str | None = None  # self_spec: "linear" | "quadratic"; None = EngineConfig's default

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode: unknown decoding mode {self.mode!r} (choose one of {', '.join(MODES)})")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be an integer >= 1, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature: must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k: must be an integer >= 0, got {self.top_k!r}")
        if self.block_length is not None and (not isinstance(self.block_length, int) or self.block_length < 2):
            raise ValueError(f"block_length: must be an integer >= 2, got {self.block_length!r}")
        if self.spec_algorithm is not None and self.spec_algorithm not in SPEC_ALGORITHMS:
            raise ValueError(f"spec_algorithm: unknown self-speculation algorithm {self.spec_algorithm!r} "
                             f"(choose one of {', '.join(SPEC_ALGORITHMS)})")
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"threshold: must be in [0, 1], got {self.threshold!r}")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def with_(self, **changes) -> "DecodeParams":
        return replace(self, **changes)


@dataclass
class GenerationOutput:
    token_ids: list[int]
    finish_reason: str  # a replicas.wire.FinishReason: "stop" | "length"
    forward_passes: int  # forward passes after prefill (NFE)
    mode: str
    prompt_tokens: int
    spec_algorithm: str | None = None  # self_spec: the algorithm that ran
    accepted_lengths: list[int] = field(default_factory=list)  # self_spec: accepted drafts per cycle
    denoise_passes: list[int] = field(default_factory=list)  # diffusion: denoise passes per block
    seconds: float = 0.0

    @property
    def tokens_per_forward(self) -> float:
        return tokens_per_forward(len(self.token_ids), self.forward_passes)
