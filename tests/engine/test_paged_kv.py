"""The paged KV cache: the block allocator's invariants under random traffic (property style,
many seeds), and paged attention against the contiguous layout and a cache-free recompute for
every pass type (causal, bidirectional canvas, arbitrary boolean masks), in every mode."""

from __future__ import annotations

import random

import pytest
import torch

from replicas.engine import BatchEngine, DecodeParams, EngineConfig, EngineOverloaded
from replicas.engine.block_manager import BlockAllocator, prefix_keys
from replicas.engine.kv_cache import KVCache
from replicas.engine.model import AttentionInputs
from replicas.engine.runner import ModelRunner
from replicas.engine.sequence import ForwardPass

from .test_modes import random_prompt


def drive(be: BatchEngine, jobs: list, arrivals_per_step: int = 2) -> dict:
    """Submit `jobs` (prompt, params) a few per step and step to the end; tokens by job index."""
    pending, ids, out = list(enumerate(jobs)), {}, {}
    while pending or be.has_work():
        for i, (prompt, params) in pending[:arrivals_per_step]:
            ids[be.submit(prompt, params)] = i
            out[i] = []
        pending = pending[arrivals_per_step:]
        for c in be.step():
            assert c.finish_reason != "error", c.error
            out[ids[c.request_id]].extend(c.token_ids)
    return out


def mixed_jobs(rng: random.Random, engine, n: int, *, prompt_len=(1, 40), new=(1, 30)) -> list:
    jobs = []
    for i in range(n):
        prompt = [rng.randrange(101, engine.config.vocab_size) for _ in range(rng.randint(*prompt_len))]
        params = DecodeParams(mode=("ar", "self_spec", "diffusion")[i % 3], max_new_tokens=rng.randint(*new),
                              block_length=rng.randint(2, engine.config.block_size),
                              threshold=rng.choice([0.0, 0.5, 0.9]), ignore_eos=rng.random() < 0.5)
        jobs.append((prompt, params))
    return jobs


# ---- the allocator ---------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(40))
def test_allocator_random_operations_keep_every_block_accounted(seed):
    rng = random.Random(seed)
    alloc = BlockAllocator(rng.randint(1, 24))
    held: list[list[int]] = []  # blocks per "sequence"
    for _ in range(300):
        op = rng.random()
        if op < 0.4:
            blocks = []
            for _ in range(rng.randint(1, 4)):
                b = alloc.allocate()
                if b is None:
                    break
                blocks.append(b)
            held.append(blocks)
        elif op < 0.55 and held:  # publish a block under a random key (a full prompt block)
            blocks = rng.choice(held)
            if blocks:
                alloc.register(rng.choice(blocks), ("k", rng.randrange(30)))
        elif op < 0.7:  # a prefix hit shares a cached block
            block = alloc.lookup(("k", rng.randrange(30)))
            if block is not None:
                alloc.acquire(block)
                held.append([block])
        elif held:
            for b in held.pop(rng.randrange(len(held))):
                alloc.release(b)
        alloc.check()
        assert sum(alloc.refs) == sum(len(b) for b in held)
    while held:
        for b in held.pop():
            alloc.release(b)
    alloc.check()
    assert alloc.num_used == 0 and alloc.num_free == alloc.num_blocks


def test_prefix_keys_name_the_whole_prefix():
    a = prefix_keys(list(range(20)), 8)
    b = prefix_keys(list(range(16)) + [99, 98], 8)
    c = prefix_keys([7] + list(range(1, 20)), 8)
    assert len(a) == 2 and a == b  # full blocks only; the partial tail has no key
    assert c[1] != a[1]  # same tokens in block 1, different parent: a different prefix


