"""Sampled self-speculation is distributed as AR sampling, token by token, in the engine.

Method. Every sampled self-spec output is checked against the model itself: a causal
teacher-forced pass over prompt + output gives, for each output position k, the AR sampling
distribution p_k = P(x_k | prompt, x_<k) (temperature, top-k, top-p and the mask ban applied by
the engine's own `probabilities`). If self-spec samples like AR, every emitted x_k is a draw
from its p_k, whatever happened before it. Each draw's randomized probability integral
transform (tokens in order of falling p_k) is then exactly uniform, over requests whose p_k all
differ, so a Pearson chi-square test of those values in 8 equal bins is a goodness-of-fit test
of "x_k ~ p_k". It runs per output position 1..5 (block length 4: positions 1-3 are the first
cycle's drafts, 4 its bonus or residual draw, 5 in the second cycle), over the five pooled,
and for the bonus tokens
alone: a cycle that accepted all B-1 drafts draws its last token from p at the position after
them, and conditioning on that event leaves it distributed as p there (not so for accepted
drafts, which is why only the bonus can be tested on its own). A token outside p's support
fails at once.

Power needs distributions that are neither flat nor unreachable by the drafts: the checkpoint's
weights are scaled (init_std 0.15) so that p is far from uniform while a fifth of the first
cycles still accept every draft. Negative controls break the rule inside the engine (a
rejection drawn from p instead of the residual max(0, p - q); the bonus drawn from the last
draft's position) and show the same tests reject them.

Where: batch 1 (`Engine.generate`; slow, one generation at a time) and inside mixed batches of
`BatchEngine` (ar, diffusion and other self-spec neighbours, other block lengths, the draft LoRA
on some rows and off on others, chunked prefills, requests arriving while others run).
Both algorithms: linear, and quadratic, whose first cycle's drafts come from the initial-draft
pass and every later cycle's from the previous cycle's mask group (q = that group's diffusion
distributions), so positions 4-5 test drafts made inside the fused pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from scipy.stats import chi2

from replicas.engine import DecodeParams, Engine
from replicas.engine.batch_engine import BatchEngine
from replicas.engine.engine import load_batch_engine
from replicas.engine.engine_config import EngineConfig
from replicas.engine.kv_cache import KVCache
from replicas.engine.modes import base as modes_base
from replicas.engine.runner import ModelRunner
from replicas.engine.sampling import draw, probabilities, speculative_accept
from replicas.engine.sequence import ForwardPass
from replicas.engine.testing import write_random_checkpoint

BLOCK = 4
POSITIONS = (1, 2, 3, 4, 5)
MAX_NEW = POSITIONS[-1] + 1
BINS = 8  # equal-probability bins of the randomized PIT
ALPHA = 1e-4  # a correct engine fails one of these tests in 10,000 (the seeds are fixed: it never flakes)
# temperature 1 over the whole vocabulary (the gateway's default sampling), and a nucleus
SAMPLING = [DecodeParams(temperature=1.0), DecodeParams(temperature=0.8, top_p=0.95)]
MIN_BONUS = {1.0: 80, 0.8: 40}  # bonus tokens drawn out of 600 requests, at least
PROMPTS = ([1, 40, 41, 42], [1, 7, 300, 301, 302, 8, 9], [1, 250])
ALGORITHMS = ("linear", "quadratic")
MODULES = {"linear": modes_base, "quadratic": modes_base}  # both algorithms accept through base.accept_drafts


@dataclass
class Sample:
    prompt: list[int]
    output: list[int]
    bonus: set[int]  # output positions drawn as a bonus token (the cycle accepted every draft)
    params: DecodeParams


def bonus_positions(accepted: list[int], blocks: list[int], n_out: int) -> set[int]:
    """Output index 0 comes from the prefill; cycle j emits c_j drafts and one more token, a
    bonus when c_j = block - 1."""
    out, at = set(), 1
    for c, b in zip(accepted, blocks):
        if c == b - 1 and at + c < n_out:
            out.add(at + c)
        at += c + 1
    return out


def ar_distributions(engine: Engine, samples: list[Sample]) -> list[torch.Tensor]:
    """p_k for every sample and output position: one causal teacher-forced pass per sample
    (all samples in one batched forward), [len(output), V] each."""
    n = len(samples)
    longest = max(len(s.prompt) + len(s.output) for s in samples)
    cfg = engine.config
    cache = KVCache(num_layers=cfg.num_hidden_layers, num_slots=n, num_kv_heads=cfg.num_key_value_heads,
                    max_len=longest + 1, head_dim=cfg.head_dim, device=engine.device, dtype=engine.dtype)
    runner = ModelRunner(engine.model, cache)
    logits = runner.run([(i, ForwardPass(tokens=s.prompt + s.output, start=0, causal=True))
                         for i, s in enumerate(samples)])
    out = []
    for s, lg in zip(samples, logits):
        rows = lg[len(s.prompt) - 1: len(s.prompt) - 1 + len(s.output)]  # row k predicts output k
        out.append(probabilities(rows.float(), s.params, cfg.mask_token_id))
    return out


def gof_pvalue(draws: list[tuple[torch.Tensor, int]], seed: int = 0) -> float:
    """Chi-square goodness of fit of tokens drawn each from its own distribution: each draw's
    randomized probability integral transform u = F(x-) + U p(x) (tokens in order of falling
    probability, U uniform) is exactly uniform on [0, 1) when x was drawn from p, so Pearson's
    test of the u's against BINS equal bins applies. Fails at once on a token p cannot produce."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(BINS, dtype=torch.float64)
    for p, token in draws:
        p = p.double()
        assert p[token] > 0, f"token {token} has probability 0 under the AR distribution"
        order = torch.argsort(p, descending=True, stable=True)
        rank = int((order == token).nonzero())
        below = float(p[order[:rank]].sum())
        u = min(below + float(torch.rand((), generator=g, dtype=torch.float64)) * float(p[token]), 1 - 1e-12)
        counts[int(u * BINS)] += 1
    expected = counts.sum() / BINS
    return float(chi2.sf(float(((counts - expected) ** 2 / expected).sum()), BINS - 1))


