"""Prefix caching: identical outputs with caching on and off in every mode, the expected hit
counts for a shared system prompt and for multi-turn chat, and LRU eviction of unreferenced
cached blocks."""

from __future__ import annotations

import random

import pytest

from replicas.engine import BatchEngine, DecodeParams, EngineConfig

from .test_paged_kv import drive

BS = 4


def config(**kw) -> EngineConfig:
    return EngineConfig(**{"max_batch_size": 4, "max_seq_len": 128, "kv_block_size": BS, **kw})


def run_one(be: BatchEngine, prompt, params) -> list[int]:
    be.submit(prompt, params)
    tokens = []
    while be.has_work():
        for c in be.step():
            assert c.finish_reason != "error", c.error
            tokens += c.token_ids
    return tokens


@pytest.mark.parametrize("mode", ["ar", "self_spec", "diffusion"])
def test_outputs_are_identical_with_caching_on_and_off(engine, lora_engine, mode):
    rng = random.Random(mode)
    for eng in (engine, lora_engine):
        system = [rng.randrange(101, 400) for _ in range(23)]
        jobs = [(system + [rng.randrange(101, 400) for _ in range(rng.randint(1, 9))],
                 DecodeParams(mode=mode, max_new_tokens=rng.randint(5, 30), block_length=rng.randint(2, 8),
                              threshold=0.7, ignore_eos=True))
                for _ in range(8)]
        jobs += jobs[:2]  # the very same prompts again: everything but the last token is cached
        on = BatchEngine(eng, config(prefill_chunk=5))
        off = BatchEngine(eng, config(prefill_chunk=5, enable_prefix_caching=False))
        assert drive(on, jobs, arrivals_per_step=1) == drive(off, jobs, arrivals_per_step=1)
        assert on.stats_snapshot()["prefix_cache_hits"] > 20 and off.stats_snapshot()["prefix_cache_hits"] == 0
        for i, (prompt, params) in enumerate(jobs[:3]):  # and alone, uncached
            assert run_one(BatchEngine(eng, config(enable_prefix_caching=False)), prompt, params) == \
                eng.generate(prompt, params).token_ids


def test_hits_for_a_shared_system_prompt(engine):
    be = BatchEngine(engine, config())
    system = list(range(101, 123))  # 22 tokens: 5 full blocks of 4, and 2 tokens of a sixth
    params = DecodeParams(max_new_tokens=3, ignore_eos=True)
    expected = []
    for i in range(4):
        prompt = system + [200 + i] * 5  # 27 tokens: (27 - 1) // 4 = 6 blocks looked up
        out = run_one(be, prompt, params)
        snap = be.stats_snapshot()
        expected.append((6 * (i + 1), 5 * i))  # the 6th block mixes in the user turn: a miss
        assert (snap["prefix_cache_queries"], snap["prefix_cache_hits"]) == expected[-1]
        assert out == engine.generate(prompt, params).token_ids
    assert be.stats_snapshot()["prefix_cache_hit_rate"] == pytest.approx(15 / 24)


def test_hits_for_concurrent_requests_once_the_first_prefill_is_done(engine):
    be = BatchEngine(engine, config(prefill_chunk=64))
    system = list(range(101, 133))  # 32 tokens = 8 full blocks
    params = DecodeParams(max_new_tokens=20, ignore_eos=True)
    first = be.submit(system + [300], params)
    be.step()  # its prefill publishes 8 blocks
    others = [be.submit(system + [301 + i, 302 + i], params) for i in range(3)]
    be.step()
    snap = be.stats_snapshot()
    assert snap["prefix_cache_hits"] == 3 * 8 and snap["prefix_cache_queries"] == 8 + 3 * 8
    assert snap["kv_blocks_used"] == 8 + 1 + 3 * 1  # shared blocks are counted once
    assert first and others


def test_hits_for_multi_turn_chat(engine):
    """Turn k+1's prompt is turn k's prompt + its answer + a new user message: it finds every full
    block of turn k's prompt (prompt blocks are cached, generated ones are not)."""
    be = BatchEngine(engine, config())
    rng = random.Random(3)
    prompt = [rng.randrange(101, 400) for _ in range(10)]
    params = DecodeParams(mode="self_spec", max_new_tokens=8, ignore_eos=True, block_length=4)
    hits = []
    for turn in range(4):
        before = be.stats_snapshot()["prefix_cache_hits"]
        answer = run_one(be, prompt, params)
        assert answer == engine.generate(prompt, params.with_(mode="ar")).token_ids
        hits.append((be.stats_snapshot()["prefix_cache_hits"] - before, len(prompt)))
        prompt = prompt + answer + [rng.randrange(101, 400) for _ in range(5)]
    assert [h for h, _ in hits] == [0] + [n // BS for _, n in hits[:-1]]  # [0, 2, 5, 8]


def test_unreferenced_cached_blocks_are_evicted_least_recently_used_first(engine):
    be = BatchEngine(engine, config(max_batch_size=1, max_seq_len=48, num_kv_blocks=12))
    params = DecodeParams(max_new_tokens=2, ignore_eos=True, block_length=2)
    a, b = list(range(101, 117)), list(range(201, 217))  # 16 tokens: 4 full blocks each
    run_one(be, a, params)
    run_one(be, b, params)
    assert be.stats_snapshot()["kv_blocks_cached"] == 8 and be.stats_snapshot()["kv_blocks_used"] == 0
    run_one(be, list(range(301, 325)), params.with_(max_new_tokens=8))  # needs 9 blocks: 4 free + 5 evicted
    hits = be.stats_snapshot()["prefix_cache_hits"]
    run_one(be, b, params)  # b was released after a: it lost fewer blocks
    b_hits = be.stats_snapshot()["prefix_cache_hits"] - hits
    run_one(be, a, params)
    a_hits = be.stats_snapshot()["prefix_cache_hits"] - hits - b_hits
    assert (a_hits, b_hits) == (0, 3)


def test_a_waiting_request_waits_for_blocks_and_the_watermark(engine):
    """Admission needs the prompt's blocks beyond its cached prefix plus the watermark free."""
    be = BatchEngine(engine, config(max_seq_len=40, num_kv_blocks=20, kv_watermark=0.25))
    long = be.submit(list(range(101, 121)), DecodeParams(max_new_tokens=12, ignore_eos=True))
    be.step()
    second = be.submit(list(range(201, 213)), DecodeParams(max_new_tokens=4, ignore_eos=True))
    be.step()  # 14 free; 3 for its prompt leave 11 >= the watermark (5): admitted
    assert be.stats_snapshot()["running"] == 2
    third = be.submit(list(range(301, 329)), DecodeParams(max_new_tokens=4, ignore_eos=True))
    be.step()  # 7 blocks for its prompt would leave fewer than 5 of the 9 or 10 free: it waits
    snap = be.stats_snapshot()
    assert snap["waiting"] == 1 and 7 <= snap["kv_blocks_free"] < 7 + 5
    while be.has_work():
        be.step()
    assert be.stats_snapshot()["finished_requests"] == 3 and long and second and third
