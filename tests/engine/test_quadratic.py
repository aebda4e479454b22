"""Quadratic self-speculation: greedy == AR greedy (alone and in mixed batches, LoRA on and off),
one cycle == a cache-free brute force of NLD.md's description, one forward per cycle, the KV
cache == the verified prefix after every cycle, the draft LoRA on mask rows only.
(Sampled quadratic requests are chi-square tested in test_spec_sampling.py.)"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from replicas.engine import BatchEngine, DecodeParams, Engine, EngineConfig
from replicas.engine.kv_cache import KVCache
from replicas.engine.model import AttentionInputs
from replicas.engine.modes import QuadraticSpecMode, finish_prefill
from replicas.engine.modes.quadratic import group_mask, group_positions
from replicas.engine.runner import ModelRunner
from replicas.engine.sampling import ban_mask
from replicas.engine.sequence import ForwardPass

from .test_modes import random_prompt

SHIPPED = Path(__file__).resolve().parents[2] / "models" / "nld-tiny-pystdlib"
BLOCKS = (4, 8, 16)


def quadratic(**kw) -> DecodeParams:
    return DecodeParams(mode="self_spec", spec_algorithm="quadratic", **kw)


@pytest.fixture(scope="module")
def shipped():
    """The embedded trained model (drafts that are often accepted) with its draft LoRA."""
    return Engine.from_pretrained(SHIPPED, max_block_length=16)


@pytest.fixture(scope="module")
def random16(ckpt_dir):
    return Engine.from_pretrained(ckpt_dir, max_block_length=16)


@pytest.fixture(scope="module")
def random16_lora(lora_ckpt_dir):
    return Engine.from_pretrained(lora_ckpt_dir, max_block_length=16)


def shipped_prompts(n: int, seed: int = 0) -> list[list[int]]:
    """Python-like prompts the shipped model continues predictably (and random ones)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(SHIPPED / "tokenizer.json"))
    texts = ["import os\nimport sys\n\n\ndef main(", "class Config:\n    def __init__(self, name):\n        self.",
             "for i in range(10):\n    print(", "def read(path):\n    with open(path) as f:\n        return f.",
             "    if x is None:\n        raise ValueError(", "from typing import "]
    rng = random.Random(seed)
    out = [tok.encode(texts[i % len(texts)]).ids for i in range(n)]
    return [[1] + p if i % 3 else [1] + [rng.randrange(101, 4000) for _ in range(rng.randint(1, 12))] + p
            for i, p in enumerate(out)]


# ---- greedy == AR ---------------------------------------------------------------------------

@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("lora", [True, False], ids=["lora-on", "lora-off"])
def test_greedy_quadratic_equals_ar_alone(shipped, block, lora):
    accepted = 0
    for prompt in shipped_prompts(6):
        ar = shipped.generate(prompt, DecodeParams(mode="ar", max_new_tokens=40))
        q = shipped.generate(prompt, quadratic(max_new_tokens=40, block_length=block, draft_lora=lora))
        assert q.token_ids == ar.token_ids, (prompt, block, lora)
        assert q.finish_reason == ar.finish_reason and q.spec_algorithm == "quadratic"
        assert all(0 <= c <= block - 1 for c in q.accepted_lengths)
        accepted += sum(q.accepted_lengths)
    assert accepted > 0  # drafts were accepted: the accept path ran, not only the bonus


@pytest.mark.parametrize("fixture", ["random16", "random16_lora"])
def test_greedy_quadratic_equals_ar_on_random_weights(fixture, request):
    engine = request.getfixturevalue(fixture)
    rng = random.Random(fixture)
    for trial in range(12):
        prompt = random_prompt(rng, engine.config.vocab_size)
        block, n = rng.choice(BLOCKS), rng.randint(1, 30)
        ar = engine.generate(prompt, DecodeParams(mode="ar", max_new_tokens=n))
        q = engine.generate(prompt, quadratic(max_new_tokens=n, block_length=block))
        assert q.token_ids == ar.token_ids, (trial, prompt, block)


