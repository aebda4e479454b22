"""The batched engine: mixed modes in one forward, arrival/leave mid-way, cancellation,
overload, mid-flight switches, draft tiers, async streaming."""

from __future__ import annotations

import asyncio
import random
import threading

import pytest

from replicas.engine import AsyncEngine, BatchEngine, DecodeParams, Engine, EngineConfig, EngineOverloaded
from replicas.engine.runner import ModelRunner

from .test_modes import random_prompt


class CountingRunner(ModelRunner):
    calls: list[int] = []
    threads: set[str] = set()

    def run_with_greedy(self, items):
        CountingRunner.calls.append(len(items))
        CountingRunner.threads.add(threading.current_thread().name)
        return super().run_with_greedy(items)


def random_params(rng: random.Random, engine) -> DecodeParams:
    mode = rng.choice(["ar", "self_spec", "diffusion"])
    return DecodeParams(mode=mode, max_new_tokens=rng.randint(1, 28), block_length=rng.randint(2, engine.config.block_size),
                        threshold=rng.choice([0.0, 0.3, 0.9]))


def drain(be: BatchEngine, arrivals: dict[int, list], results: dict) -> None:
    """Step until idle, submitting arrivals[step] before that step."""
    step = 0
    while be.has_work() or any(k >= step for k in arrivals):
        for prompt, params in arrivals.pop(step, []):
            results[be.submit(prompt, params)] = (prompt, params, [])
        for chunk in be.step():
            results[chunk.request_id][2].extend(chunk.token_ids)
        step += 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mixed_modes_and_arrivals_match_each_request_alone(engine, seed, monkeypatch):
    rng = random.Random(seed)
    monkeypatch.setattr(engine, "runner_cls", CountingRunner)
    CountingRunner.calls = []
    be = BatchEngine(engine, EngineConfig(max_batch_size=5, max_seq_len=128, prefill_chunk=7,
                                          draft_tiers=({"max_running": 2, "block_length": 8},
                                                       {"max_running": 5, "block_length": 3})))
    arrivals: dict[int, list] = {}
    for _ in range(14):
        arrivals.setdefault(rng.randint(0, 30), []).append(
            (random_prompt(rng, engine.config.vocab_size), random_params(rng, engine)))
    results: dict = {}
    drain(be, arrivals, results)
    batched_calls = list(CountingRunner.calls)
    assert len(results) == 14
    for prompt, params, tokens in results.values():
        assert tokens == engine.generate(prompt, params).token_ids, params
    assert max(batched_calls) > 1  # rows of several requests shared forwards
    snap = be.stats_snapshot()
    assert snap["kv_slots_used"] == 0 and snap["running"] == 0 and snap["finished_requests"] == 14
    assert snap["forward_passes"] == len(batched_calls)


def test_each_step_is_one_forward_over_all_running_rows(engine, monkeypatch):
    monkeypatch.setattr(engine, "runner_cls", CountingRunner)
    CountingRunner.calls = []
    be = BatchEngine(engine, EngineConfig(max_batch_size=8, max_seq_len=128))
    for i, mode in enumerate(["ar", "self_spec", "diffusion", "ar"]):
        be.submit([1, 2, 3 + i], DecodeParams(mode=mode, max_new_tokens=20, ignore_eos=True))
    be.step()  # admission + the prefill step (one forward for the four prompts)
    assert CountingRunner.calls == [4]
    be.step()
    assert CountingRunner.calls == [4, 4]  # one forward: AR token, spec draft, diffusion canvas


def test_seeded_sampling_is_reproducible_in_a_batch(engine):
    def run_batch():
        be = BatchEngine(engine, EngineConfig(max_batch_size=6, max_seq_len=128))
        ids = [be.submit([1, 5, 9, i], DecodeParams(mode=m, max_new_tokens=16, temperature=0.9, top_k=50, seed=i))
               for i, m in enumerate(["ar", "self_spec", "diffusion"] * 2)]
        out = {rid: [] for rid in ids}
        while be.has_work():
            for c in be.step():
                out[c.request_id].extend(c.token_ids)
        return [out[rid] for rid in ids]

    first, second = run_batch(), run_batch()
    assert first == second
    assert len({tuple(x) for x in first}) > 1


def test_full_queue_raises_engine_overloaded_and_admission_waits_for_room(engine):
    be = BatchEngine(engine, EngineConfig(max_batch_size=2, max_seq_len=64, max_waiting=3))
    for i in range(5):  # two take the free slots at the next step, three wait
        be.submit([1, 2, i], DecodeParams(max_new_tokens=4))
    with pytest.raises(EngineOverloaded, match="max_waiting 3"):
        be.submit([1, 2, 3], DecodeParams(max_new_tokens=4))
    be.step()
    assert be.stats_snapshot()["running"] == 2 and be.stats_snapshot()["waiting"] == 3
    with pytest.raises(EngineOverloaded):
        be.submit([1, 2, 3], DecodeParams(max_new_tokens=4))
    while be.stats_snapshot()["waiting"] == 3:
        be.step()  # the first two finish and free their slots
    be.submit([1, 2, 3], DecodeParams(max_new_tokens=4))  # room in the queue again
    while be.has_work():
        be.step()
    assert be.stats_snapshot()["finished_requests"] == 6
    assert be.stats_snapshot()["rejected_requests"] == 2


