"""`ReplicaConfig`: everything one Ray Serve replica needs, validated at construction.

Contract: built by the entry point (CLI, `build_app` from Serve config `args`, Helm values)
and passed down; nothing below reads the environment. `engine_config()` gives the engine's
`EngineConfig`. Importable without torch or ray.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .wire import DraftTierModel, SpecAlgorithm


class EngineLimits(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_batch_size: int = Field(default=32, ge=1, description="KV slots: sequences decoded at once")
    max_seq_len: int = Field(default=2048, ge=16, description="cache columns per slot (prompt + output + one block)")
    max_waiting: int = Field(default=256, ge=0, description="queued requests beyond this get 429")
    max_block_length: int | None = Field(default=None, ge=2, description="None: the model's block_size")
    prefill_chunk: int = Field(default=512, ge=1)
    draft_tiers: list[DraftTierModel] = Field(default_factory=list)
    cuda_graphs: bool = Field(default=True, description="on CUDA: replay decode-sized passes from CUDA graphs")
    kv_block_size: int = Field(default=16, ge=1, description="columns per KV block")
    num_kv_blocks: int | None = Field(default=None, ge=1, description="None: measured on CUDA, else the contiguous size")
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1, description="share of GPU memory for the engine")
    kv_watermark: float = Field(default=0.01, ge=0, lt=1, description="share of KV blocks admission keeps free")
    enable_prefix_caching: bool = Field(default=True, description="share full prompt blocks between requests")
    max_num_batched_tokens: int | None = Field(default=None, ge=1, description="tokens per engine step: every "
                                               "running request's pass first, then prefill chunks; None: 512 on a "
                                               "CPU, 2048 on CUDA (replicas.engine.engine_config.STEP_TOKENS)")
    spec_algorithm: SpecAlgorithm = Field(default="linear", description="self_spec requests that name none")
    quadratic_block_length: int = Field(default=8, ge=2, description="quadratic self-spec block when a request "
                                        "names none (a cycle is B (B + 1) tokens)")
    parallel_min_tokens: int = Field(default=16, ge=0, description="on a CPU: an engine step of fewer tokens runs "
                                     "on one torch thread (the other cores stay free for the serving processes), "
                                     "larger steps on all; 0: every step on all")
    onednn_linears: bool = Field(default=True, description="float32 on a CPU: passes of several rows multiply "
                                 "oneDNN-packed weights (a second copy of each linear weight in memory); false: "
                                 "one copy, MKL only")


class ReplicaConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model_path: str = Field(description="NLD checkpoint directory on the replica's filesystem")
    model_name: str = Field(default="nld", description="the model id clients send")
    lora_path: str | None = Field(default=None, description="draft LoRA dir; None: <model>/linear_spec_lora if present")
    use_lora: bool = Field(default=True, description="load the model's adapters: the draft LoRA and, where the "
                           "model has one, the denoise adapter (diffusion_lora/)")
    device: Literal["cpu", "cuda"] = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    engine: EngineLimits = Field(default_factory=EngineLimits)
    max_prompt_tokens: int | None = Field(default=None, ge=1, description="None: max_seq_len minus one block")
    torch_threads: int | None = Field(default=None, ge=1, description="CPU threads for torch in the replica's engine; "
                                       "None: Ray's OMP_NUM_THREADS, which it sets to the replica's num_cpus")
    engine_process: bool = Field(default=True, description="run the engine loop in its own process (off the "
                                 "serving process's GIL); false: on a thread of the replica process")
    engine_cpus: list[int] | None = Field(default=None, min_length=1, description="CPU ids the engine process and "
                                          "all its threads are bound to (Linux affinity), e.g. [0] to keep the "
                                          "machine's other CPUs for the serving processes, as vLLM's CPU backend "
                                          "does; its torch threads default to one per CPU. None: the replica's "
                                          "CPUs. Needs engine_process")
    stall_timeout_s: float = Field(default=120.0, gt=0, description="the replica reports unhealthy when its engine "
                                   "made no progress this long with requests in flight")
    stream_interval_ms: float = Field(default=0.0, ge=0, description="streamed chunks at most this often; tokens "
                                      "made meanwhile join the next chunk (0: a chunk per engine step, merged "
                                      "only while the handler is behind)")
    stream_flush_tokens: int = Field(default=0, ge=0, description="with stream_interval_ms: send a chunk at once when "
                                     "this many tokens wait (0: only the interval)")
    advertise_address: bool = Field(default=True, description="name this replica's own HTTP address on every answer "
                                     "(`x-nld-replica`), so a gateway may send to it directly; set false when "
                                     "requests reach the replica through Serve's Python proxy (no own port)")

    @model_validator(mode="after")
    def _check(self) -> "ReplicaConfig":
        if self.max_prompt_tokens is not None and self.max_prompt_tokens >= self.engine.max_seq_len:
            raise ValueError("max_prompt_tokens must be below engine.max_seq_len")
        if self.engine_cpus is not None:
            if not self.engine_process:
                raise ValueError("engine_cpus binds the engine process: it needs engine_process: true")
            if min(self.engine_cpus) < 0 or len(set(self.engine_cpus)) != len(self.engine_cpus):
                raise ValueError(f"engine_cpus must be distinct CPU ids >= 0, got {self.engine_cpus}")
        return self

    def engine_threads(self) -> int | None:
        """The engine's torch threads: `torch_threads`, else one per bound CPU, else None (Ray's)."""
        return self.torch_threads or (len(self.engine_cpus) if self.engine_cpus else None)

    def engine_config(self):
        from replicas.engine import DraftTier, EngineConfig  # torch only where the engine is built

        e = self.engine
        return EngineConfig(
            max_batch_size=e.max_batch_size, max_seq_len=e.max_seq_len, max_waiting=e.max_waiting,
            max_block_length=e.max_block_length, prefill_chunk=e.prefill_chunk,
            draft_tiers=tuple(DraftTier(t.max_running, t.block_length) for t in e.draft_tiers),
            device=self.device, dtype=self.dtype, cuda_graphs=e.cuda_graphs,
            kv_block_size=e.kv_block_size, num_kv_blocks=e.num_kv_blocks,
            gpu_memory_utilization=e.gpu_memory_utilization, kv_watermark=e.kv_watermark,
            enable_prefix_caching=e.enable_prefix_caching, max_num_batched_tokens=e.max_num_batched_tokens,
            spec_algorithm=e.spec_algorithm, quadratic_block_length=e.quadratic_block_length,
            parallel_min_tokens=e.parallel_min_tokens, onednn_linears=e.onednn_linears,
        )