def run_batch(engine: Engine, jobs, config: EngineConfig, on_step=None) -> dict[str, tuple[list[int], dict]]:
    """Submit jobs (rid, prompt, params) two per step; returns rid -> (tokens, final stats)."""
    be = BatchEngine(engine, config)
    out: dict[str, list[int]] = {}
    stats: dict[str, dict] = {}
    pending = list(jobs)
    while pending or be.has_work():
        for rid, prompt, params in pending[:2]:
            be.submit(prompt, params, request_id=rid)
        pending = pending[2:]
        for chunk in be.step():
            assert chunk.finish_reason != "error", chunk.error
            out.setdefault(chunk.request_id, []).extend(chunk.token_ids)
            if chunk.finish_reason:
                stats[chunk.request_id] = chunk.stats
        if on_step:
            on_step(be)
    return {rid: (out[rid], stats[rid]) for rid in stats}


def test_greedy_quadratic_equals_ar_inside_mixed_batches(shipped):
    rng = random.Random(3)
    prompts = shipped_prompts(24, seed=3)
    neighbours = [DecodeParams(mode="ar", max_new_tokens=20, temperature=1.0, seed=1),
                  DecodeParams(mode="diffusion", max_new_tokens=24, block_length=8),
                  DecodeParams(mode="self_spec", spec_algorithm="linear", max_new_tokens=30, block_length=8),
                  DecodeParams(mode="self_spec", spec_algorithm="linear", max_new_tokens=18, block_length=4,
                               temperature=0.8, seed=2)]
    jobs = []
    for i, prompt in enumerate(prompts):
        if i % 3 == 2:
            jobs.append((f"n{i}", prompt, neighbours[i % len(neighbours)]))
        else:
            jobs.append((f"q{i}", prompt, quadratic(max_new_tokens=rng.randint(10, 36), block_length=BLOCKS[i % 3],
                                                    draft_lora=bool(i % 2))))
    got = run_batch(shipped, jobs, EngineConfig(max_batch_size=8, max_seq_len=400, prefill_chunk=5))
    accepted = 0
    for rid, prompt, params in jobs:
        tokens, stats = got[rid]
        if rid.startswith("q"):
            ar = shipped.generate(prompt, DecodeParams(mode="ar", max_new_tokens=params.max_new_tokens))
            assert tokens == ar.token_ids, rid
            assert stats["spec_algorithm"] == "quadratic"
            accepted += sum(stats["accepted_lengths"])
        elif params.mode == "self_spec":
            assert stats["spec_algorithm"] == "linear"
        if params.greedy:
            assert tokens == shipped.generate(prompt, params).token_ids, rid  # neighbours unharmed
    assert accepted > 0


@pytest.mark.parametrize("fixture", ["random16", "random16_lora"])
def test_greedy_quadratic_equals_ar_in_random_mixed_batches_with_tiers(fixture, request):
    """Random prompts, all modes and both algorithms, arrivals while others run, draft tiers
    that shrink the quadratic block as the batch grows."""
    engine = request.getfixturevalue(fixture)
    rng = random.Random(11)
    jobs = []
    for i in range(16):
        mode = rng.choice(["ar", "diffusion", "linear", "quadratic", "quadratic"])
        kw = dict(max_new_tokens=rng.randint(1, 24), block_length=rng.choice(BLOCKS))
        params = (quadratic(**kw) if mode == "quadratic" else
                  DecodeParams(mode="self_spec", spec_algorithm="linear", **kw) if mode == "linear" else
                  DecodeParams(mode=mode, **kw))
        jobs.append((f"r{i}", random_prompt(rng, engine.config.vocab_size), params))
    config = EngineConfig(max_batch_size=6, max_seq_len=400, prefill_chunk=7,
                          draft_tiers=({"max_running": 2, "block_length": 16}, {"max_running": 6, "block_length": 4}))
    got = run_batch(engine, jobs, config)
    shrunk = False
    for rid, prompt, params in jobs:
        tokens, stats = got[rid]
        ar = engine.generate(prompt, DecodeParams(mode="ar", max_new_tokens=params.max_new_tokens))
        if params.mode != "diffusion":
            assert tokens == ar.token_ids, (rid, params)
        if params.spec_algorithm == "quadratic" and params.mode == "self_spec":
            assert all(g <= params.block_length for g in stats["draft_blocks"])
            shrunk |= any(g < params.block_length for g in stats["draft_blocks"])
    assert shrunk  # a tier cut some quadratic cycles


# ---- one cycle against a brute-force reference -------------------------------------------