def pvalues(engine: Engine, samples: list[Sample]) -> dict[str, float]:
    dists = ar_distributions(engine, samples)
    out = {}
    for k in POSITIONS:
        out[f"position {k}"] = gof_pvalue([(d[k], s.output[k]) for s, d in zip(samples, dists)])
    out["positions 1-5"] = gof_pvalue([(d[k], s.output[k]) for s, d in zip(samples, dists) for k in POSITIONS])
    out["bonus"] = gof_pvalue([(d[k], s.output[k]) for s, d in zip(samples, dists) for k in s.bonus])
    return out


def bonus_count(samples: list[Sample]) -> int:
    return sum(len(s.bonus) for s in samples)


@pytest.fixture(scope="module")
def peaky_dir(tmp_path_factory):
    """Weights scaled up so next-token distributions are far from uniform, and a draft LoRA."""
    return write_random_checkpoint(tmp_path_factory.mktemp("spec") / "m", seed=5, init_std=0.15, lora_rank=4)


@pytest.fixture(scope="module")
def peaky(peaky_dir):
    return Engine.from_pretrained(peaky_dir)


# ---- batch 1 -----------------------------------------------------------------------------

def generate_samples(engine: Engine, n: int, params: DecodeParams, seed0: int = 0,
                     algorithm: str = "linear") -> list[Sample]:
    samples = []
    for i in range(n):
        prompt = list(PROMPTS[i % len(PROMPTS)])
        p = params.with_(mode="self_spec", max_new_tokens=MAX_NEW, block_length=BLOCK, seed=seed0 + i,
                         ignore_eos=True, spec_algorithm=algorithm)
        out = engine.generate(prompt, p)
        blocks = [BLOCK] * len(out.accepted_lengths)
        samples.append(Sample(prompt, out.token_ids, bonus_positions(out.accepted_lengths, blocks, MAX_NEW), p))
    return samples


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("params", SAMPLING, ids=["t1", "t0.8-p0.95"])
def test_batch_1_self_spec_samples_as_ar(peaky, params, algorithm):
    samples = generate_samples(peaky, 600, params, algorithm=algorithm)
    assert bonus_count(samples) >= MIN_BONUS[params.temperature]  # the bonus branch ran often enough
    p = pvalues(peaky, samples)
    assert min(p.values()) > ALPHA, p


# ---- mixed batches -----------------------------------------------------------------------

