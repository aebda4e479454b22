"""The CUDA-graph runner's bucketing and padding, on a CPU (static buffers, no capture).

On a CPU `CudaGraphRunner(capture=False)` runs every small pass through the same padded static
buffers a captured graph replays, so these tests pin down that padding rows, tokens and columns
change nothing. The capture itself runs in `benchmarks/gpu_check.py` on a GPU.
"""

from __future__ import annotations

import random

import pytest
import torch

from replicas.engine import BatchEngine, DecodeParams, Engine, EngineConfig, load_batch_engine
from replicas.engine.graph_runner import CudaGraphRunner, next_power_of_two
from replicas.engine.kv_cache import KVCache
from replicas.engine.runner import ModelRunner
from replicas.engine.sequence import ForwardPass


def static_runner(model, cache):
    return CudaGraphRunner(model, cache, max_batch=8, max_tokens=16, column_step=8, capture=False)


def make_cache(engine: Engine, slots: int, max_len: int) -> KVCache:
    cfg = engine.config
    return KVCache(num_layers=cfg.num_hidden_layers, num_slots=slots, num_kv_heads=cfg.num_key_value_heads,
                   max_len=max_len, head_dim=cfg.head_dim)


def test_next_power_of_two():
    assert [next_power_of_two(n) for n in (1, 2, 3, 4, 5, 17, 32, 33)] == [1, 2, 4, 4, 8, 32, 32, 64]


def test_bucket_key_pads_and_falls_back(engine):
    runner = static_runner(engine.model, make_cache(engine, 4, 60))
    assert runner.bucket_key([(0, ForwardPass([1], 9, True))]) == (1, 1, 16, ())
    three = [(s, ForwardPass([1] * n, st, True)) for s, n, st in ((0, 1, 30), (2, 5, 4), (3, 3, 0))]
    assert runner.bucket_key(three) == (4, 8, 32, ())
    assert runner.bucket_key([(0, ForwardPass([1], 58, True))]) == (1, 1, 61, ())  # capped at the cache
    assert runner.bucket_key([(0, ForwardPass([1] * 17, 0, True))]) is None  # longer than max_tokens
    assert runner.bucket_key([(i, ForwardPass([1], 0, True)) for i in range(9)]) is None  # wider than max_batch
    with pytest.raises(ValueError, match="CUDA"):
        CudaGraphRunner(engine.model, make_cache(engine, 1, 8), capture=True)


@pytest.mark.parametrize("fixture", ["engine", "lora_engine"])
def test_padded_passes_match_the_eager_runner(fixture, request):
    """Decode steps, drafts (with and without LoRA) and verifies over non-contiguous slots."""
    engine = request.getfixturevalue(fixture)
    eager = ModelRunner(engine.model, make_cache(engine, 4, 64))
    padded = static_runner(engine.model, make_cache(engine, 4, 64))
    rng = random.Random(3)
    mask_id = engine.config.mask_token_id
    prompts = {0: [rng.randrange(200) for _ in range(20)], 2: [rng.randrange(200) for _ in range(13)],
               3: [rng.randrange(200) for _ in range(7)]}
    for runner in (eager, padded):  # prefills: longer than max_tokens, eager in both
        runner.run([(s, ForwardPass(p, 0, True)) for s, p in prompts.items()])
    assert padded.eager_passes == 1
    lengths = {s: len(p) for s, p in prompts.items()}
    for step in range(6):
        items = []
        for s in (3, 0, 2) if step % 2 else (0, 2, 3):
            if (step + s) % 3 == 0:  # a bidirectional draft, LoRA on some rows
                items.append((s, ForwardPass([5] + [mask_id] * 6, lengths[s], False, lora=s == 2)))
            else:
                items.append((s, ForwardPass([rng.randrange(200) for _ in range(1 + s)], lengths[s], True)))
        want = eager.run(items)
        got = padded.run(items)
        for (s, p), w, g in zip(items, want, got):
            assert g.shape == w.shape
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
            if p.causal:
                lengths[s] += len(p.tokens)
    assert padded.eager_passes == 1 and sum(b.replays for b in padded.buckets.values()) == 6


@pytest.mark.parametrize("mode", ["ar", "self_spec", "diffusion"])
def test_engine_outputs_are_unchanged(mode, lora_ckpt_dir):
    eager = Engine.from_pretrained(lora_ckpt_dir, runner_cls=ModelRunner)
    padded = Engine.from_pretrained(lora_ckpt_dir, runner_cls=static_runner)
    params = DecodeParams(mode=mode, max_new_tokens=24, ignore_eos=True)
    passes = 0
    for prompt in ([3] * 11, [1, 17, 23, 99, 5, 8]):  # the longer first: the second reuses its runner
        a, b = eager.generate(prompt, params), padded.generate(prompt, params)
        assert b.token_ids == a.token_ids and b.forward_passes == a.forward_passes
        passes += b.forward_passes
    runner = padded._runner  # one runner for both requests: its cache is big enough
    assert runner.eager_passes == 0  # even the prefills are short enough for the static path here
    assert sum(bucket.replays for bucket in runner.buckets.values()) == passes + 2


def test_engine_reuses_its_runner_while_the_cache_fits(ckpt_dir):
    engine = Engine.from_pretrained(ckpt_dir)
    engine.generate([1, 2, 3], DecodeParams(max_new_tokens=8))
    first = engine._runner
    engine.generate([4, 5], DecodeParams(max_new_tokens=4))
    assert engine._runner is first
    engine.generate([4, 5], DecodeParams(max_new_tokens=40))
    assert engine._runner is not first and engine._runner.cache.max_len >= 2 + 40 + 8


def test_batch_engine_picks_the_runner_from_its_config(ckpt_dir):
    """On a CPU the default is the eager runner; `cuda_graphs` only matters on CUDA."""
    core = load_batch_engine(ckpt_dir, EngineConfig(max_batch_size=2, max_seq_len=64))
    assert type(core.runner) is ModelRunner
    assert EngineConfig().cuda_graphs and not EngineConfig(cuda_graphs=False).cuda_graphs


@pytest.mark.parametrize("block", [2, 3])
def test_quadratic_cycles_replay_from_padded_buckets(block, lora_ckpt_dir):
    """Quadratic passes (own RoPE positions, group masks, LoRA on the mask rows only) through
    the padded static buffers give the eager runner's tokens and forward count."""
    eager = Engine.from_pretrained(lora_ckpt_dir, runner_cls=ModelRunner)
    padded = Engine.from_pretrained(lora_ckpt_dir, runner_cls=static_runner)
    params = DecodeParams(mode="self_spec", spec_algorithm="quadratic", block_length=block, max_new_tokens=24,
                          ignore_eos=True)
    for prompt in ([3] * 11, [1, 17, 23, 99, 5, 8]):
        a, b = eager.generate(prompt, params), padded.generate(prompt, params)
        assert b.token_ids == a.token_ids and b.forward_passes == a.forward_passes
        assert b.token_ids == eager.generate(prompt, DecodeParams(max_new_tokens=24, ignore_eos=True)).token_ids
    assert padded._runner.eager_passes == 0  # block 3: 12-token cycles, within max_tokens 16
    assert any(key[1] == next_power_of_two(block * (block + 1)) and key[3] for key in padded._runner.buckets)
