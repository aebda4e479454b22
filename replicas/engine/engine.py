"""`Engine`: one loaded NLD model that decodes a request in any of the three modes.

Contract: `Engine.from_pretrained(path, device, dtype)` loads the weights once (and the draft
LoRA when present); `generate(prompt_ids, DecodeParams)` runs one request to completion and
returns a `GenerationOutput`. `check_request` validates a request against the model and raises
`ValueError` with a precise message. `generate` has no loop of its own: it submits the request
to a one-sequence `BatchEngine` (kept, with its runner, its CUDA graphs and its prefix cache,
while its `max_seq_len` is large enough) and steps it to the end; the whole prompt is one
prefill pass. A request that fails inside the engine raises `RuntimeError`.
Non-goals: concurrency (see the batched engine), tokenisation (the replica's edge does that).
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import torch

from .batch_engine import BatchEngine
from .cpu_linear import prepare_cpu_linears
from .config import ModelConfig
from .engine_config import EngineConfig
from .graph_runner import CudaGraphRunner
from .kv_cache import SequenceKV
from .loader import DIFFUSION_LORA_SUBDIR, LORA_SUBDIR, load_lora, load_model, resolve_dtype
from .model import DENOISE_ADAPTER, DRAFT_ADAPTER, NLDModel
from .params import DecodeParams, GenerationOutput
from .runner import ModelRunner
from .sequence import Sequence

_DEFAULTS = EngineConfig()


class Engine:
    def __init__(
        self,
        model: NLDModel,
        *,
        max_block_length: int | None = None,
        runner_cls: type[ModelRunner] | None = None,
        cuda_graphs: bool = True,
    ) -> None:
        """`runner_cls` None: CUDA-graph replay of small passes on a CUDA device (unless
        `cuda_graphs` is False), the eager runner elsewhere."""
        self.model = model
        self.config: ModelConfig = model.config
        self.device = model.encoder.embed_tokens.weight.device
        self.dtype = model.encoder.embed_tokens.weight.dtype
        if runner_cls is None:
            runner_cls = CudaGraphRunner if self.device.type == "cuda" and cuda_graphs else ModelRunner
        self.runner_cls = runner_cls
        self._core = None  # the one-sequence BatchEngine of `generate`, reused while big enough
        self._core_made_by = None
        self.max_block_length = max_block_length or self.config.block_size
        self._ids = itertools.count()

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        *,
        lora: str | Path | bool | None = None,
        denoise_lora: str | Path | bool | None = None,
        max_block_length: int | None = None,
        runner_cls: type[ModelRunner] | None = None,
        cuda_graphs: bool = True,
        onednn_linears: bool = True,
        fuse_projections: bool = True,
    ) -> "Engine":
        """Load `path`. `lora` (the self-spec draft adapter): None = `linear_spec_lora/` when
        present, True = it must be, False = none, or a directory; `denoise_lora` (diffusion's
        denoise-pass adapter) the same with `diffusion_lora/`. A float32 model on a CPU gets
        `cpu_linear`'s layers (oneDNN-packed weights for passes of several rows unless
        `onednn_linears` is False). `fuse_projections`: each layer's q/k/v and gate/up as one
        matmul each (`NLDModel.fuse_projections`; False keeps the checkpoint's layout, for A/Bs)."""
        model = load_model(path, device, dtype)
        if fuse_projections:
            model.fuse_projections()
        weight = model.encoder.embed_tokens.weight
        if weight.device.type == "cpu" and weight.dtype == torch.float32:  # measured faster there only
            prepare_cpu_linears(model, packed=onednn_linears)
        for choice, subdir, slot in ((lora, LORA_SUBDIR, DRAFT_ADAPTER), (denoise_lora, DIFFUSION_LORA_SUBDIR,
                                                                         DENOISE_ADAPTER)):
            adapter = Path(path) / subdir if choice is None or choice is True else choice
            if choice is True and not Path(adapter).is_dir():
                raise FileNotFoundError(f"no LoRA adapter at {adapter}")
            if adapter and Path(adapter).is_dir():
                model.set_lora(load_lora(adapter, model.config, device, resolve_dtype(dtype)), slot)
        return cls(model, max_block_length=max_block_length, runner_cls=runner_cls, cuda_graphs=cuda_graphs)

    @property
    def has_lora(self) -> bool:
        return self.model.has_lora

    @property
    def has_denoise_lora(self) -> bool:
        return self.model.has_adapter(DENOISE_ADAPTER)

    def check_request(self, prompt_ids, params: DecodeParams, defaults: EngineConfig | None = None) -> DecodeParams:
        """Validate against the model; return params with defaults resolved (the self-spec
        algorithm and the quadratic block from `defaults`, an `EngineConfig`)."""
        cfg = self.config
        defaults = defaults or _DEFAULTS
        if len(prompt_ids) == 0:
            raise ValueError("prompt_ids: the prompt is empty")
        bad = [t for t in prompt_ids if not isinstance(t, int) or not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt_ids: token id {bad[0]!r} is outside the vocabulary [0, {cfg.vocab_size})")
        bad_stop = [t for t in params.stop_token_ids if not 0 <= t < cfg.vocab_size]
        if bad_stop:
            raise ValueError(f"stop_token_ids: token id {bad_stop[0]!r} is outside the vocabulary")
        # quadratic only for requests admitted in self_spec: admission reserves its B (B + 1)
        # lookahead; a request switched into self_spec later (a downgrade's return excepted) runs linear
        algorithm = (params.spec_algorithm or defaults.spec_algorithm) if params.mode == "self_spec" else "linear"
        block = params.block_length or min(cfg.block_size, self.max_block_length)
        if params.block_length is None and algorithm == "quadratic":
            block = min(defaults.quadratic_block_length, block)
        if block > self.max_block_length:
            raise ValueError(f"block_length: {block} is above the configured limit {self.max_block_length}")
        if params.draft_lora and not self.has_lora:
            raise ValueError("draft_lora: no LoRA adapter is loaded")
        draft_lora = self.has_lora if params.draft_lora is None else params.draft_lora
        if params.denoise_lora and not self.has_denoise_lora:
            raise ValueError("denoise_lora: no denoise adapter is loaded")
        denoise_lora = self.has_denoise_lora if params.denoise_lora is None else params.denoise_lora
        ahead = 2 * block if algorithm == "quadratic" else block  # quadratic masks reach 2B - 1 past
        if len(prompt_ids) + params.max_new_tokens + ahead > cfg.max_position_embeddings:
            raise ValueError(
                f"max_new_tokens: prompt ({len(prompt_ids)}) + max_new_tokens ({params.max_new_tokens}) "
                f"+ one block exceeds max_position_embeddings ({cfg.max_position_embeddings})"
            )
        return params.with_(block_length=block, draft_lora=draft_lora, denoise_lora=denoise_lora,
                            spec_algorithm=algorithm)

    @staticmethod
    def positions_needed(prompt_len: int, max_new_tokens: int, params: DecodeParams) -> int:
        """Cache columns a request can touch: its prompt, its output and one cycle's lookahead
        (a block; B (B + 1) for quadratic self-spec, whose mask groups sit at fresh columns)."""
        return prompt_len + max_new_tokens + Engine.lookahead(params)

    @staticmethod
    def lookahead(params: DecodeParams) -> int:
        """Columns past the output one cycle may write (params resolved by `check_request`)."""
        b = params.block_length
        return b * (b + 1) if params.spec_algorithm == "quadratic" else b

    def new_sequence(self, prompt_ids, params: DecodeParams, slot: int, request_id: str | None = None) -> Sequence:
        generator = None
        if not params.greedy:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(params.seed if params.seed is not None else torch.seed())
        return Sequence(
            request_id or f"req-{next(self._ids)}",
            list(prompt_ids),
            params,
            kv=SequenceKV(slot=slot),
            eos_token_ids=self.config.eos_token_ids,
            mask_token_id=self.config.mask_token_id,
            generator=generator,
        )

    @property
    def _runner(self) -> ModelRunner | None:
        """The runner (and its CUDA graphs) `generate` last used."""
        return self._core.runner if self._core is not None else None

    def _core_for(self, max_len: int):
        """A one-sequence `BatchEngine` of at least `max_len` columns: the last one when it is big
        enough (its graphs stay captured, its prefix cache warm), else a new one."""
        old = self._core
        stale = old is None or self._core_made_by is not self.runner_cls or old.has_work()  # has_work: interrupted
        if stale or old.config.max_seq_len < max_len:
            block = EngineConfig.kv_block_size
            config = EngineConfig(max_batch_size=1, max_seq_len=max_len, max_waiting=0, prefill_chunk=max_len,
                                  max_num_batched_tokens=max_len, num_kv_blocks=-(-max_len // block),
                                  max_block_length=self.max_block_length, kv_watermark=0.0)
            self._core = None  # free the old cache first
            self._core = BatchEngine(self, config)
            self._core_made_by = self.runner_cls  # a class or a factory; swapping it starts afresh
        return self._core

    def generate(self, prompt_ids, params: DecodeParams | None = None) -> GenerationOutput:
        params = self.check_request(list(prompt_ids), params or DecodeParams())
        t0 = time.perf_counter()
        core = self._core_for(self.positions_needed(len(prompt_ids), params.max_new_tokens, params))
        rid = core.submit(prompt_ids, params)
        tokens: list[int] = []
        last = None
        while last is None:
            for chunk in core.step():
                if chunk.request_id == rid:
                    tokens.extend(chunk.token_ids)
                    last = chunk if chunk.finish_reason else None
        if last.finish_reason == "error":
            raise RuntimeError(f"generation failed: {last.error}")
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        st = last.stats
        return GenerationOutput(
            token_ids=tokens,
            finish_reason=last.finish_reason,
            forward_passes=st["forward_passes"],
            mode=params.mode,
            prompt_tokens=len(prompt_ids),
            spec_algorithm=st["spec_algorithm"],
            accepted_lengths=st["accepted_lengths"],
            denoise_passes=st["denoise_passes"],
            seconds=time.perf_counter() - t0,
        )


def load_batch_engine(path: str | Path, config: EngineConfig | None = None, **load_kw) -> BatchEngine:
    """Load `path` (`Engine.from_pretrained`, `load_kw` passed on) and wrap it in a `BatchEngine`
    with `config`: its device, dtype, block limit and CUDA graphs are the config's."""
    config = config or EngineConfig()
    load_kw.setdefault("cuda_graphs", config.cuda_graphs)
    load_kw.setdefault("onednn_linears", config.onednn_linears)
    engine = Engine.from_pretrained(path, device=config.device, dtype=config.dtype,
                                    max_block_length=config.max_block_length, **load_kw)
    return BatchEngine(engine, config)