def batch_samples(engine_dir, n: int, params: DecodeParams, seed0: int = 0, max_batch: int = 48,
                  algorithm: str = "linear") -> list[Sample]:
    """`n` sampled self-spec requests (block 4, `algorithm`) among ar, diffusion and greedy self-spec
    neighbours (both algorithms), with and without the draft LoRA, arriving in waves while others run."""
    engine = load_batch_engine(engine_dir, EngineConfig(max_batch_size=max_batch, max_seq_len=64,
                                                                  max_waiting=4 * n, prefill_chunk=3))
    tested: dict[str, tuple[list[int], DecodeParams]] = {}
    neighbours = [
        DecodeParams(mode="ar", max_new_tokens=9, temperature=1.0, ignore_eos=True),
        DecodeParams(mode="ar", max_new_tokens=13, ignore_eos=True),
        DecodeParams(mode="diffusion", max_new_tokens=10, block_length=4, ignore_eos=True),
        DecodeParams(mode="diffusion", max_new_tokens=7, block_length=2, temperature=0.8, ignore_eos=True),
        DecodeParams(mode="self_spec", max_new_tokens=11, block_length=8, ignore_eos=True),
        DecodeParams(mode="self_spec", max_new_tokens=9, block_length=2, temperature=1.0, ignore_eos=True),
        DecodeParams(mode="self_spec", spec_algorithm="quadratic", max_new_tokens=10, block_length=3,
                     ignore_eos=True),
        DecodeParams(mode="self_spec", spec_algorithm="linear" if algorithm == "quadratic" else "quadratic",
                     max_new_tokens=8, block_length=4, temperature=1.0, ignore_eos=True),
    ]
    pending = []
    for i in range(n):
        prompt = list(PROMPTS[i % len(PROMPTS)])
        p = params.with_(mode="self_spec", max_new_tokens=MAX_NEW, block_length=BLOCK, seed=seed0 + i,
                         ignore_eos=True, draft_lora=bool(i % 2), spec_algorithm=algorithm)
        pending.append((f"t{i}", prompt, p))
        if i % 4 == 3:
            j = i // 4
            pending.append((f"n{i}", [1, 60 + j % 50, 61], neighbours[j % len(neighbours)].with_(seed=10_000 + i)))
    outputs: dict[str, list[int]] = {}
    finals: dict[str, dict] = {}
    wave = 0
    while pending or engine.has_work():
        for rid, prompt, p in pending[:max_batch // 3]:  # a third of the batch arrives at each step
            engine.submit(prompt, p, request_id=rid)
            if rid.startswith("t"):
                tested[rid] = (prompt, p)
        pending = pending[max_batch // 3:]
        wave += 1
        for chunk in engine.step():
            assert chunk.finish_reason != "error", chunk.error
            outputs.setdefault(chunk.request_id, []).extend(chunk.token_ids)
            if chunk.finish_reason is not None:
                finals[chunk.request_id] = chunk.stats
    samples = []
    for rid, (prompt, p) in tested.items():
        out, stats = outputs[rid], finals[rid]
        assert len(out) == MAX_NEW and stats["mode"] == "self_spec" and stats["spec_algorithm"] == algorithm
        assert set(stats["draft_blocks"]) == {BLOCK}
        samples.append(Sample(prompt, out, bonus_positions(stats["accepted_lengths"], stats["draft_blocks"], MAX_NEW),
                              p))
    return samples


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("params", [SAMPLING[0], pytest.param(SAMPLING[1], marks=pytest.mark.slow)],
                         ids=["t1", "t0.8-p0.95"])
def test_self_spec_inside_mixed_batches_samples_as_ar(peaky_dir, peaky, params, algorithm):
    samples = batch_samples(peaky_dir, 600, params, algorithm=algorithm)
    assert bonus_count(samples) >= MIN_BONUS[params.temperature]
    p = pvalues(peaky, samples)
    assert min(p.values()) > ALPHA, p


# ---- negative controls: the same tests catch a wrong rule --------------------------------

def residual_ignored(drafts, q, p, generator):
    """The right acceptance test, but a rejection draws from p instead of max(0, p - q)."""
    c, extra = speculative_accept(drafts, q, p, generator)
    if c < drafts.shape[0]:
        extra = int(draw(p[c: c + 1], generator))
    return c, extra


def bonus_off_by_one(drafts, q, p, generator):
    """The right rule, except that the bonus is drawn from the last draft's position."""
    c, extra = speculative_accept(drafts, q, p, generator)
    if c == drafts.shape[0]:
        extra = int(draw(p[c - 1: c], generator))
    return c, extra


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("rule, caught_at", [(residual_ignored, "position"), (bonus_off_by_one, "bonus")])
def test_the_tests_reject_a_wrong_rule(peaky_dir, peaky, monkeypatch, rule, caught_at, algorithm):
    monkeypatch.setattr(MODULES[algorithm], "speculative_accept", rule)
    samples = batch_samples(peaky_dir, 600, SAMPLING[0], seed0=50_000, algorithm=algorithm)
    p = pvalues(peaky, samples)
    assert min(v for k, v in p.items() if k.startswith(caught_at)) < ALPHA, p  # the test above would fail


def test_bonus_positions_follow_the_cycles():
    # block 4: cycle 1 accepts 3 (bonus at 4), cycle 2 accepts 1 (a residual draw at 6)
    assert bonus_positions([3, 1], [4, 4], 10) == {4}
    assert bonus_positions([0, 3, 3], [4, 4, 4], 9) == {5}  # 1 | 2..5 | 6..9 cut at 9 tokens
    assert bonus_positions([2, 7], [4, 8], 20) == {11}