def test_requests_that_cannot_fit_the_cache_are_rejected_precisely(engine):
    be = BatchEngine(engine, EngineConfig(max_batch_size=2, max_seq_len=32))
    with pytest.raises(ValueError, match="max_seq_len"):
        be.submit(list(range(1, 20)), DecodeParams(max_new_tokens=20))


def test_random_submit_cancel_leaks_nothing(engine):
    rng = random.Random(3)
    be = BatchEngine(engine, EngineConfig(max_batch_size=4, max_seq_len=96, max_waiting=8))
    live: list[str] = []
    ops = 0
    while ops < 200:
        ops += 1
        if live and rng.random() < 0.45:
            be.abort(live.pop(rng.randrange(len(live))))
        else:
            try:
                live.append(be.submit(random_prompt(rng, engine.config.vocab_size), random_params(rng, engine)))
            except EngineOverloaded:
                pass
        for c in be.step():
            if c.finish_reason and c.request_id in live:
                live.remove(c.request_id)
    for rid in live:
        be.abort(rid)
    while be.has_work():
        be.step()
    snap = be.stats_snapshot()
    assert snap["kv_slots_used"] == 0 and snap["kv_tokens_used"] == 0 and snap["waiting"] == 0
    assert sorted(be.scheduler.free_slots) == [0, 1, 2, 3]
    assert snap["aborted_requests"] > 10


def test_mid_flight_switches_keep_ar_greedy_output(engine):
    rng = random.Random(5)
    for trial in range(6):
        prompt = random_prompt(rng, engine.config.vocab_size)
        params = DecodeParams(mode="self_spec", max_new_tokens=40, block_length=rng.randint(2, 8), ignore_eos=True)
        be = BatchEngine(engine, EngineConfig(max_batch_size=3, max_seq_len=128))
        rid = be.submit(prompt, params)
        be.submit(random_prompt(rng, engine.config.vocab_size), DecodeParams(mode="diffusion", max_new_tokens=30))
        tokens, switches = [], 0
        while be.has_work():
            if rid in be.scheduler.running and rng.random() < 0.4:
                be.set_mode(rid, rng.choice(["ar", "self_spec"]))
                switches += 1
            for c in be.step():
                if c.request_id == rid:
                    tokens.extend(c.token_ids)
        assert switches > 0
        assert tokens == engine.generate(prompt, params.with_(mode="ar")).token_ids


def test_draft_tiers_shrink_the_block_as_load_grows(engine):
    config = EngineConfig(max_batch_size=8, max_seq_len=128,
                          draft_tiers=({"max_running": 1, "block_length": 8}, {"max_running": 8, "block_length": 3}))
    assert config.draft_block(1, 8) == 8 and config.draft_block(5, 8) == 3 and config.draft_block(1, 4) == 4

    def blocks(n_requests):
        be = BatchEngine(engine, config)
        ids = [be.submit([1, 2, 3, i], DecodeParams(mode="self_spec", max_new_tokens=24, ignore_eos=True))
               for i in range(n_requests)]
        stats = {}
        while be.has_work():
            for c in be.step():
                if c.finish_reason:
                    stats[c.request_id] = c.stats
        return stats[ids[0]]["draft_blocks"]

    assert set(blocks(1)) == {8}
    assert set(blocks(4)) == {3}
    with pytest.raises(ValueError, match="draft_tiers"):
        EngineConfig(draft_tiers=({"max_running": 4, "block_length": 8}, {"max_running": 2, "block_length": 4}))


@pytest.fixture
def async_engine(ckpt_dir):
    core = BatchEngine(Engine.from_pretrained(ckpt_dir, runner_cls=CountingRunner),
                       EngineConfig(max_batch_size=4, max_seq_len=128, max_waiting=4))
    eng = AsyncEngine(core)
    yield eng
    eng.shutdown()


def test_async_stream_chunks_and_final_stats(async_engine, engine):
    async def main():
        chunks = [c async for c in async_engine.stream([1, 2, 3], DecodeParams(mode="self_spec", max_new_tokens=30,
                                                                                block_length=6))]
        return chunks

    chunks = asyncio.run(main())
    assert all(1 <= len(c.token_ids) <= 6 for c in chunks)
    assert chunks[-1].finish_reason in ("stop", "length") and all(c.finish_reason is None for c in chunks[:-1])
    stats = chunks[-1].stats
    tokens = [t for c in chunks for t in c.token_ids]
    assert tokens == engine.generate([1, 2, 3], DecodeParams(mode="ar", max_new_tokens=30)).token_ids
    assert stats["forward_passes"] == 2 * len(stats["accepted_lengths"])
    assert stats["tokens_per_forward"] == pytest.approx(len(tokens) / stats["forward_passes"])


def test_async_forwards_never_run_on_the_event_loop_thread(async_engine):
    CountingRunner.threads = set()

    async def main():
        return await async_engine.generate([1, 2, 3], DecodeParams(max_new_tokens=8))

    asyncio.run(main())
    assert CountingRunner.threads == {"nld-engine-loop"}


