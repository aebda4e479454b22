"""Token-budget scheduling and recompute preemption: running rows advance on every step while a
long prompt prefills in chunks, prefills are first come first served, the newest request is the
preemption victim and goes back to the head of the queue, and a preempted request (mid-cycle
included) makes the tokens of its unpreempted run."""

from __future__ import annotations

import random

import pytest

from replicas.engine import BatchEngine, DecodeParams, EngineConfig
from replicas.engine.scheduler import Scheduler

from .test_paged_kv import drive, mixed_jobs


def test_running_rows_advance_on_every_step_while_a_2000_token_prompt_prefills(engine):
    budget = 256
    be = BatchEngine(engine, EngineConfig(max_batch_size=4, max_seq_len=2100, max_num_batched_tokens=budget,
                                          prefill_chunk=512))
    rows = {}
    for mode in ("ar", "self_spec", "diffusion"):
        rows[be.submit([1, 2, 3, len(rows)], DecodeParams(mode=mode, max_new_tokens=200, ignore_eos=True,
                                                          block_length=8, threshold=0.9))] = mode
    while any(r.prefilling for r in be.scheduler.running.values()) or be.scheduler.waiting:
        be.step()
    rng = random.Random(0)
    long_prompt = [rng.randrange(101, engine.config.vocab_size) for _ in range(2000)]
    params = DecodeParams(max_new_tokens=4, ignore_eos=True)
    long_id = be.submit(long_prompt, params)
    tokens, steps = [], 0
    while not tokens:
        before = {rid: be.scheduler.running[rid].seq.forward_passes for rid in rows}
        for c in be.step():
            assert c.finish_reason is None
            if c.request_id == long_id:
                tokens += c.token_ids
        steps += 1
        for rid in rows:  # every running row took part in this step
            assert be.scheduler.running[rid].seq.forward_passes == before[rid] + 1, (steps, rows[rid])
        assert be.stats.last_step_tokens <= budget
    decode_tokens = 1 + 8 + 8  # an AR token, a self-spec draft or verify, a diffusion canvas or commit
    assert steps == -(-2000 // (budget - decode_tokens))  # the prompt is spread over the leftover budget
    while be.has_work():
        for c in be.step():
            if c.request_id == long_id:
                tokens += c.token_ids
    assert tokens == engine.generate(long_prompt, params).token_ids


def test_prefill_chunks_are_first_come_first_served(engine):
    be = BatchEngine(engine, EngineConfig(max_batch_size=4, max_seq_len=200, max_num_batched_tokens=16,
                                          prefill_chunk=64))
    first = be.submit(list(range(101, 141)), DecodeParams(max_new_tokens=2))
    second = be.submit(list(range(201, 211)), DecodeParams(max_new_tokens=2))
    order = []
    while be.has_work():
        order += [c.request_id for c in be.step() if c.token_ids and c.request_id not in order]
    assert order == [first, second]
    assert be.stats_snapshot()["scheduled_tokens"]["count"] > 0


@pytest.fixture
def preemptions(monkeypatch):
    """Every preemption: (victim id, its mode, whether it was mid-cycle, the running ids by arrival)."""
    log = []
    original = Scheduler.preempt

    def preempt(self, row, plan):
        mid_cycle = row.mode is not None and not row.prefilling and not row.mode.at_boundary
        log.append((row.request_id, row.mode_name, mid_cycle,
                    sorted(self.running, key=lambda r: self.running[r].seq.arrival)))
        original(self, row, plan)
        assert self.waiting[0] is row  # re-queued first

    monkeypatch.setattr(Scheduler, "preempt", preempt)
    return log


def test_newest_request_is_the_victim_and_is_requeued_first(engine, preemptions):
    config = EngineConfig(max_batch_size=3, max_seq_len=64, kv_block_size=4, num_kv_blocks=18)
    be = BatchEngine(engine, config)
    ids = [be.submit([1, 2, 3 + i], DecodeParams(max_new_tokens=50, ignore_eos=True)) for i in range(3)]
    out = {rid: [] for rid in ids}
    while be.has_work():
        for c in be.step():
            out[c.request_id] += c.token_ids
    assert preemptions and be.stats_snapshot()["preemptions"] == len(preemptions)
    for victim, _, _, running in preemptions:
        assert victim == running[-1]  # the latest arrival among the running requests
    for i, rid in enumerate(ids):
        assert out[rid] == engine.generate([1, 2, 3 + i], DecodeParams(max_new_tokens=50, ignore_eos=True)).token_ids


def check_preempted_run(eng, seed: int, log: list) -> None:
    """A pool far too small for the load: requests in all three modes are preempted, and still
    make the tokens of an unpreempted run (a roomy pool, and each alone)."""
    jobs = mixed_jobs(random.Random(seed), eng, 12, prompt_len=(5, 40), new=(20, 40))
    before = len(log)
    config = EngineConfig(max_batch_size=6, max_seq_len=96, kv_block_size=4, num_kv_blocks=40, prefill_chunk=9)
    got = drive(BatchEngine(eng, config), jobs, arrivals_per_step=3)
    assert len(log) - before >= 3
    roomy = drive(BatchEngine(eng, EngineConfig(max_batch_size=6, max_seq_len=96, prefill_chunk=9)), jobs, 3)
    assert got == roomy
    for i, (prompt, params) in enumerate(jobs):
        assert got[i] == eng.generate(prompt, params).token_ids


@pytest.mark.parametrize("seed", range(4))
def test_preempted_requests_equal_their_unpreempted_greedy_runs(engine, lora_engine, seed, preemptions):
    check_preempted_run((engine, lora_engine)[seed % 2], seed, preemptions)


def test_preemption_reaches_self_spec_and_diffusion_mid_cycle(engine, preemptions):
    """Preempted after a self-spec draft (before its verify), inside a diffusion canvas: the
    resumed request carries on with the same mode state."""
    for seed in range(4, 8):
        check_preempted_run(engine, seed, preemptions)
    mid_cycle = {mode for _, mode, mid, _ in preemptions if mid}
    assert {"self_spec", "diffusion"} <= mid_cycle


@pytest.mark.parametrize("mode", ["ar", "self_spec", "diffusion"])
def test_passes_reserve_their_lookahead_and_boundaries_free_whole_blocks(engine, mode):
    """Each planned pass's blocks cover its last column (a draft, verify or canvas reserves a
    whole block ahead); at each cycle boundary the blocks past the valid length are gone (the
    rejected drafts' blocks are back in the pool)."""
    bs = 2
    be = BatchEngine(engine, EngineConfig(max_batch_size=1, max_seq_len=64, kv_block_size=bs))
    rid = be.submit([1, 2, 3], DecodeParams(mode=mode, max_new_tokens=40, ignore_eos=True, block_length=8,
                                            threshold=0.9))
    original = be.scheduler.schedule
    covered, trimmed = [], []

    def schedule():
        plan = original()
        for row, p in zip(plan.rows, plan.passes):
            covered.append(len(row.seq.kv.blocks) * bs >= p.start + len(p.tokens))
        return plan

    be.scheduler.schedule = schedule
    while be.has_work():
        be.step()
        row = be.scheduler.running.get(rid)
        if row is not None and row.at_boundary:
            kv = row.seq.kv
            trimmed.append(len(kv.blocks) == -(-kv.length // bs))
            assert be.blocks.allocator.num_used == len(kv.blocks)
    assert covered and all(covered) and trimmed and all(trimmed)
    if mode == "self_spec":
        stats = be.stats_snapshot()
        assert stats["kv_blocks_used"] == 0 and stats["kv_blocks_free"] == stats["kv_blocks_total"]


def test_the_default_step_budget_is_512_tokens_on_a_cpu_and_2048_on_cuda():
    from dataclasses import replace

    from replicas.config import ReplicaConfig
    from replicas.engine.engine_config import STEP_TOKENS

    assert STEP_TOKENS == {"cpu": 512, "cuda": 2048}
    assert EngineConfig().max_num_batched_tokens == 512
    assert EngineConfig(device="cuda").max_num_batched_tokens == 2048
    assert EngineConfig(device="cuda:1").max_num_batched_tokens == 2048
    assert EngineConfig(device="cuda", max_num_batched_tokens=96).max_num_batched_tokens == 96
    assert replace(EngineConfig(), max_batch_size=8).max_num_batched_tokens == 512
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        EngineConfig(max_num_batched_tokens=0)
    # the replica passes "unset" down, so the engine's device decides
    assert ReplicaConfig(model_path="m").engine_config().max_num_batched_tokens == 512
    assert ReplicaConfig(model_path="m", device="cuda").engine_config().max_num_batched_tokens == 2048
    limits = {"max_num_batched_tokens": 1024}
    assert ReplicaConfig(model_path="m", engine=limits).engine_config().max_num_batched_tokens == 1024


def test_on_a_cpu_a_wave_of_prompts_is_spread_over_steps_that_all_advance_the_running_rows(engine):
    """The case the CPU default is for: 16 AR rows decode when 16 prompts of 64 tokens arrive at
    once (a closed loop's wave). With 2048 the whole wave (1,024 tokens) was one step, which
    stalled every running row for the cost of ~60 decode steps."""
    be = BatchEngine(engine, EngineConfig(max_batch_size=32, max_seq_len=256))
    params = DecodeParams(max_new_tokens=100, ignore_eos=True)

    def prefilling(ids: list[str]) -> bool:
        rows = be.scheduler.running
        return any(rows[rid].prefilling for rid in ids if rid in rows) or bool(be.scheduler.waiting)

    running = [be.submit([101 + i, 102, 103, 104], params) for i in range(16)]
    while prefilling(running):
        be.step()
    rng = random.Random(1)
    wave = [be.submit([rng.randrange(101, engine.config.vocab_size) for _ in range(64)], params) for _ in range(16)]
    steps = 0
    while prefilling(wave):
        before = {rid: be.scheduler.running[rid].seq.forward_passes for rid in running}
        be.step()
        steps += 1
        assert be.stats.last_step_tokens <= 512
        for rid in running:
            assert be.scheduler.running[rid].seq.forward_passes == before[rid] + 1
    assert steps == -(-16 * 64 // (512 - 16))  # the wave took the budget the running rows left, step by step
