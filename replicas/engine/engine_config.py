"""`EngineConfig`: the batched engine's limits, validated at construction.

Contract: plain data, built once at the entry point (CLI, replica builder, tests) and passed
down. Non-goals: model facts (see `ModelConfig`), reading the environment.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .params import SPEC_ALGORITHMS

# The default token budget of one step, by device. On a CPU a step costs about its tokens, so a
# closed loop's wave of prompts prefilled in one step stalls every decoding row: with 16 AR rows
# per one-thread replica (32 requests on 2 CPUs), the longest step fell from 93-96 ms at 2048 to
# 44-46 ms at 512, and p99 latency from 1.4x the median to 1.2x in one A/B (1.26x to 1.16x in
# another) at equal tokens/s (docs/PERFORMANCE.md, "A CPU step's token budget"). 512 still holds
# every row's pass of a full 32-row batch of AR or 8-token self-spec with room for prompts. A
# GPU, memory-bound at these widths, takes 2048 at little cost to the decode rows.
STEP_TOKENS = {"cpu": 512, "cuda": 2048}


@dataclass(frozen=True)
class DraftTier:
    """While at most `max_running` requests run, self-spec drafts use at most `block_length`."""

    max_running: int
    block_length: int

    def __post_init__(self) -> None:
        if self.max_running < 1:
            raise ValueError(f"draft_tiers.max_running: must be >= 1, got {self.max_running}")
        if self.block_length < 2:
            raise ValueError(f"draft_tiers.block_length: must be >= 2, got {self.block_length}")


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 32  # KV slots = sequences decoded at once
    max_seq_len: int = 2048  # cache columns one sequence may use: prompt + output + one block
    max_waiting: int = 256  # queued requests beyond this raise EngineOverloaded
    max_block_length: int | None = None  # None: the model's block_size
    prefill_chunk: int = 512  # prompts are prefilled in causal chunks of at most this many tokens
    draft_tiers: tuple[DraftTier, ...] = field(default_factory=tuple)
    device: str = "cpu"
    dtype: str = "float32"
    cuda_graphs: bool = True  # on CUDA: replay decode-sized passes from CUDA graphs
    kv_block_size: int = 16  # columns per KV block
    # KV blocks in the pool; None: measured on CUDA (gpu_memory_utilization, after the weights
    # load), else max_batch_size * ceil(max_seq_len / kv_block_size) (the contiguous cache's memory)
    num_kv_blocks: int | None = None
    gpu_memory_utilization: float = 0.9  # share of the GPU's memory for weights + activations + KV
    kv_watermark: float = 0.01  # share of the blocks admission leaves free for running sequences to grow
    enable_prefix_caching: bool = True  # share full prompt blocks between requests
    # tokens per step: every running row's pass, then prefill chunks; None: `STEP_TOKENS` by device
    max_num_batched_tokens: int | None = None
    spec_algorithm: str = "linear"  # self_spec requests that name none: "linear" | "quadratic"
    # quadratic self-spec block when a request names none (a cycle is B (B + 1) tokens, so it
    # defaults smaller than the linear block; draft tiers cap it further under load)
    quadratic_block_length: int = 8
    # on a CPU: a step of fewer tokens than this runs on one torch thread, larger ones on all
    # (`threads.step_threads`; 16 measured in docs/PERFORMANCE.md); 0: every step on all of them
    parallel_min_tokens: int = 16
    # float32 on a CPU: passes of several rows multiply oneDNN-packed weights (a second copy of
    # each linear weight, `cpu_linear`); False: one column-major copy, MKL only
    onednn_linears: bool = True

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens is None:
            device = "cuda" if self.device.startswith("cuda") else "cpu"
            object.__setattr__(self, "max_num_batched_tokens", STEP_TOKENS[device])
        for name in ("max_batch_size", "max_seq_len", "prefill_chunk", "kv_block_size", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.spec_algorithm not in SPEC_ALGORITHMS:
            raise ValueError(f"spec_algorithm: must be one of {', '.join(SPEC_ALGORITHMS)}, got {self.spec_algorithm!r}")
        if self.quadratic_block_length < 2:
            raise ValueError(f"quadratic_block_length: must be >= 2, got {self.quadratic_block_length}")
        if self.parallel_min_tokens < 0:
            raise ValueError(f"parallel_min_tokens: must be >= 0, got {self.parallel_min_tokens}")
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting: must be >= 0, got {self.max_waiting}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks: must be >= 1, got {self.num_kv_blocks}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization: must be in (0, 1], got {self.gpu_memory_utilization}")
        if not 0 <= self.kv_watermark < 1:
            raise ValueError(f"kv_watermark: must be in [0, 1), got {self.kv_watermark}")
        tiers = tuple(t if isinstance(t, DraftTier) else DraftTier(**t) for t in self.draft_tiers)
        if any(a.max_running >= b.max_running for a, b in zip(tiers, tiers[1:])):
            raise ValueError("draft_tiers: max_running must increase from one tier to the next")
        object.__setattr__(self, "draft_tiers", tiers)

    @property
    def blocks_per_seq(self) -> int:
        """KV blocks one sequence of `max_seq_len` columns needs."""
        return -(-self.max_seq_len // self.kv_block_size)

    def draft_block(self, running: int, requested: int) -> int:
        """The self-spec block for a request asking for `requested` while `running` requests run."""
        for tier in self.draft_tiers:
            if running <= tier.max_running:
                return min(requested, tier.block_length)
        return min(requested, self.draft_tiers[-1].block_length) if self.draft_tiers else requested
