"""Replay small batched forwards from CUDA graphs: decode steps, self-spec drafts and verifies,
diffusion denoise passes.

Why: at batch 1 an 8B forward launches about 40 kernels per layer. Eager PyTorch spends longer
launching them than the GPU spends running them, so a decode step is bound by the host, not by
the weight reads. This runner captures the model forward once per shape bucket and then replays
it: the host launches one graph per pass.

Contract: the same as `ModelRunner.run`. A pass with B rows, longest row T and S columns read is
padded to its bucket (B and T up to the next power of two, S up to the next multiple of
`column_step`, at most the cache's columns) when B <= `max_batch` and T <= `max_tokens`, and runs
from that bucket's graph, captured on first use into one shared memory pool. The bucket is one
padded group: its static inputs are the tokens, positions, flat write locations, the rows'
block tables [rows, columns / block_size] and the mask, refilled before each replay, so the
paged gather is part of the graph. Padding follows the runner's scheme: padded rows and tokens
write the scratch block and read column 0, and columns beyond S are masked. Passes that do not
fit a bucket (long prefill chunks), and mixed passes whose padding would cost more than the
launches it saves (more than `max_padding` times their real tokens and more than `free_padding`
tokens: a prefill chunk sharing a step with AR rows), run eagerly, packed without padding.
With `capture=False` (the default off CUDA) the bucketed static buffers are used without a
graph, so the padding is testable on a CPU. A bucket's graph computes the LoRA delta only when
the pass asks for it (part of the key).
Cost: a bucket is captured the first time a pass needs it (on the 8B, a fraction of a second,
during which that step waits). Decoding uses few token counts (1, the block lengths, the
prefill chunk) and few batch buckets, but the column buckets grow with context: a replica
with max_seq_len 4096 meets up to 16 of them. Capturing the common buckets at start-up is
open work.
Non-goals: the LM head and sampling (eager: one matmul), evicting graphs, CUDA graphs for
prefill chunks longer than `max_tokens`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kv_cache import KVCache
from .model import AttentionGroup, AttentionInputs, NLDModel
from .runner import ModelRunner
from .sequence import ForwardPass


def next_power_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()


@dataclass
class GraphBucket:
    """Static inputs and output of one captured shape (rows, tokens, columns, adapters used)."""

    inputs: dict[str, torch.Tensor]  # the keys of `ModelRunner.build_group`, on the device
    hidden: torch.Tensor | None = None  # [R, T, hidden] output of the last replay
    graph: torch.cuda.CUDAGraph | None = None
    replays: int = 0


class CudaGraphRunner(ModelRunner):
    def __init__(
        self,
        model: NLDModel,
        cache: KVCache,
        *,
        max_batch: int = 64,
        max_tokens: int = 64,
        column_step: int = 256,
        max_padding: float = 4.0,
        free_padding: int = 256,
        capture: bool | None = None,
    ) -> None:
        super().__init__(model, cache)
        if max_batch < 1 or max_tokens < 1 or column_step < 1:
            raise ValueError("CudaGraphRunner: max_batch, max_tokens and column_step must be >= 1")
        self.max_batch, self.max_tokens, self.column_step = max_batch, max_tokens, column_step
        self.max_padding, self.free_padding = max_padding, free_padding
        self.capture = self.device.type == "cuda" if capture is None else capture
        if self.capture and self.device.type != "cuda":
            raise ValueError("CudaGraphRunner: capture=True needs the model on a CUDA device")
        self.buckets: dict[tuple[int, int, int, bool], GraphBucket] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.eager_passes = 0

    def bucket_key(self, items: list[tuple[int, ForwardPass]]) -> tuple[int, int, int, tuple[int, ...]] | None:
        """(rows, tokens, columns, adapters used) of the bucket this pass replays in, or None: eager."""
        b = len(items)
        t = max(len(p.tokens) for _, p in items)
        if b > self.max_batch or t > self.max_tokens:
            return None
        s = max(p.start + len(p.tokens) for _, p in items)
        columns = min(-(-s // self.column_step) * self.column_step, self.cache.max_len + 1)
        return next_power_of_two(b), next_power_of_two(t), columns, self.adapters_used(items)

    def worth_a_graph(self, items: list[tuple[int, ForwardPass]], key: tuple[int, int, int, tuple[int, ...]]) -> bool:
        padded = key[0] * key[1]
        real = sum(len(p.tokens) for _, p in items)
        return padded <= self.free_padding or padded <= self.max_padding * real

    def forward(self, items: list[tuple[int, ForwardPass]]) -> tuple[torch.Tensor, list[int]]:
        key = self.bucket_key(items)
        if key is None or not self.worth_a_graph(items, key):
            self.eager_passes += 1
            return super().forward(items)
        bucket = self.buckets.get(key) or self.make_bucket(key)
        host = self.build_group(items, shape=key[:3])
        for name, static in bucket.inputs.items():
            static.copy_(host[name], non_blocking=True)
        if bucket.graph is not None:
            bucket.graph.replay()
        else:
            bucket.hidden = self.forward_static(bucket, key[3])
        bucket.replays += 1
        rows, tokens = key[0], key[1]
        # [R*T, hidden]; rows >= B and tokens >= T_b are padding
        return bucket.hidden.view(rows * tokens, -1), [i * tokens for i in range(len(items))]

    def forward_static(self, bucket: GraphBucket, adapters: tuple[int, ...]) -> torch.Tensor:
        x = bucket.inputs
        rows, tokens = x["tokens"].shape
        group = AttentionGroup(0, rows, tokens, x["tables"], x["mask"])
        attn = AttentionInputs(write_index=x["write_index"], groups=(group,),
                               lora_weight=x["lora"] if adapters else None, lora_adapters=adapters)
        return self.model(x["tokens"], x["positions"], self.cache, attn)

    @torch.inference_mode()
    def make_bucket(self, key: tuple[int, int, int, tuple[int, ...]]) -> GraphBucket:
        rows, tokens, columns, lora = key
        # all padding: the warm-up forwards below run for real and must write only the scratch
        # block, never a sequence's cached columns
        host = self.build_group([], shape=(rows, tokens, columns))
        bucket = GraphBucket(inputs={k: v.to(self.device) for k, v in host.items()})
        if self.capture:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the graph (kernel selection, workspaces)
                for _ in range(2):
                    self.forward_static(bucket, lora)
            torch.cuda.current_stream().wait_stream(side)
            bucket.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(bucket.graph, pool=self.pool):
                bucket.hidden = self.forward_static(bucket, lora)
        self.buckets[key] = bucket
        return bucket