@pytest.mark.parametrize("seed", range(12))
def test_engine_random_traffic_leaves_every_block_free_when_idle(engine, seed):
    """Submit, abort while running, cancel while waiting, finish, and preempt (a pool too small
    for the load) in random order; the allocator's invariants hold after every step, every
    block is free (or cached and unreferenced) when the engine is idle, and every request that
    finished (preempted or not) made the tokens it makes alone."""
    rng = random.Random(100 + seed)
    block = rng.choice([3, 4, 8])
    config = EngineConfig(max_batch_size=rng.choice([2, 4, 6]), max_seq_len=96, max_waiting=6,
                          kv_block_size=block, num_kv_blocks=-(-96 // block) + rng.randint(0, 12),
                          max_num_batched_tokens=rng.choice([16, 64, 512]), prefill_chunk=rng.choice([5, 32]),
                          enable_prefix_caching=rng.random() < 0.7)
    be = BatchEngine(engine, config)
    live: list[str] = []
    jobs: dict[str, tuple] = {}
    shared = [rng.randrange(101, 400) for _ in range(20)]
    for _ in range(80):
        if live and rng.random() < 0.15:
            be.abort(live.pop(rng.randrange(len(live))))  # running or waiting
        if rng.random() < 0.6:
            prompt = (shared[: rng.randint(0, 20)] + random_prompt(rng, engine.config.vocab_size))[:40]
            params = mixed_jobs(rng, engine, 1, new=(1, 40))[0][1]
            try:
                live.append(be.submit(prompt, params))
                jobs[live[-1]] = (prompt, params, [])
            except EngineOverloaded:
                pass
        for c in be.step():
            assert c.finish_reason != "error", c.error
            jobs[c.request_id][2].extend(c.token_ids)
            if c.finish_reason and c.request_id in live:
                live.remove(c.request_id)
            if c.finish_reason in ("stop", "length"):
                prompt, params, tokens = jobs[c.request_id]
                assert tokens == engine.generate(prompt, params).token_ids
        alloc = be.blocks.allocator
        alloc.check()
        assert sum(alloc.refs) == sum(len(r.seq.kv.blocks) for r in be.scheduler.running.values())
        assert all(not r.seq.kv.blocks for r in be.scheduler.waiting)
    for rid in live:
        be.abort(rid)
    while be.has_work():
        be.step()
    snap = be.stats_snapshot()
    assert snap["kv_blocks_used"] == 0 and snap["kv_blocks_free"] == snap["kv_blocks_total"]
    assert snap["kv_slots_used"] == 0 and snap["waiting"] == 0
    assert sorted(be.scheduler.free_slots) == list(range(config.max_batch_size))
    assert (be.cache.tables == be.cache.scratch_block).all()


# ---- paged == contiguous ---------------------------------------------------------------------

def paged_and_contiguous(engine, *, slots: int, max_len: int, block_size: int, seed: int):
    cfg = engine.config
    shape = dict(num_layers=cfg.num_hidden_layers, num_slots=slots, num_kv_heads=cfg.num_key_value_heads,
                 max_len=max_len, head_dim=cfg.head_dim)
    contiguous = KVCache(**shape)
    per_seq = -(-max_len // block_size)
    paged = KVCache(**shape, block_size=block_size, num_blocks=slots * per_seq + 3)
    order = list(range(paged.num_blocks))
    random.Random(seed).shuffle(order)  # scattered, out-of-order blocks
    for s in range(slots):
        paged.set_blocks(s, order[s * per_seq : (s + 1) * per_seq])
    return ModelRunner(engine.model, contiguous), ModelRunner(engine.model, paged)


def quadratic_group_mask(n_groups: int, size: int) -> torch.Tensor:
    """TiDAR-style: group i = [d_i, MASK x size]; d_i sees d_0..d_i, group i's masks see d_0..d_i
    and each other."""
    t = n_groups * (1 + size)
    m = torch.zeros(t, t, dtype=torch.bool)
    drafts = [g * (1 + size) for g in range(n_groups)]
    for g, d in enumerate(drafts):
        seen = drafts[: g + 1]
        m[d, seen] = True
        m[d + 1 : d + 1 + size, seen] = True
        m[d + 1 : d + 1 + size, d + 1 : d + 1 + size] = True
    return m


@pytest.mark.parametrize("block_size", [1, 3, 8])
def test_paged_runner_equals_contiguous_for_every_pass_type(engine, block_size):
    """Mixed batches of prefill chunks crossing block boundaries, AR tokens, bidirectional
    canvases and arbitrary boolean masks, over scattered blocks: the same logits."""
    contiguous, paged = paged_and_contiguous(engine, slots=3, max_len=80, block_size=block_size, seed=block_size)
    rng = random.Random(block_size)
    mask_id = engine.config.mask_token_id
    lengths = {0: 0, 1: 0, 2: 0}
    steps = [[(0, ForwardPass([rng.randrange(200) for _ in range(11)], 0, True)),
              (1, ForwardPass([rng.randrange(200) for _ in range(5)], 0, True)),
              (2, ForwardPass([rng.randrange(200) for _ in range(17)], 0, True))]]
    for k in range(8):
        items = []
        for s in (2, 0, 1) if k % 2 else (0, 1, 2):
            kind = (k + s) % 4
            if kind == 0:
                items.append((s, ForwardPass([rng.randrange(200)], None, True)))
            elif kind == 1:
                items.append((s, ForwardPass([5] + [mask_id] * 6, None, False)))
            elif kind == 2:
                items.append((s, ForwardPass([rng.randrange(200) for _ in range(9)], None, True)))
            else:
                m = quadratic_group_mask(2, 3)
                items.append((s, ForwardPass([7, mask_id, mask_id, mask_id, 9, mask_id, mask_id, mask_id], None,
                                             False, mask=m)))
        steps.append(items)
    for items in steps:
        for s, p in items:
            p.start = lengths[s] if p.start is None else p.start
        want, got = contiguous.run(items), paged.run(items)
        for w, g in zip(want, got):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-5)
        for s, p in items:
            if p.causal and p.mask is None:
                lengths[s] += len(p.tokens)


def test_arbitrary_mask_pass_equals_a_cache_free_recompute(engine):
    """A quadratic-self-spec group mask over a cached prefix, read through scattered blocks,
    equals one cache-free forward of prefix + groups under the equivalent full mask."""
    _, paged = paged_and_contiguous(engine, slots=1, max_len=64, block_size=4, seed=7)
    g = torch.Generator().manual_seed(3)
    prefix = torch.randint(101, 400, (13,), generator=g).tolist()
    m = quadratic_group_mask(3, 2)
    tokens = torch.randint(101, 400, (m.shape[0],), generator=g).tolist()
    paged.run([(0, ForwardPass(prefix, 0, True))])
    got = paged.run([(0, ForwardPass(tokens, len(prefix), False, mask=m))])[0]
    n, t = len(prefix), len(tokens)
    full = torch.zeros(n + t, n + t, dtype=torch.bool)
    full[:n, :n] = torch.tril(torch.ones(n, n, dtype=torch.bool))
    full[n:, :n] = True
    full[n:, n:] = m
    with torch.no_grad():
        h = engine.model(torch.tensor([prefix + tokens]), torch.arange(n + t)[None], None,
                         AttentionInputs(mask=full[None, None]))
        want = engine.model.logits(h)[0, n:]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("block_size", [2, 5, 16])
def test_paged_engine_equals_contiguous_engine_in_mixed_batches(engine, lora_engine, block_size):
    """All three modes in one batch, float32, prompts and outputs crossing many block
    boundaries: paged blocks of 2, 5 and 16 give the tokens of one block per sequence
    (block size = max_seq_len: each sequence's K/V contiguous)."""
    for eng in (engine, lora_engine):
        jobs = mixed_jobs(random.Random(block_size), eng, 12)
        base = dict(max_batch_size=5, max_seq_len=96, prefill_chunk=7)
        contiguous = drive(BatchEngine(eng, EngineConfig(**base, kv_block_size=96)), jobs)
        paged = drive(BatchEngine(eng, EngineConfig(**base, kv_block_size=block_size)), jobs)
        assert paged == contiguous
        for i, (prompt, params) in enumerate(jobs):
            if params.mode == "self_spec":
                assert paged[i] == eng.generate(prompt, params.with_(mode="ar")).token_ids


def test_gpu_memory_utilization_sizes_the_pool_after_the_weights_and_a_worst_step(engine, monkeypatch):
    """The CUDA sizing arithmetic, with the CUDA memory queries faked (no GPU here): the budget is
    utilization x total, minus what other processes hold, minus this process's peak."""
    from replicas.engine import capacity

    gib = 2**30
    fake = {"synchronize": lambda *a: None, "empty_cache": lambda: None, "reset_peak_memory_stats": lambda *a: None,
            "max_memory_allocated": lambda *a: 20 * gib, "memory_reserved": lambda *a: 22 * gib,
            "mem_get_info": lambda *a: (100 * gib, 140 * gib)}  # 18 GiB held by others
    for name, fn in fake.items():
        monkeypatch.setattr(torch.cuda, name, fn)
    cfg = engine.config
    config = EngineConfig(max_seq_len=64, max_num_batched_tokens=32, gpu_memory_utilization=0.5)
    blocks = capacity.measured_cuda_blocks(engine.model, config, torch.device("cpu"))
    per_block = KVCache.block_bytes(num_layers=cfg.num_hidden_layers, num_kv_heads=cfg.num_key_value_heads,
                                    head_dim=cfg.head_dim, block_size=16, dtype=torch.float32)
    assert blocks == int((0.5 * 140 - 18 - 20) * gib // per_block)
    with pytest.raises(RuntimeError, match="gpu_memory_utilization"):
        capacity.measured_cuda_blocks(engine.model, EngineConfig(gpu_memory_utilization=0.1), torch.device("cpu"))
    assert capacity.num_kv_blocks(engine.model, EngineConfig(max_batch_size=3, max_seq_len=40)) == 3 * 3
    assert capacity.num_kv_blocks(engine.model, EngineConfig(num_kv_blocks=7)) == 7