def reference_cycle(engine: Engine, prefix: list[int], d: list[int], masks: int, lora: bool):
    """NLD.md's quadratic cycle recomputed from scratch, without a cache or the fused layout:
    AR verification by one causal forward per draft position, then group c's pre-draft as a
    plain sequence prefix + d_0..d_c + MASK x masks at consecutive positions (the masks see
    everything before them and each other; the LoRA on the masks only). Returns (c, the
    emitted tokens, the next drafts)."""
    model, mask_id = engine.model, engine.config.mask_token_id

    def forward(tokens: list[int], mask: torch.Tensor, lora_rows: torch.Tensor | None) -> torch.Tensor:
        t = len(tokens)
        with torch.no_grad():
            h = model(torch.tensor([tokens]), torch.arange(t)[None], None,
                      AttentionInputs(mask=mask[None, None], lora_weight=lora_rows))
            return ban_mask(model.logits(h)[0], mask_id)  # [t, V]

    a = []
    for i in range(len(d)):
        seq = prefix + d[: i + 1]
        a.append(int(forward(seq, torch.ones(len(seq), len(seq), dtype=torch.bool).tril(), None)[-1].argmax()))
    c = 0
    while c < len(d) - 1 and d[c + 1] == a[c]:
        c += 1
    seq = prefix + d[: c + 1] + [mask_id] * masks
    full = torch.ones(len(seq), len(seq), dtype=torch.bool).tril()
    first_mask = len(prefix) + c + 1
    full[first_mask:, :] = True
    lora_rows = torch.zeros(1, len(seq))
    lora_rows[0, first_mask:] = float(lora)
    pre = forward(seq, full, lora_rows if lora and model.has_lora else None)
    return c, d[1 : c + 1] + [a[c]], pre[first_mask + 1 :].argmax(-1).tolist()


@pytest.mark.parametrize("fixture, lora", [("random16", False), ("random16_lora", True), ("shipped", True),
                                           ("shipped", False)])
@pytest.mark.parametrize("block", [4, 8])
def test_one_cycle_equals_a_brute_force_reference(fixture, lora, block, request):
    engine = request.getfixturevalue(fixture)
    rng = random.Random(block)
    cs = set()
    for trial in range(block + 1):
        prompt = random_prompt(rng, engine.config.vocab_size)
        params = engine.check_request(prompt, quadratic(max_new_tokens=64, block_length=block, draft_lora=lora))
        continuation = engine.generate(prompt, DecodeParams(mode="ar", max_new_tokens=block + 1)).token_ids
        drafts = list(continuation[1:block])
        if trial < block - 1:  # a wrong draft at position `trial`: c = trial; otherwise all correct
            drafts[trial] = (drafts[trial] + 1 + rng.randrange(50)) % engine.config.vocab_size
            drafts[trial] += drafts[trial] == engine.config.mask_token_id
        cfg = engine.config
        cache = KVCache(num_layers=cfg.num_hidden_layers, num_slots=1, num_kv_heads=cfg.num_key_value_heads,
                        max_len=len(prompt) + block * (block + 2), head_dim=cfg.head_dim)
        runner = ModelRunner(engine.model, cache)
        seq = engine.new_sequence(prompt, params, slot=0)
        finish_prefill(seq, runner.run([(0, ForwardPass(prompt, 0, True, all_logits=False))])[0])
        mode = QuadraticSpecMode(seq)
        mode.drafts = drafts
        p = mode.next_pass()
        assert len(p.tokens) == block * (block + 1)
        emitted = mode.advance(runner.run([(0, p)])[0])
        c, want_emitted, want_next = reference_cycle(engine, prompt, [continuation[0]] + drafts, block, lora)
        assert seq.accepted_lengths == [c] and emitted == want_emitted, trial
        assert seq.kv.length == len(prompt) + 1 + c  # the verified prefix: d_0 and c drafts
        assert mode.drafts == want_next, trial
        assert emitted == continuation[1 : c + 2]  # greedy: AR's tokens
        cs.add(c)
    assert cs == set(range(block))  # every accept count 0 .. B-1 (all accepted) was exercised


# ---- forwards, KV length, LoRA rows --------------------------------------------------------

class CountingRunner(ModelRunner):
    calls = 0

    def run_with_greedy(self, items):
        CountingRunner.calls += 1
        return super().run_with_greedy(items)


