"""The engine's measured cost model: the step-cost fit on synthetic timings, the mode yields, and
the engine feeding both from the steps it runs (exported in its stats)."""

from __future__ import annotations

import random

import pytest

from replicas.engine import BatchEngine, EngineConfig
from replicas.engine.cost_model import CostModel, LoadPeak, ModeYields, RealizedRates, StepCosts, load_cell
from replicas.engine.params import DecodeParams

TRUE = {"intercept_s": 0.002, "per_row_s": 3e-4, "per_token_s": 5e-5, "per_logit_s": 2e-5}


def synthetic(costs: StepCosts, rng: random.Random, n: int, widths=(1, 8, 32), noise=3e-4, true=TRUE) -> None:
    """Steps of r rows, each a pass of width w (all logits when w > 1), sometimes with a 64-token prefill."""
    for _ in range(n):
        r, w, prefill = rng.randint(1, 32), rng.choice(widths), rng.random() < 0.1
        rows, tokens = r + prefill, r * w + 64 * prefill
        logits = (r * w if w > 1 else r) + prefill
        t = (true["intercept_s"] + true["per_row_s"] * rows + true["per_token_s"] * tokens
             + true["per_logit_s"] * logits + rng.gauss(0, noise))
        costs.observe(rows, tokens, logits, max(t, 1e-5))


def test_fit_recovers_the_step_cost_terms_from_noisy_steps():
    costs = StepCosts()
    synthetic(costs, random.Random(0), 5000)
    coef = costs.fit()
    assert coef["intercept_s"] == pytest.approx(TRUE["intercept_s"], abs=2e-4)
    assert coef["per_row_s"] == pytest.approx(TRUE["per_row_s"], rel=0.15)
    # token and logit rows differ only in prefill steps; what predictions use is well determined:
    wide = coef["per_token_s"] + coef["per_logit_s"]
    assert wide == pytest.approx(TRUE["per_token_s"] + TRUE["per_logit_s"], rel=0.1)
    assert coef["per_logit_s"] == pytest.approx(TRUE["per_logit_s"], rel=0.3)
    for rows, width in [(1, 1), (32, 1), (1, 32), (16, 8)]:  # the step shapes of AR and self-spec
        true = TRUE["intercept_s"] + rows * (TRUE["per_row_s"] + width * (TRUE["per_token_s"] + TRUE["per_logit_s"]))
        pred = coef["intercept_s"] + rows * (coef["per_row_s"] + width * wide)
        assert pred == pytest.approx(true, rel=0.05), (rows, width)


def test_fit_is_non_negative_and_none_before_any_step():
    costs = StepCosts()
    assert costs.fit() is None
    for rows in range(1, 20):  # time falls with rows: a plain fit would give a negative per-row term
        costs.observe(rows, rows, rows, 0.01 - 1e-4 * rows)
    assert all(v >= 0 for v in costs.fit().values())


def ar_step(coef: dict, rows: int) -> float:
    return coef["intercept_s"] + rows * (coef["per_row_s"] + coef["per_token_s"] + coef["per_logit_s"])


def test_buckets_follow_drift_but_keep_other_regimes():
    """When AR steps get slower, the AR buckets move the fit toward them; what wide passes cost
    is still known from their buckets (not forgotten while the fleet runs AR). Only the buckets
    that see steps follow: the fit is then a compromise (2/3 of the way at one row here)."""
    costs = StepCosts()
    rng = random.Random(1)
    synthetic(costs, rng, 3000, noise=0)
    before = costs.fit()
    slow = {**TRUE, "intercept_s": 0.004}
    synthetic(costs, rng, 3000, widths=(1,), noise=0, true=slow)
    coef = costs.fit()
    assert ar_step(coef, 1) > ar_step(before, 1) + 0.0007  # the truth moved by 0.002
    assert ar_step(coef, 32) == pytest.approx(ar_step(slow, 32), rel=0.05)
    wide_before = before["per_token_s"] + before["per_logit_s"]
    assert coef["per_token_s"] + coef["per_logit_s"] == pytest.approx(wide_before, rel=0.3)


def test_yields_are_ewmas_per_block_length():
    y = ModeYields()
    for _ in range(200):
        y.observe_cycle(32, 3)  # 4 tokens per cycle
        y.observe_cycle(8, 1)
    y.observe_block(32, 7)  # 32 tokens in 8 passes
    assert y.self_spec[32].mean == pytest.approx(4.0) and y.self_spec[8].mean == pytest.approx(2.0)
    assert y.diffusion[32].mean == pytest.approx(4.0) and y.self_spec[32].count == 200
    snap = CostModel(yields=y).snapshot()
    assert snap["self_spec"]["32"] == {"tokens_per_cycle": pytest.approx(4.0), "cycles": 200}
    assert snap["coef"] is None and snap["steps"] == 0 and snap["buckets"] == []