def test_cancelling_the_consumer_frees_the_kv_slot(async_engine):
    async def main():
        started = asyncio.Event()

        async def consume():
            async for _ in async_engine.stream([1, 2, 3], DecodeParams(max_new_tokens=100, ignore_eos=True)):
                started.set()

        task = asyncio.create_task(consume())
        await started.wait()
        assert async_engine.stats()["kv_slots_used"] == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):  # the loop thread frees it at its next step
            if async_engine.stats()["kv_slots_used"] == 0:
                break
            await asyncio.sleep(0.01)
        return async_engine.stats()

    stats = asyncio.run(main())
    assert stats["kv_slots_used"] == 0 and stats["aborted_requests"] == 1


def test_async_errors_are_precise_and_the_engine_keeps_serving(async_engine):
    async def main():
        with pytest.raises(ValueError, match="outside the vocabulary"):
            async for _ in async_engine.stream([1, 9999]):
                pass
        params = DecodeParams(max_new_tokens=100, ignore_eos=True)
        running = [async_engine.stream([1, 2], params) for _ in range(4)]
        for s in running:
            await anext(s)  # these four hold the four KV slots
        waiting = [async_engine.stream([1, 2], params) for _ in range(4)]
        pending = [asyncio.create_task(anext(s)) for s in waiting]
        for _ in range(500):
            if async_engine.stats()["waiting"] == 4:
                break
            await asyncio.sleep(0.01)
        assert async_engine.stats()["waiting"] == 4
        with pytest.raises(EngineOverloaded):
            await anext(async_engine.stream([1, 2]))
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for s in running + waiting:
            await s.aclose()
        out = await async_engine.generate([1, 2, 3], DecodeParams(max_new_tokens=5))
        assert len(out.token_ids) == 5

    asyncio.run(main())
    with pytest.raises(KeyError):
        async_engine.set_mode("nope", "ar")
    with pytest.raises(ValueError, match="unknown decoding mode"):
        async_engine.set_mode("nope", "beam")


def test_downgrade_and_restore_running_self_spec_requests(engine):
    be = BatchEngine(engine, EngineConfig(max_batch_size=4, max_seq_len=128))
    spec = be.submit([1, 2, 3], DecodeParams(mode="self_spec", max_new_tokens=60, ignore_eos=True))
    plain_ar = be.submit([4, 5, 6], DecodeParams(mode="ar", max_new_tokens=60, ignore_eos=True))
    tokens, modes = [], []
    for _ in range(3):
        tokens += [t for c in be.step() if c.request_id == spec for t in c.token_ids]
    assert be.downgrade_self_spec(True) == [spec]  # the ar request is not touched
    for _ in range(6):
        for c in be.step():
            if c.request_id == spec:
                tokens += c.token_ids
                modes.append(c.mode)
    assert modes[-1] == "ar"
    assert be.downgrade_self_spec(False) == [spec]  # only the downgraded request goes back
    while be.has_work():
        for c in be.step():
            if c.request_id == spec:
                tokens += c.token_ids
                modes.append(c.mode)
    assert modes[-1] == "self_spec" and plain_ar
    assert tokens == engine.generate([1, 2, 3], DecodeParams(mode="ar", max_new_tokens=60, ignore_eos=True)).token_ids


def test_downgrade_reaches_self_spec_requests_still_waiting_for_a_slot(engine):
    be = BatchEngine(engine, EngineConfig(max_batch_size=1, max_seq_len=128, max_waiting=4))
    params = DecodeParams(mode="self_spec", max_new_tokens=20, ignore_eos=True)
    first = be.submit([1, 2, 3], params)
    be.step()  # `first` takes the only slot
    queued = be.submit([4, 5, 6], params)
    assert set(be.downgrade_self_spec(True)) == {first, queued}
    modes: dict[str, set] = {first: set(), queued: set()}
    tokens: dict[str, list] = {first: [], queued: []}
    while be.has_work():
        for c in be.step():
            if c.token_ids:
                modes[c.request_id].add(c.mode)
                tokens[c.request_id] += c.token_ids
    assert modes[queued] == {"ar"}  # admitted after the downgrade: never ran a self_spec cycle
    expected = engine.generate([4, 5, 6], DecodeParams(mode="ar", max_new_tokens=20, ignore_eos=True)).token_ids
    assert tokens[queued] == expected


def test_a_slow_consumer_gets_merged_chunks_without_losing_tokens(async_engine, engine):
    async def main():
        chunks = []
        async for c in async_engine.stream([1, 2, 3], DecodeParams(max_new_tokens=40, ignore_eos=True)):
            chunks.append(c)
            await asyncio.sleep(0.02)  # a slow consumer: steps queue up meanwhile
        return chunks

    chunks = asyncio.run(main())
    tokens = [t for c in chunks for t in c.token_ids]
    assert tokens == engine.generate([1, 2, 3], DecodeParams(max_new_tokens=40, ignore_eos=True)).token_ids
    assert len(chunks) < 40 and chunks[-1].finish_reason == "length" and chunks[-1].stats