def test_one_forward_per_cycle_and_kv_is_the_verified_prefix(shipped, monkeypatch):
    monkeypatch.setattr(shipped, "runner_cls", CountingRunner)
    CountingRunner.calls = 0
    prompts = shipped_prompts(4, seed=9)
    be = BatchEngine(shipped, EngineConfig(max_batch_size=4, max_seq_len=400))
    rids = [be.submit(p, quadratic(max_new_tokens=48, block_length=b, ignore_eos=True))
            for p, b in zip(prompts, (4, 8, 16, 8))]
    seen_cycles = 0
    steps = 0
    while be.has_work():
        rows = {r.request_id: r for r in be.scheduler.running.values()}
        before = {rid: (row.seq.forward_passes, len(row.seq.accepted_lengths)) for rid, row in rows.items()
                  if not row.prefilling}
        be.step()
        steps += 1
        assert CountingRunner.calls == steps  # one batched forward per step
        for rid, (fwd, cycles) in before.items():
            seq = rows[rid].seq
            assert seq.forward_passes == fwd + 1  # each decoding row took part in that one forward
            if len(seq.accepted_lengths) > cycles:  # a cycle ran: one forward, KV = verified prefix
                seen_cycles += 1
                assert len(seq.accepted_lengths) == cycles + 1
                if not seq.finished:
                    assert seq.kv.length == len(seq.prompt_ids) + len(seq.output) - 1  # pending uncached
            else:  # the initial-draft pass (first decode step only): nothing emitted, nothing cached
                assert cycles == 0 and fwd == 0
    assert len(rids) == 4 and seen_cycles > 0
    assert be.stats_snapshot()["kv_slots_used"] == 0


def test_forward_passes_count_one_per_cycle_plus_the_initial_draft(shipped):
    for block in BLOCKS:
        out = shipped.generate(shipped_prompts(1)[0], quadratic(max_new_tokens=40, block_length=block,
                                                                ignore_eos=True))
        assert out.forward_passes == 1 + len(out.accepted_lengths)
        assert len(out.token_ids) == min(40, 1 + sum(c + 1 for c in out.accepted_lengths)) == 40


def test_draft_lora_applies_to_mask_rows_only(random16_lora):
    """Per-token LoRA weights: in one quadratic pass the draft rows' logits equal the pass
    without the adapter (they see no mask row), the mask rows' logits change."""
    engine = random16_lora
    cfg = engine.config
    prompt = [1, 40, 41, 42, 43]
    cache = KVCache(num_layers=cfg.num_hidden_layers, num_slots=1, num_kv_heads=cfg.num_key_value_heads,
                    max_len=64, head_dim=cfg.head_dim)
    runner = ModelRunner(engine.model, cache)
    runner.run([(0, ForwardPass(prompt, 0, True))])
    groups, masks = 3, 4
    tokens = [7, 8, 9] + [cfg.mask_token_id] * (groups * masks)

    def run(lora_tokens):
        p = ForwardPass(tokens, len(prompt), False, mask=group_mask(groups, masks),
                        positions=group_positions(len(prompt), groups, masks), lora_tokens=lora_tokens)
        return runner.run([(0, p)])[0]

    on = run([False] * groups + [True] * (groups * masks))
    off = run(None)
    torch.testing.assert_close(on[:groups], off[:groups], rtol=0, atol=1e-6)
    assert not torch.allclose(on[groups:], off[groups:], atol=1e-4)


def test_group_layout():
    m = group_mask(3, 2)  # d0 d1 d2 | g0: m m | g1: m m | g2: m m
    assert m[:3, :3].equal(torch.ones(3, 3, dtype=torch.bool).tril()) and not m[:3, 3:].any()
    assert m[3].tolist() == [True, False, False, True, True, False, False, False, False]
    assert m[6].tolist() == [True, True, False, False, False, True, True, False, False]
    assert m[8].tolist() == [True, True, True, False, False, False, False, True, True]
    assert group_positions(10, 3, 2) == [10, 11, 12, 11, 12, 12, 13, 13, 14]


def test_spec_algorithm_defaults_and_bad_values(random16):
    with pytest.raises(ValueError, match="spec_algorithm: unknown"):
        DecodeParams(spec_algorithm="cubic")
    with pytest.raises(ValueError, match="spec_algorithm"):
        EngineConfig(spec_algorithm="cubic")
    with pytest.raises(ValueError, match="quadratic_block_length"):
        EngineConfig(quadratic_block_length=1)
    be = BatchEngine(random16, EngineConfig(max_batch_size=2, max_seq_len=200, spec_algorithm="quadratic",
                                            quadratic_block_length=4))
    rid = be.submit([1, 2, 3], DecodeParams(mode="self_spec", max_new_tokens=5))
    row = be.scheduler.find(rid)
    assert row.seq.params.spec_algorithm == "quadratic" and row.seq.params.block_length == 4
    rid2 = be.submit([1, 2, 3], DecodeParams(mode="self_spec", max_new_tokens=5, spec_algorithm="linear"))
    assert be.scheduler.find(rid2).seq.params.block_length == random16.config.block_size
    with pytest.raises(ValueError, match=r"one quadratic self-spec cycle \(272 columns\)"):
        be.submit([1, 2, 3], quadratic(max_new_tokens=5, block_length=16))
    assert random16.check_request([1], DecodeParams(mode="self_spec")).spec_algorithm == "linear"