def test_the_engine_measures_its_steps_and_mode_yields(engine):
    be = BatchEngine(engine, EngineConfig(max_batch_size=4, max_seq_len=256))
    for mode in ("ar", "self_spec", "diffusion"):
        be.submit([1, 2, 3, 4], DecodeParams(mode=mode, max_new_tokens=40, ignore_eos=True, block_length=8))
    while be.has_work():
        be.step()
    snap = be.stats_snapshot()["cost_model"]
    assert snap["steps"] == be.stats.forward_passes
    assert set(snap["coef"]) == {"intercept_s", "per_row_s", "per_token_s", "per_logit_s"}
    assert sum(snap["coef"].values()) > 0
    assert sum(b[4] for b in snap["buckets"]) == snap["steps"]
    assert all(b[0] >= 1 and b[1] >= b[0] and b[3] > 0 for b in snap["buckets"])  # rows, tokens, seconds
    cycles = snap["self_spec"]["8"]
    assert cycles["cycles"] >= 5 and 1.0 <= cycles["tokens_per_cycle"] <= 8.0
    blocks = snap["diffusion"]["8"]
    assert blocks["blocks"] >= 3 and 1.0 <= blocks["tokens_per_pass"] <= 8.0


def test_load_cells_are_half_octaves():
    assert [load_cell(n) for n in (0, 1, 2, 3, 4, 5, 6, 7, 8, 11, 12, 16, 23, 24, 47, 48, 64)] == \
        [1, 1, 2, 3, 4, 4, 6, 6, 8, 8, 12, 16, 16, 24, 32, 48, 64]


def test_realized_rates_fold_one_second_windows_per_mode_and_load_cell():
    r = RealizedRates()
    for _ in range(80):  # 0.125 s steps: 10 windows at 1,000 tok/s, then 10 at 400
        r.observe("ar", 32, 125, 0.125)
    for _ in range(80):
        r.observe("self_spec", 33, 50, 0.125)
    r.observe("ar", 2, 10, 0.5)  # half a window: not reported yet
    snap = {(m, n): (rate, w) for m, n, rate, w in r.snapshot()}
    assert snap[("ar", 32)] == (pytest.approx(1000.0), 10)
    assert snap[("self_spec", 32)] == (pytest.approx(400.0), 10)
    assert ("ar", 2) not in snap
    for _ in range(32):  # the rate follows a change within a few windows
        r.observe("ar", 32, 62.5, 0.125)
    rate = {(m, n): v for m, n, v, _ in r.snapshot()}[("ar", 32)]
    assert rate == pytest.approx(500.0 + 500.0 * 0.7 ** 4)  # EWMA weight 0.3 per window: 3/4 of the way in 4
    r.observe("ar", 0, 10, 1.0)
    r.observe("ar", 4, 10, 0.0)  # no load or no time: ignored
    assert ("ar", 1) not in {(m, n) for m, n, *_ in r.snapshot()} and r.cells.get(("ar", 4)) is None


def test_a_steady_loads_request_turnover_is_filed_under_that_load():
    """Requests finishing and their successors arriving count for the load they keep (8), a fall of
    more than half is filed where it fell to, and a peak older than two windows is forgotten."""
    peak = LoadPeak(hold_s=1.0)
    assert [peak.update(t, n) for t, n in ((0.0, 8), (0.1, 7), (0.2, 6), (0.3, 8), (0.4, 5))] == [8, 8, 8, 8, 8]
    assert peak.update(0.5, 4) == 4  # half the peak or less: the load fell
    assert peak.update(1.2, 7) == 8  # the next window still remembers the last one's 8
    assert peak.update(2.3, 7) == 7  # ... but not the one before (its peak was 7)
    assert peak.update(4.5, 3) == 3  # two windows of nothing: forgotten
    assert LoadPeak().update(0.0, 1) == 1


def test_the_engine_measures_what_each_mode_delivers(engine, monkeypatch):
    import replicas.engine.cost_model as cost_model

    monkeypatch.setattr(cost_model, "WINDOW_S", 1e-6)  # every step folds a window
    be = BatchEngine(engine, EngineConfig(max_batch_size=4, max_seq_len=256))
    for _ in range(2):
        be.submit([1, 2, 3, 4], DecodeParams(mode="ar", max_new_tokens=12, ignore_eos=True))
    while be.has_work():
        be.step()
    be.submit([5, 6, 7], DecodeParams(mode="self_spec", max_new_tokens=12, ignore_eos=True, block_length=4))
    be.submit([5, 6, 7], DecodeParams(mode="ar", max_new_tokens=12, ignore_eos=True))
    while be.has_work():  # two modes at once: no realized sample, except after one finished
        be.step()
    cells = {(m, n): (rate, w) for m, n, rate, w in be.stats_snapshot()["cost_model"]["realized"]}
    assert ("ar", 2) in cells and cells[("ar", 2)][1] >= 10  # 12 tokens each, two rows: >= 11 steps
    assert all(rate > 0 for rate, _ in cells.values())
    assert {m for m, _ in cells} <= {"ar", "self_spec"}
    # the mixed phase never produced a 2-request cell for self_spec
    assert ("self_spec", 2) not in cells
