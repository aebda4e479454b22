"""How many KV blocks a `BatchEngine` gets.

Contract: `num_kv_blocks(model, config)` is `config.num_kv_blocks` when set. Otherwise, on CUDA,
it is the number of blocks that fit in `gpu_memory_utilization` of the device's memory once the
weights are loaded and one worst-case step has run: the memory other processes and the CUDA
context hold, plus this process's peak allocation over a cache-free forward of
`min(max_num_batched_tokens, max_seq_len)` tokens with logits for all of them, are subtracted
first. Elsewhere it is `max_batch_size * ceil(max_seq_len / kv_block_size)`: the memory the
contiguous per-slot cache had, so a CPU replica's footprint does not change.
Non-goals: CUDA-graph memory (captured lazily into one pool; leave headroom in the utilization),
resizing the pool while serving.
"""

from __future__ import annotations

import torch

from .engine_config import EngineConfig
from .kv_cache import KVCache
from .model import AttentionInputs, NLDModel


def num_kv_blocks(model: NLDModel, config: EngineConfig) -> int:
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    device = model.encoder.embed_tokens.weight.device
    if device.type != "cuda":
        return config.max_batch_size * config.blocks_per_seq
    return measured_cuda_blocks(model, config, device)


@torch.inference_mode()
def measured_cuda_blocks(model: NLDModel, config: EngineConfig, device: torch.device) -> int:
    cfg = model.config
    dtype = model.encoder.embed_tokens.weight.dtype
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    n = min(config.max_num_batched_tokens, config.max_seq_len)
    tokens = torch.zeros(1, n, dtype=torch.long, device=device)  # [1, n]
    positions = torch.arange(n, device=device)[None]  # [1, n]
    mask = torch.ones(n, n, dtype=torch.bool, device=device).tril()[None, None]  # [1, 1, n, n]
    hidden = model(tokens, positions, None, AttentionInputs(mask=mask))
    logits = model.logits(hidden[0])  # [n, V]: a step of drafts and canvases wants logits for every token
    del logits, hidden, mask
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    free, total = torch.cuda.mem_get_info(device)
    others = total - free - torch.cuda.memory_reserved(device)  # CUDA context, other processes
    budget = config.gpu_memory_utilization * total - others - peak
    per_block = KVCache.block_bytes(num_layers=cfg.num_hidden_layers, num_kv_heads=cfg.num_key_value_heads,
                                    head_dim=cfg.head_dim, block_size=config.kv_block_size, dtype=dtype)
    blocks = int(budget // per_block)
    if blocks < config.blocks_per_seq:
        raise RuntimeError(
            f"gpu_memory_utilization {config.gpu_memory_utilization}: {max(blocks, 0)} KV blocks fit, fewer than one "
            f"sequence of max_seq_len {config.max_seq_len} needs ({config.blocks_per_seq}); weights and activations "
            f"peak at {peak / 2**30:.1f} GiB of {total / 2**30:.1f} GiB")
    return blocks