# ---- the paged pool: lookahead, trimming, preemption -------------------------------------

def test_quadratic_passes_reserve_their_columns_and_boundaries_trim(random16):
    """Each quadratic pass's blocks cover its B (B + 1) columns; after each cycle only the
    blocks of the verified prefix (plus the partial block) remain."""
    bs = 2
    be = BatchEngine(random16, EngineConfig(max_batch_size=1, max_seq_len=200, kv_block_size=bs))
    be.submit([1, 2, 3], quadratic(max_new_tokens=40, ignore_eos=True, block_length=8))
    original = be.scheduler.schedule
    covered, sizes = [], []

    def schedule():
        plan = original()
        for row, p in zip(plan.rows, plan.passes):
            covered.append(len(row.seq.kv.blocks) * bs >= p.start + len(p.tokens))
            sizes.append(len(p.tokens))
        return plan

    be.scheduler.schedule = schedule
    while be.has_work():
        be.step()
        for row in be.scheduler.running.values():
            if not row.prefilling:
                assert len(row.seq.kv.blocks) == -(-row.seq.kv.length // bs)
    assert all(covered) and 72 in sizes  # 8 groups of [d_i, MASK x 8]


def test_preempted_quadratic_requests_equal_their_unpreempted_runs(random16_lora, monkeypatch):
    from replicas.engine.scheduler import Scheduler

    from .test_paged_kv import drive

    victims = []
    original = Scheduler.preempt

    def preempt(self, row, plan):
        victims.append(row.mode_name if row.mode is not None else "prefill")
        original(self, row, plan)

    monkeypatch.setattr(Scheduler, "preempt", preempt)
    eng = random16_lora
    rng = random.Random(5)
    jobs = []
    for i in range(12):
        prompt = [rng.randrange(101, eng.config.vocab_size) for _ in range(rng.randint(5, 30))]
        kw = dict(max_new_tokens=rng.randint(20, 40), block_length=rng.randint(2, 4), ignore_eos=True)
        jobs.append((prompt, quadratic(**kw) if i % 2 == 0 else DecodeParams(mode=("ar", "self_spec")[i % 4 // 2],
                                                                             **kw)))
    config = EngineConfig(max_batch_size=6, max_seq_len=96, kv_block_size=4, num_kv_blocks=40, prefill_chunk=9)
    got = drive(BatchEngine(eng, config), jobs, arrivals_per_step=3)
    assert "self_spec" in victims  # quadratic or linear rows were preempted while decoding
    for i, (prompt, params) in enumerate(jobs):
        assert got[i] == eng.generate(prompt, DecodeParams(mode="ar", max_new_tokens=params.max_new_tokens,
                                                           ignore_eos=True)).token_ids, i


def test_only_requests_admitted_in_self_spec_run_quadratic(random16):
    """Admission reserves the quadratic lookahead only for self_spec requests: another mode asking
    for quadratic is admitted with one block of lookahead and would run linear if switched."""
    ar = random16.check_request([1, 2], DecodeParams(mode="ar", spec_algorithm="quadratic"))
    assert ar.spec_algorithm == "linear" and Engine.lookahead(ar) == ar.block_length
    q = random16.check_request([1, 2], quadratic(block_length=4))
    assert Engine.lookahead(q) == 20
    be = BatchEngine(random16, EngineConfig(max_batch_size=2, max_seq_len=200))
    rid = be.submit([1, 2, 3], quadratic(max_new_tokens=30, block_length=4, ignore_eos=True))
    be.step()
    be.downgrade_self_spec(True)
    be.step()
    be.step()
    assert be.scheduler.find(rid).mode.name == "ar"
    be.downgrade_self_spec(False)
    be.step()
    assert isinstance(be.scheduler.find(rid).mode, QuadraticSpecMode)  # back to quadratic
