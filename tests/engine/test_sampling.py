"""Sampling: seeded reproducibility, top-k/top-p, and the statistical equivalence of sampled
self-speculation and AR sampling (speculative rejection sampling, not exact match)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from scipy.stats import chi2_contingency, chisquare

from replicas.engine import DecodeParams, Engine
from replicas.engine.model import RMSNorm
from replicas.engine.sampling import draw, greedy_token, greedy_tokens, probabilities, select, speculative_accept
from replicas.engine.testing import write_random_checkpoint


def test_greedy_token_is_the_token_greedy_select_picks():
    """The fast greedy path (one argmax, no distribution) picks select's token, mask banned."""
    g = torch.Generator().manual_seed(3)
    params = DecodeParams(mode="ar", max_new_tokens=4)
    assert params.greedy
    for _ in range(50):
        logits = torch.randn(1, 64, generator=g) * 4
        expected, _ = select(logits, params, mask_id=7, generator=None)
        assert greedy_token(logits, 7) == int(expected)
        assert greedy_token(logits[0], 7) == int(expected)
    logits = torch.zeros(1, 64)
    logits[0, 7], logits[0, 30] = 9.0, 5.0  # the mask token leads: never chosen
    assert int(logits.argmax()) == 7
    assert greedy_token(logits, 7) == 30
    assert logits[0, 7] == 9.0  # the caller's logits are not modified


def test_greedy_tokens_is_greedy_token_of_each_row():
    """The batched pick (one argmax over many requests' last rows) is each row's own greedy token."""
    rows = torch.randn(6, 64, generator=torch.Generator().manual_seed(4)) * 4
    rows[2, 7] = 99.0  # the mask token leads on one row
    expected = [greedy_token(r[None], 7) for r in rows]
    assert greedy_tokens(rows.clone(), 7) == expected and expected[2] != 7


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_the_reference_formula(dtype):
    """RMSNorm's fused kernel computes x * rsqrt(mean(x^2) + eps) in float32, weight in x's dtype."""
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(32, 1e-5).to(dtype)
    norm.weight.data = (torch.rand(32, generator=g) + 0.5).to(dtype)
    x = (torch.randn(3, 5, 32, generator=g) * 3).to(dtype)
    x32 = x.float()
    ref = norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    out = norm(x)
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def exact_match_accept(drafts, q, p, generator):
    """The naive rule: keep drafts while they equal the target's top choice, then sample p."""
    target = p.argmax(-1)
    c = 0
    while c < drafts.shape[0] and int(drafts[c]) == int(target[c]):
        c += 1
    return c, int(draw(p[c : c + 1], generator))


def first_token_counts(rule, p, q, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = Counter()
    for _ in range(n):
        drafts = draw(q, g)
        c, extra = rule(drafts, q, p, g)
        counts[int(drafts[0]) if c > 0 else extra] += 1
    return torch.tensor([counts[i] for i in range(p.shape[-1])], dtype=torch.float64)


def expected_counts(p, n):
    p = p.double()
    return p / p.sum() * n


def synthetic(seed=0, vocab=6, k=3):
    g = torch.Generator().manual_seed(seed)
    p = (torch.randn(k + 1, vocab, generator=g) * 1.5).softmax(-1)
    q = (torch.log(p[:k]) + torch.randn(k, vocab, generator=g)).softmax(-1)  # a close but imperfect draft
    return p, q


def test_rejection_sampling_preserves_the_target_distribution():
    p, q = synthetic()
    n = 20_000
    counts = first_token_counts(speculative_accept, p, q, n)
    assert chisquare(counts, expected_counts(p[0], n)).pvalue > 1e-3


def test_the_statistical_test_rejects_exact_match_acceptance():
    p, q = synthetic()
    n = 20_000
    counts = first_token_counts(exact_match_accept, p, q, n)
    assert chisquare(counts, expected_counts(p[0], n)).pvalue < 1e-6


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0, 5.0]])
    probs = probabilities(logits, DecodeParams(temperature=1.0, top_k=2), mask_id=5)
    assert (probs[0, 2:] == 0).all() and probs[0, :2].sum() == pytest.approx(1.0)
    probs = probabilities(logits, DecodeParams(temperature=1.0, top_p=0.5), mask_id=5)
    assert probs[0, 0] == pytest.approx(1.0)  # the top token alone already covers half the mass


@pytest.fixture(scope="module")
def peaky_engine(tmp_path_factory):
    """Random weights scaled up so next-token distributions are far from uniform."""
    d = write_random_checkpoint(tmp_path_factory.mktemp("peaky") / "m", seed=5, init_std=0.08)
    return Engine.from_pretrained(d)


def sequences(engine, mode, n, **kw):
    out = Counter()
    for seed in range(n):
        params = DecodeParams(mode=mode, max_new_tokens=3, temperature=1.0, top_k=3, seed=seed, ignore_eos=True, **kw)
        out[tuple(engine.generate([1, 40, 41, 42], params).token_ids[:2])] += 1
    return out


def two_sample_pvalue(a: Counter, b: Counter, min_count: int = 10) -> float:
    keys = sorted(set(a) | set(b))
    big = [k for k in keys if a[k] + b[k] >= min_count]
    table = [[a[k] for k in big] + [sum(a[k] for k in keys if k not in big)],
             [b[k] for k in big] + [sum(b[k] for k in keys if k not in big)]]
    if table[0][-1] + table[1][-1] == 0:
        table = [row[:-1] for row in table]
    return chi2_contingency(table).pvalue


@pytest.mark.slow
def test_sampled_self_spec_matches_ar_distribution(peaky_engine):
    n = 2000  # (first, second) token pairs: the second is the first one a draft can decide
    ar = sequences(peaky_engine, "ar", n)
    spec = sequences(peaky_engine, "self_spec", n, block_length=4)
    assert len(ar) > 5  # the test distribution is not degenerate
    assert two_sample_pvalue(ar, spec) > 1e-3
    # both branches of the rule ran: some drafts were accepted, some rejected
    accepted = [c for seed in range(50) for c in peaky_engine.generate(
        [1, 40, 41, 42], DecodeParams(mode="self_spec", max_new_tokens=12, temperature=1.0, top_k=3, seed=seed,
                                      block_length=4, ignore_eos=True)).accepted_lengths]
    assert 0 < sum(accepted) < 3 * len(accepted)


def test_seeded_sampling_is_reproducible(engine):
    for mode in ("ar", "self_spec", "diffusion"):
        params = DecodeParams(mode=mode, max_new_tokens=20, temperature=0.8, top_p=0.9, seed=1234)
        a = engine.generate([1, 2, 3], params).token_ids
        b = engine.generate([1, 2, 3], params).token_ids
        c = engine.generate([1, 2, 3], params.with_(seed=4321)).token_ids
        assert a == b
        assert a != c
