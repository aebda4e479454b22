"""The calibrating policy: the cost model read from metrics pages, goodput predictions on
synthetic costs (the crossover moves where it should), the cold start on thresholds, staleness,
and no thrash under a steady load at the crossover."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
from prometheus_client import CollectorRegistry

from policies import AdaptiveModePolicy, ModeRequest, PolicyMetrics, parse_policy
from policies.cost_view import CostView, GoodputSource
from policies.goodput import EXPLORE_RATIO, EXPLORE_RETRY_MAX_S, EXPLORE_RETRY_S, GoodputChooser
from policies.predict import (MAX_OCTAVES, MIN_WINDOWS, acceptance, corrected, predict, step_seconds,
                              tokens_per_cycle)
from policies.schema import DraftTier, GoodputRule, PolicyFileError
from policies.signals import PageFetcher, SignalBoard

from .test_adaptive import Clock, FakeSource
from .pages import MetricsPage

pytestmark = pytest.mark.anyio

# the embedded model's engine on one core of the 2-core VM (medians of steps measured alone):
# 3.45 ms a step, 0.24 ms a row, 0.16 ms a token with its logits
CPU = {"intercept_s": 0.00345, "per_row_s": 2.4e-4, "per_token_s": 1e-4, "per_logit_s": 6e-5}
TIERS = [DraftTier(max_running=4, block_length=32), DraftTier(max_running=16, block_length=8)]
RULE = GoodputRule(costs="costs", min_steps=100, min_cycles=10)


def view(tokens_per_cycle: float | None = 6.0, coef: dict = CPU, steps: float = 1000) -> CostView:
    v = CostView(coef=dict(coef), steps=steps, replicas=1)
    if tokens_per_cycle is not None:
        v.self_spec = {32: (tokens_per_cycle, 100.0)}
    return v


def crossover(v: CostView, tiers=TIERS, rule=RULE) -> float:
    """The lowest load (per replica, in steps of 0.25) from which AR's predicted tokens/s is at
    least self-spec's."""
    n = 1.0
    while n <= 64:
        ar, ss = (predict(v, m, n, tiers=tiers, rule=rule) for m in ("ar", "self_spec"))
        if ar.tokens_per_s >= ss.tokens_per_s:
            return n
        n += 0.25
    return float("inf")


# ---- predictions on synthetic costs -----------------------------------------------------------
def test_acceptance_inverts_the_geometric_yield():
    for alpha, block in [(0.5, 32), (0.8, 8), (0.95, 32)]:
        tpc = (1 - alpha ** block) / (1 - alpha)
        assert acceptance(tpc, block) == pytest.approx(alpha, abs=1e-6)
    assert acceptance(1.0, 32) == pytest.approx(0.0, abs=1e-6)  # never accepted
    v = view(tokens_per_cycle=(1 - 0.8 ** 32) / 0.2)
    assert tokens_per_cycle(v, 8, 10) == pytest.approx((1 - 0.8 ** 8) / 0.2)  # extrapolated to block 8


def test_predictions_follow_the_cost_model():
    ar = predict(view(), "ar", 4, tiers=TIERS, rule=RULE)
    assert ar.step_s == pytest.approx(0.00345 + 4 * (2.4e-4 + 1.6e-4))
    assert ar.tokens_per_s == pytest.approx(4 / ar.step_s) and ar.latency_s == pytest.approx(256 * ar.step_s)
    ss = predict(view(), "self_spec", 4, tiers=TIERS, rule=RULE)
    assert ss.block == 32 and ss.step_s == pytest.approx(0.00345 + 4 * (2.4e-4 + 32 * 1.6e-4))
    assert ss.s_per_token == pytest.approx(2 * ss.step_s / 6.0)  # draft + verify make 6 tokens
    assert predict(view(), "self_spec", 8, tiers=TIERS, rule=RULE).block == 8  # the draft tier at 8 running
    assert predict(view(tokens_per_cycle=None), "self_spec", 1, tiers=TIERS, rule=RULE) is None
    assert predict(view(), "diffusion", 1, tiers=TIERS, rule=RULE) is None  # never measured


def test_measured_shapes_correct_the_global_fit_near_them():
    """The global fit says a 32-row step of 8-token passes takes 3.45 + 32 * (0.24 + 8 * 0.16) ms =
    52 ms; the replica measured 80 ms there. Predictions there follow the measurement; far from
    it (one row) they keep the fit."""
    v = view()
    wide_true = 0.080
    v.shapes = [(32.0, 256.0, wide_true, 50.0), (28.0, 224.0, wide_true * 0.9, 50.0)]
    assert step_seconds(v, 32, 256) == pytest.approx(wide_true, rel=0.05)
    fit_one_row = CPU["intercept_s"] + CPU["per_row_s"] + CPU["per_token_s"] + CPU["per_logit_s"]
    assert step_seconds(v, 1, 1) == pytest.approx(fit_one_row, rel=0.01)
    assert step_seconds(view(), 32, 256) == pytest.approx(0.00345 + 32 * (2.4e-4 + 8 * 1.6e-4))
    slower = predict(v, "self_spec", 32, tiers=TIERS, rule=RULE)
    assert slower.step_s == pytest.approx(wide_true, rel=0.05)


def test_the_crossover_moves_with_acceptance_and_with_the_cost_of_width():
    base = crossover(view(tokens_per_cycle=6.0))
    assert 1 < base < 64
    assert crossover(view(tokens_per_cycle=10.0)) > base  # better drafts: self-spec pays off longer
    assert crossover(view(tokens_per_cycle=3.0)) < base
    wide = {**CPU, "per_token_s": 2e-4}  # wide passes cost more
    assert crossover(view(tokens_per_cycle=6.0, coef=wide)) < base
    flat = {**CPU, "intercept_s": 0.03, "per_token_s": 1e-6, "per_logit_s": 0.0}  # weight-bandwidth bound
    assert crossover(view(tokens_per_cycle=6.0, coef=flat)) > base
    assert crossover(view(tokens_per_cycle=1.0)) == 1.0  # a draft never accepted: AR from the first user


def test_the_chooser_picks_self_spec_only_where_drafts_pay_and_ar_under_load():
    chooser = GoodputChooser(RULE, ["self_spec", "ar"], TIERS)
    good, useless = view(tokens_per_cycle=8.0), view(tokens_per_cycle=1.0)
    assert chooser.choose(good, 1, 1, "ar").mode == "self_spec"
    assert chooser.choose(useless, 1, 1, "self_spec").mode == "ar"
    for v in (good, useless):
        assert chooser.choose(v, 32, 32, "self_spec").mode == "ar"
    assert chooser.choose(good, 1, 32, "self_spec").mode == "ar"  # a rising load acts on the projection
    assert chooser.choose(view(steps=50), 1, 1, "ar") is None  # cold: too few steps
    assert chooser.choose(view(tokens_per_cycle=None), 1, 1, "ar") is None  # self-spec never measured


def test_the_margin_holds_near_ties_and_the_slo_follows_throughput():
    v = view(tokens_per_cycle=6.0)
    n = crossover(v) + 0.25  # AR is ahead here, by a little
    ar = predict(v, "ar", n, tiers=TIERS, rule=RULE)
    ss = predict(v, "self_spec", n, tiers=TIERS, rule=RULE)
    gain = ar.tokens_per_s / ss.tokens_per_s
    assert 1.0 < gain
    free = GoodputChooser(RULE.model_copy(update={"margin": 0.0}), ["self_spec", "ar"], TIERS)
    assert free.choose(v, n, n, "self_spec").mode == "ar"
    held = GoodputChooser(RULE.model_copy(update={"margin": gain - 1 + 0.01}), ["self_spec", "ar"], TIERS)
    assert held.choose(v, n - 0.5, n - 0.5, "self_spec").mode == "self_spec"  # picked on its merit, just below
    assert held.choose(v, n, n, "self_spec").mode == "self_spec"  # a gain below the margin: stay
    # the margin holds only a mode the chooser picked: one it never picked (e.g. the thresholds' at a
    # cold start) is left for any gain
    fresh = GoodputChooser(RULE.model_copy(update={"margin": gain - 1 + 0.01}), ["self_spec", "ar"], TIERS)
    assert fresh.choose(v, n, n, "self_spec").mode == "ar"
    # at one load, a request's latency is load / tokens/s (Little's law): the faster mode is also
    # the lower-latency one, so an SLO never vetoes the goodput choice in favour of another mode
    assert (ar.latency_s < ss.latency_s) == (ar.tokens_per_s > ss.tokens_per_s)
    strict = GoodputChooser(RULE.model_copy(update={"latency_slo_s": ar.latency_s / 2}), ["self_spec", "ar"], TIERS)
    assert strict.choose(v, n, n, "self_spec").mode == "ar"  # nothing meets it: the fastest request


def test_a_load_step_clears_the_margin_until_a_view_polled_after_it_decides():
    """Traced in a peer run: idle in self_spec, then 8 requests. The view polled before the step
    (no self_spec measured near 8) rated self_spec far ahead; the first view polled after it put ar
    4% ahead, inside the 5% margin, which held self_spec for ~10 s. A step (an octave) clears the
    hold: views first seen within `settle_s` of it decide on their merit, and a mode keeps the
    margin's hold only once a view first seen after that has picked it."""
    v = view(tokens_per_cycle=6.0)
    ar8 = predict(v, "ar", 8, tiers=TIERS, rule=RULE)
    ss8 = predict(v, "self_spec", 8, tiers=TIERS, rule=RULE)
    rule = RULE.model_copy(update={"settle_s": 5.0})
    chooser = GoodputChooser(rule, ["self_spec", "ar"], TIERS)
    assert chooser.choose(v, 1, 1, "ar", now=0.0).mode == "self_spec" and chooser.steps == 1
    assert chooser.choose(v, 1, 1, "self_spec", now=10.0).mode == "self_spec"
    assert chooser.merit is None  # the view of the step (a view is one poll), however long ago
    assert chooser.choose(view(tokens_per_cycle=6.0), 1, 1, "self_spec", now=30.0).mode == "self_spec"
    assert chooser.merit == "self_spec"  # a poll first seen 30 s after the step: settled
    # the load steps to 8; the old view (polled before the step) still rates self_spec ahead
    stale = view(tokens_per_cycle=6.0)
    stale.realized = {("self_spec", 8): (1.5 * ar8.tokens_per_s, MIN_WINDOWS), ("ar", 8): (ar8.tokens_per_s, MIN_WINDOWS)}
    assert chooser.choose(stale, 8, 8, "self_spec", now=40.0).mode == "self_spec"
    assert chooser.steps == 2 and chooser.merit is None  # a step: nothing holds by the margin
    # the view polled after the step measured self_spec at 8: ar 4% ahead, inside a 5% margin
    fresh = view(tokens_per_cycle=6.0)
    fresh.realized = {("self_spec", 8): (ar8.tokens_per_s / 1.04, MIN_WINDOWS), ("ar", 8): (ar8.tokens_per_s, MIN_WINDOWS)}
    assert ss8.tokens_per_s != ar8.tokens_per_s / 1.04
    assert chooser.choose(fresh, 8, 8, "self_spec", now=45.5).mode == "ar"  # not held: ar on its merit
    assert chooser.merit == "ar"
    # from now on the margin holds ar against a 4% swing back (no thrash at a near-tie)
    swing = view(tokens_per_cycle=6.0)
    swing.realized = {("self_spec", 8): (ar8.tokens_per_s * 1.04, MIN_WINDOWS), ("ar", 8): (ar8.tokens_per_s, MIN_WINDOWS)}
    assert chooser.choose(swing, 8, 8, "ar", now=50.0).mode == "ar"
    # a view first seen within settle_s of a step decides, but gives no hold
    early = GoodputChooser(rule, ["self_spec", "ar"], TIERS)
    early.choose(v, 1, 1, "self_spec", now=0.0)
    early.choose(view(tokens_per_cycle=6.0), 1, 1, "self_spec", now=10.0)
    assert early.choose(stale, 8, 8, "self_spec", now=20.0).mode == "self_spec" and early.merit is None
    assert early.choose(swing, 8, 8, "self_spec", now=21.0).mode == "self_spec"  # seen 1 s after: no hold either
    assert early.merit is None
    # noise inside an octave is no step: a mode picked at 6 keeps its hold at 10
    noisy = GoodputChooser(rule, ["self_spec", "ar"], TIERS)
    noisy.choose(v, 6, 6, "ar", now=0.0)
    noisy.choose(view(tokens_per_cycle=6.0), 6, 6, "ar", now=10.0)
    steps = noisy.steps
    noisy.choose(v, 10, 10, "ar", now=11.0)
    assert noisy.steps == steps


def test_a_falling_load_never_leaves_the_mode_that_wins_where_it_falls_to():
    """Traced on the stack: 4 requests -> 1 in self_spec; the smoothed load passed 2, where ar wins,
    the policy moved to ar, and its dwell held ar for 10 s at one request, where self_spec wins."""
    v = view(tokens_per_cycle=6.0)
    n = crossover(v) + 1.0  # ar ahead here, self_spec ahead at 1
    assert 1.0 < n < 8
    chooser = GoodputChooser(RULE, ["self_spec", "ar"], TIERS)
    assert chooser.choose(v, n, n, "self_spec").mode == "ar"  # steady at n: ar
    falling = GoodputChooser(RULE, ["self_spec", "ar"], TIERS)
    assert falling.choose(v, n, 1, "self_spec").mode == "self_spec"  # falling to 1: stay
    assert falling.choose(v, n, 1, "ar").mode == "ar"  # in ar, it still waits for the smoothing
    assert falling.choose(v, 1.0, 1, "ar").mode == "self_spec"  # and moves once the load is down
    # a fall to where the current mode loses too moves on the smoothed load, as before
    assert GoodputChooser(RULE, ["self_spec", "ar"], TIERS).choose(v, 32, n, "self_spec").mode == "ar"


def test_a_first_measurement_near_the_load_replaces_the_smoothed_extrapolation():
    """Traced in a peer run: at 8 requests the view rated self_spec (measured only at 1 request,
    extrapolated) at 3,158 tok/s and ar (measured at 8) at 2,613; the first view with self_spec
    measured at 8 said 2,450 vs 2,648. Smoothing the log rates (half-life 2 s) and the margin's hold
    on the extrapolated pick kept self_spec 4 s longer. A change of basis restarts the mode's
    smoothing and clears the hold: ar at the first evaluation on that view."""
    v = view(tokens_per_cycle=6.0)
    ar8 = predict(v, "ar", 8, tiers=TIERS, rule=RULE).tokens_per_s
    ss1 = predict(v, "self_spec", 1, tiers=TIERS, rule=RULE).tokens_per_s
    ss8 = predict(v, "self_spec", 8, tiers=TIERS, rule=RULE).tokens_per_s
    chooser = GoodputChooser(RULE, ["self_spec", "ar"], TIERS)
    cells = {("self_spec", 1): (ss1, MIN_WINDOWS), ("ar", 8): (ss8 / 1.2, MIN_WINDOWS)}
    for t in (0.0, 10.0, 20.0):  # a poll every 10 s (a new view each)
        extrapolated = view(tokens_per_cycle=6.0)
        extrapolated.realized = dict(cells)
        assert chooser.choose(extrapolated, 8, 8, "self_spec", now=t).mode == "self_spec"
    assert chooser.merit == "self_spec" and not chooser.basis["self_spec"] and chooser.unmeasured
    measured = view(tokens_per_cycle=6.0)
    measured.realized = dict(cells)
    measured.realized[("self_spec", 8)] = (ss8 / 1.2 / 1.08, MIN_WINDOWS)  # ar 8% ahead
    choice = chooser.choose(measured, 8, 8, "self_spec", now=20.1)
    assert choice.mode == "ar" and chooser.basis["self_spec"] and not chooser.unmeasured
    assert ar8 > 0


def test_realized_throughput_corrects_each_modes_prediction_near_its_load():
    v = view(tokens_per_cycle=6.0)
    ss1 = predict(v, "self_spec", 1, tiers=TIERS, rule=RULE)
    ar1 = predict(v, "ar", 1, tiers=TIERS, rule=RULE)
    assert ss1.tokens_per_s > 1.2 * ar1.tokens_per_s  # the step model alone: self_spec at one request
    chooser = GoodputChooser(RULE, ["self_spec", "ar"], TIERS)
    assert chooser.choose(v, 1, 1, "ar").mode == "self_spec"
    # the replicas measured self_spec at half its modelled rate at 1 request (prefill, turnover,
    # the serving processes' CPU...), ar as modelled: the corrected prediction moves to ar
    v.realized = {("self_spec", 1): (ss1.tokens_per_s / 2, MIN_WINDOWS), ("ar", 1): (ar1.tokens_per_s, MIN_WINDOWS)}
    fixed = corrected(v, "self_spec", 1, tiers=TIERS, rule=RULE)
    assert fixed.tokens_per_s == pytest.approx(ss1.tokens_per_s / 2) and fixed.correction == pytest.approx(0.5)
    assert fixed.latency_s == pytest.approx(2 * ss1.latency_s)
    assert GoodputChooser(RULE, ["self_spec", "ar"], TIERS).choose(v, 1, 1, "self_spec").mode == "ar"
    # the nearest measured cell corrects nearby loads (2 requests: one octave away) ...
    ss2 = predict(v, "self_spec", 2, tiers=TIERS, rule=RULE)
    assert corrected(v, "self_spec", 2, tiers=TIERS, rule=RULE).tokens_per_s == pytest.approx(ss2.tokens_per_s / 2)
    # ... but not loads further than MAX_OCTAVES, and a cell with too few windows corrects nothing
    far = 2 ** (MAX_OCTAVES + 1)
    assert corrected(v, "self_spec", far, tiers=TIERS, rule=RULE) == predict(v, "self_spec", far, tiers=TIERS, rule=RULE)
    v.realized = {("self_spec", 1): (ss1.tokens_per_s / 2, MIN_WINDOWS - 1)}
    assert corrected(v, "self_spec", 1, tiers=TIERS, rule=RULE) == ss1
    # a wild measurement is clamped: it cannot zero a mode
    v.realized = {("self_spec", 1): (1e-9, MIN_WINDOWS)}
    assert corrected(v, "self_spec", 1, tiers=TIERS, rule=RULE).correction == pytest.approx(0.2)


def test_a_mode_never_measured_at_a_steady_load_is_tried_when_the_model_rates_it_close():
    # the step model, extrapolated from self-spec shapes, rates ar below self_spec at 48 requests;
    # only self_spec was measured there: the chooser tries ar once, measures, then decides
    v = view(tokens_per_cycle=6.0)
    ss = predict(v, "self_spec", 48, tiers=TIERS, rule=RULE)
    ar = predict(v, "ar", 48, tiers=TIERS, rule=RULE)
    v.realized = {("self_spec", 48): (ar.tokens_per_s / 0.8, MIN_WINDOWS)}  # ar modelled at 0.8 of it
    chooser = GoodputChooser(RULE, ["self_spec", "ar"], TIERS)
    choice = chooser.choose(v, 48, 48, "self_spec", now=0.0)
    assert choice.mode == "ar" and choice.reason == "explore" and "explore ar" in choice.detail
    assert chooser.choose(v, 48, 48, "self_spec", now=5.0).mode == "ar"  # proposed until the switch happens
    chooser.choose(v, 48, 48, "ar", now=10.0)  # running ar unmeasured: the try is recorded
    assert chooser.choose(v, 48, 48, "self_spec", now=20.0).mode == "self_spec"  # the try did not measure: no retry
    assert chooser.choose(v, 48, 48, "self_spec", now=10.0 + EXPLORE_RETRY_S).reason == "explore"
    # measured: the realized rates decide (here ar delivered 1.5x self_spec)
    v.realized[("ar", 48)] = (1.5 * ss.tokens_per_s, MIN_WINDOWS)
    v.realized[("self_spec", 48)] = (ss.tokens_per_s, MIN_WINDOWS)
    measured = GoodputChooser(RULE, ["self_spec", "ar"], TIERS).choose(v, 48, 48, "self_spec", now=0.0)
    assert measured.mode == "ar" and measured.reason == "goodput"
    # a mode the model rates far below the current one is not tried, nor during a load step
    v.realized = {("self_spec", 48): (ar.tokens_per_s / (EXPLORE_RATIO * 0.9), MIN_WINDOWS)}
    assert GoodputChooser(RULE, ["self_spec", "ar"], TIERS).choose(v, 48, 48, "self_spec", now=0.0).mode == "self_spec"
    v.realized = {("self_spec", 48): (ar.tokens_per_s / 0.8, MIN_WINDOWS)}
    assert GoodputChooser(RULE, ["self_spec", "ar"], TIERS).choose(v, 16, 48, "self_spec", now=0.0).reason == "goodput"


def test_a_mode_that_keeps_losing_a_load_is_tried_there_ever_more_rarely():
    base = view(tokens_per_cycle=6.0)
    ar = predict(base, "ar", 48, tiers=TIERS, rule=RULE)
    ss_rate = ar.tokens_per_s / 0.8  # self_spec measured near 48; ar modelled at 0.8 of it

    def measured(ar_rate: float | None) -> CostView:  # a new poll's view (the chooser memoises per view)
        realized = {("self_spec", 48): (ss_rate, MIN_WINDOWS)}
        if ar_rate is not None:
            realized[("ar", 48)] = (ar_rate, MIN_WINDOWS)
        return dataclasses.replace(base, realized=realized)

    chooser = GoodputChooser(RULE, ["self_spec", "ar"], TIERS)
    t, waits = 0.0, []
    for _ in range(6):  # each try: proposed, run unmeasured (recorded), measured worse, left
        assert chooser.choose(measured(None), 48, 48, "self_spec", now=t).reason == "explore"
        chooser.choose(measured(None), 48, 48, "ar", now=t + 10)  # the try is recorded
        assert chooser.choose(measured(0.5 * ss_rate), 48, 48, "ar", now=t + 20).mode == "self_spec"
        wait = EXPLORE_RETRY_S  # then ar's windows age out: unmeasured near 48 again
        while chooser.choose(measured(None), 48, 48, "self_spec", now=t + 10 + wait).reason != "explore":
            wait += EXPLORE_RETRY_S
        waits.append(wait)
        t += 10 + wait
    assert waits == [EXPLORE_RETRY_S, 2 * EXPLORE_RETRY_S, 4 * EXPLORE_RETRY_S, 8 * EXPLORE_RETRY_S,
                     EXPLORE_RETRY_MAX_S, EXPLORE_RETRY_MAX_S]
    # a try that wins starts the count over: the next one EXPLORE_RETRY_S after it again
    chooser.choose(measured(None), 48, 48, "ar", now=t + 10)  # recorded
    kept = chooser.choose(measured(1.5 * ss_rate), 48, 48, "ar", now=t + 20)
    assert kept.mode == "ar", kept.detail  # measured better: kept
    assert chooser.choose(measured(None), 48, 48, "self_spec", now=t + 10 + EXPLORE_RETRY_S).reason == "explore"


@pytest.mark.parametrize("tpc,tried", [(6.0, True), (2.0, False), (1.0, False)])
def test_self_spec_is_tried_only_when_its_measured_yield_can_beat_ar(tpc, tried):
    # a linear cycle is two passes, each at least an AR step: <= 2 tokens per cycle never beats ar
    v = view(tokens_per_cycle=tpc)
    ss = predict(v, "self_spec", 48, tiers=TIERS, rule=RULE)
    v.realized = {("ar", 48): (ss.tokens_per_s / 0.8, MIN_WINDOWS)}  # self_spec modelled at 0.8 of ar
    choice = GoodputChooser(RULE, ["self_spec", "ar"], TIERS).choose(v, 48, 48, "ar", now=0.0)
    assert (choice.mode, choice.reason) == (("self_spec", "explore") if tried else ("ar", "goodput"))


# ---- the source: cost models read from the replicas' metrics page ---------------------------------
def cost_page(replicas: list[dict]) -> str:
    lines = []
    for i, r in enumerate(replicas):
        tags = f'application="nld",deployment="NLDReplica",replica="r{i}",model="m"'
        for term, value in r["coef"].items():
            lines.append(f'ray_nld_replica_step_cost_seconds{{{tags},term="{term}"}} {value}')
        lines.append(f"ray_nld_replica_cost_model_steps{{{tags}}} {r['steps']}")
        for block, (tpc, cycles) in r.get("self_spec", {}).items():
            lines.append(f'ray_nld_replica_self_spec_tokens_per_cycle{{{tags},block="{block}"}} {tpc}')
            lines.append(f'ray_nld_replica_self_spec_cycles{{{tags},block="{block}"}} {cycles}')
        for rows, tokens, seconds, count in r.get("shapes", []):
            shape = f'{tags},rows="{rows}",tokens="{tokens}",logits="{tokens}"'
            lines.append(f"ray_nld_replica_step_shape_seconds{{{shape}}} {seconds}")
            lines.append(f"ray_nld_replica_step_shape_count{{{shape}}} {count}")
        for (mode, running), (rate, windows) in r.get("realized", {}).items():
            cell = f'{tags},mode="{mode}",running="{running}"'
            lines.append(f"ray_nld_replica_realized_tokens_per_second{{{cell}}} {rate}")
            lines.append(f"ray_nld_replica_realized_windows{{{cell}}} {windows}")
        lines.append(f"ray_nld_replica_num_requests_running{{{tags}}} 1.0")
    return "\n".join(lines) + "\n"


async def test_the_source_merges_the_replicas_cost_models_by_their_samples():
    import httpx

    slow = {k: 2 * v for k, v in CPU.items()}
    page_text = cost_page([{"coef": CPU, "steps": 300, "self_spec": {32: (4.0, 30)}, "shapes": [(1, 1, 0.004, 20)],
                            "realized": {("ar", 32): (3000.0, 6), ("self_spec", 1): (500.0, 4)}},
                           {"coef": slow, "steps": 100, "self_spec": {32: (8.0, 10), 8: (3.0, 5)},
                            "realized": {("ar", 32): (2000.0, 2)}}])
    spec = parse_policy(f"""
signals:
  - {{name: costs, source: goodput, urls: ["http://127.0.0.1:{{metrics_port}}/metrics"]}}
mode: {{signal: costs, enter_loaded_above: 8, leave_loaded_below: 4, goodput: {{costs: costs}}}}
""")
    async with MetricsPage(page_text) as page, httpx.AsyncClient() as http:
        from policies.schema import StackPorts

        source = GoodputSource(spec.resolved(StackPorts(metrics_port=page.port)).signals[0], PageFetcher(http))
        assert await source.read() == 400
    v = source.view
    assert v.replicas == 2
    assert v.coef["per_row_s"] == pytest.approx((300 * CPU["per_row_s"] + 100 * slow["per_row_s"]) / 400)
    assert v.self_spec[32] == (pytest.approx((4.0 * 30 + 8.0 * 10) / 40), 40)
    assert v.self_spec[8] == (pytest.approx(3.0), 5)
    assert v.shapes == [(1.0, 1.0, 0.004, 20.0)]
    assert v.realized == {("ar", 32): (pytest.approx((3000.0 * 6 + 2000.0 * 2) / 8), 8), ("self_spec", 1): (500.0, 4)}


def test_schema_goodput_needs_a_goodput_signal():
    with pytest.raises(PolicyFileError, match="mode.goodput.costs"):
        parse_policy("""
signals: [{name: fleet, source: prometheus, url: http://p, query: q}]
mode: {signal: fleet, enter_loaded_above: 8, leave_loaded_below: 4, goodput: {costs: fleet}}
""")


# ---- the policy: cold start, staleness, no thrash ------------------------------------------------
class Costs:
    """A goodput source whose cost view the test sets; `fail` makes reads raise (it goes stale)."""

    name, interval_s, stale_after_s = "costs", 1.0, 5.0

    def __init__(self) -> None:
        self.view, self.fail = CostView(), False

    async def read(self) -> float:
        if self.fail:
            raise RuntimeError("down")
        return self.view.steps


POLICY = """
signals:
  - {name: fleet, source: prometheus, url: http://p:9090, query: q, stale_after_s: 5}
  - {name: costs, source: goodput, urls: ["http://p/metrics"], stale_after_s: 5}
mode:
  signal: fleet
  smoothing: {ewma_half_life_s: 2}
  enter_loaded_above: 8
  leave_loaded_below: 4
  min_dwell_s: 10
  goodput: {costs: costs, min_steps: 100, min_cycles: 10}
engine:
  draft_tiers: [{max_running: 4, block_length: 32}, {max_running: 16, block_length: 8}]
  downgrade_running: true
"""


def make():
    clock, load, costs = Clock(), FakeSource("fleet"), Costs()
    board = SignalBoard([load, costs], clock=clock)
    policy = AdaptiveModePolicy(parse_policy(POLICY), board, metrics=PolicyMetrics(CollectorRegistry()),
                                clock=clock, wall=clock)
    return policy, board, clock, load, costs


async def step(policy, board, clock, load, costs, value: float, seconds: float = 1.0) -> str:
    load.value = value
    clock.t += seconds
    await board.poll_once("fleet")
    await board.poll_once("costs")
    return policy.evaluate()


async def test_cold_start_uses_the_thresholds_then_the_cost_model_decides():
    policy, board, clock, load, costs = make()
    costs.view = view(tokens_per_cycle=1.0, steps=20)  # a draft never accepted, but too few steps yet
    assert await step(policy, board, clock, load, costs, 1) == "self_spec"  # the thresholds: sparse
    snap = policy.snapshot()["goodput"]
    assert snap["decided_by"] == "thresholds" and snap["cold"].startswith("cold: 20 of 100 steps")
    costs.view = view(tokens_per_cycle=1.0, steps=500)
    assert await step(policy, board, clock, load, costs, 1) == "ar"
    snap = policy.snapshot()
    assert snap["goodput"]["decided_by"] == "goodput" and snap["goodput"]["choice"] == "ar"
    assert snap["last_switch"]["reason"] == "goodput"
    preds = snap["goodput"]["predictions"]["current"]
    assert preds["ar"]["tokens_per_s"] > preds["self_spec"]["tokens_per_s"] > 0
    assert policy.engine_settings()["downgrade_self_spec"] is True
    assert policy.decide(ModeRequest()).mode == "ar"


async def test_a_stale_cost_model_holds_the_mode():
    policy, board, clock, load, costs = make()
    costs.view = view(tokens_per_cycle=8.0, steps=500)
    assert await step(policy, board, clock, load, costs, 1) == "self_spec"
    costs.fail = True
    for _ in range(3):  # stale after 5 s
        mode = await step(policy, board, clock, load, costs, 1, seconds=2.0)
    assert mode == "self_spec" and policy.snapshot()["stale"]
    for _ in range(8):  # the load rises far past any crossover meanwhile
        mode = await step(policy, board, clock, load, costs, 40, seconds=2.0)
    assert mode == "self_spec" and policy.snapshot()["stale"]
    costs.fail = False
    assert await step(policy, board, clock, load, costs, 40) == "ar"


async def test_no_thrash_under_a_steady_noisy_load_at_the_crossover():
    """Five simulated minutes at the crossover, the load and the measured costs both noisy: the
    margin and the dwell allow at most one switch per minute."""
    policy, board, clock, load, costs = make()
    center = crossover(view(tokens_per_cycle=6.0))
    rng = random.Random(7)
    modes = []
    for _ in range(3000):
        noisy = {k: v * rng.uniform(0.95, 1.05) for k, v in CPU.items()}
        costs.view = view(tokens_per_cycle=6.0 * rng.uniform(0.9, 1.1), coef=noisy, steps=1000)
        modes.append(await step(policy, board, clock, load, costs, center * rng.uniform(0.8, 1.2), seconds=0.1))
    switches = sum(a != b for a, b in zip(modes, modes[1:]))
    assert policy.snapshot()["goodput"]["decided_by"] == "goodput"
    assert switches <= 2, switches


async def test_no_thrash_at_the_crossover_with_realized_rates_and_tries():
    """The same five minutes, with the replicas measuring what the running mode delivers (its
    realized cell: the model's rate at the load, times noise) from no measurement at all: the
    chooser may try the other mode once, then the measured rates and the margin hold the mode."""
    policy, board, clock, load, costs = make()
    center = crossover(view(tokens_per_cycle=6.0))
    rng = random.Random(11)
    realized: dict = {}
    modes = []
    for i in range(3000):
        v = view(tokens_per_cycle=6.0, steps=1000)
        n = center * rng.uniform(0.8, 1.2)
        mode = policy.mode
        truth = predict(v, mode, n, tiers=TIERS, rule=RULE).tokens_per_s
        if i % 10 == 0:  # one window a second for the mode that runs, at the cell of the load
            key = (mode, max(2 ** round(math.log2(n)), 1))
            rate, windows = realized.get(key, (truth, 0))
            realized[key] = (rate + 0.3 * (truth * rng.uniform(0.9, 1.1) - rate), windows + 1)
        v.realized = dict(realized)
        costs.view = v
        modes.append(await step(policy, board, clock, load, costs, n, seconds=0.1))
    switches = sum(a != b for a, b in zip(modes, modes[1:]))
    assert policy.snapshot()["goodput"]["decided_by"] == "goodput"
    assert {m for m, _ in realized} == {"ar", "self_spec"}  # both got measured (one by a try)
    assert switches <= 3, switches


async def start_a_try(realized_ar_32: bool = False):
    """A policy in ar at one request, where ar measured 1.2x the model's self_spec (so ar is chosen,
    and self_spec, never measured there, is worth a try), run until it tries self_spec. Returns
    (policy, board, clock, load, costs, the view, the model's self_spec rate at 1, when it tried)."""
    policy, board, clock, load, costs = make()
    v = view(tokens_per_cycle=6.0, steps=1000)
    ss1 = predict(v, "self_spec", 1, tiers=TIERS, rule=RULE).tokens_per_s
    v.realized = {("ar", 1): (1.2 * ss1, MIN_WINDOWS)}
    if realized_ar_32:
        v.realized[("ar", 32)] = (50 * ss1, MIN_WINDOWS)
    costs.view = v
    policy.level = [lv.mode for lv in policy.levels].index("ar")
    modes = [await step(policy, board, clock, load, costs, 1, seconds=0.5) for _ in range(4)]
    assert modes[-1] == "self_spec" and policy.snapshot()["last_switch"]["reason"] == "explore"
    return policy, board, clock, load, costs, v, ss1, clock.t


def measured_self_spec(v, rate: float):
    """The same view once the replicas report self_spec at one request at `rate` tokens/s."""
    out = view(tokens_per_cycle=6.0, steps=1000)
    out.realized = {**v.realized, ("self_spec", 1): (rate, MIN_WINDOWS)}
    return out


async def test_a_try_is_left_at_once_when_the_load_moves_away():
    """A try is bound by the dwell only while the load stays where it is measuring: a step from
    1 to 32 requests during a try of self_spec goes to ar at once (seen in a step-change run: 224
    requests at 32 ran in the tried mode for the rest of the dwell)."""
    policy, board, clock, load, costs, _, _, tried = await start_a_try(realized_ar_32=True)
    mode = await step(policy, board, clock, load, costs, 32, seconds=0.5)
    assert mode == "ar" and clock.t - tried < policy.spec.mode.min_dwell_s  # within the dwell
    # a switch that is not a try keeps the dwell: back at 1 request, no immediate move
    assert await step(policy, board, clock, load, costs, 1, seconds=0.5) == "ar"


async def test_a_try_ends_as_soon_as_its_mode_is_measured_worse():
    """A try measures the tried mode and no more: once the replicas report it near the load (and
    worse), the policy goes back within the dwell. Seen in a peer run: a try of self_spec at 4
    requests per replica made half of ar's tokens/s for the whole 10 s dwell."""
    policy, board, clock, load, costs, v, ss1, tried = await start_a_try()
    assert await step(policy, board, clock, load, costs, 1, seconds=0.5) == "self_spec"  # not measured yet: held
    costs.view = measured_self_spec(v, 0.5 * ss1)
    mode = await step(policy, board, clock, load, costs, 1, seconds=0.5)
    assert mode == "ar" and clock.t - tried < policy.spec.mode.min_dwell_s  # within the dwell
    assert policy.snapshot()["goodput"]["choice"] == "ar"


async def test_a_try_measured_better_is_kept():
    """The same try, measured above ar's rate there: the policy stays in the tried mode."""
    policy, board, clock, load, costs, v, ss1, _ = await start_a_try()
    costs.view = measured_self_spec(v, 2.0 * ss1)
    modes = [await step(policy, board, clock, load, costs, 1, seconds=0.5) for _ in range(30)]
    assert set(modes) == {"self_spec"}


def cells(ar: tuple[float, float], self_spec: tuple[float, float]):
    """A fresh view (the chooser memoises per view) with ar's and self_spec's realized cells at 8
    requests: (tokens/s, windows folded so far)."""
    v = view(tokens_per_cycle=6.0, steps=1000)
    v.realized = {("ar", 8): ar, ("self_spec", 8): self_spec}
    return v


async def switch_to_self_spec_at_8():
    """A policy in ar at 8 requests, where self_spec's older cell says 1.3x ar's rate: it switches
    (a goodput switch, nothing holding it). Returns (policy, board, clock, load, costs, when)."""
    policy, board, clock, load, costs = make()
    policy.level = [lv.mode for lv in policy.levels].index("ar")
    costs.view = cells(ar=(1000.0, 6), self_spec=(1300.0, 6))
    assert await step(policy, board, clock, load, costs, 8, seconds=0.5) == "self_spec"
    assert policy.snapshot()["last_switch"]["reason"] == "goodput"
    return policy, board, clock, load, costs, clock.t


async def test_a_goodput_switch_measured_worse_again_is_undone_within_the_dwell():
    """The switch rested on self_spec's older measurement; the replicas measure it again at the
    load (3 new windows) at 0.7x ar's: the policy goes back to ar without waiting out the dwell.
    Seen in a peer run at 8 requests per replica: self_spec predicted 1.13x ar from an older cell,
    measured 0.88x, and the dwell held it for the rest of the window (0.82x fixed ar)."""
    policy, board, clock, load, costs, switched = await switch_to_self_spec_at_8()
    costs.view = cells(ar=(1000.0, 6), self_spec=(700.0, 6 + MIN_WINDOWS))
    modes = [await step(policy, board, clock, load, costs, 8, seconds=0.5) for _ in range(8)]
    assert modes[-1] == "ar" and policy.last_switch_clock - switched < policy.spec.mode.min_dwell_s
    assert policy.snapshot()["last_switch"]["reason"] == "goodput"


async def test_a_goodput_switch_not_measured_again_keeps_the_dwell():
    """Until the running mode is measured again near the load, the dwell holds it, even when the
    other mode's rate rises (e.g. explicit ar requests measured it again)."""
    policy, board, clock, load, costs, switched = await switch_to_self_spec_at_8()
    costs.view = cells(ar=(2000.0, 6 + MIN_WINDOWS), self_spec=(1300.0, 6 + MIN_WINDOWS - 1))
    modes = []
    while clock.t - switched < policy.spec.mode.min_dwell_s - 0.5:
        modes.append(await step(policy, board, clock, load, costs, 8, seconds=0.5))
    assert set(modes) == {"self_spec"} and policy.snapshot()["goodput"]["choice"] == "ar"
    assert await step(policy, board, clock, load, costs, 8, seconds=1.0) == "ar"  # the dwell is over


async def test_undoing_a_goodput_switch_is_not_undone_within_the_dwell():
    """One undo per dwell: back in ar, ar measured again below self_spec does not flip the policy
    back before the dwell is over (no ping-pong on a machine whose speed drifts)."""
    policy, board, clock, load, costs, _ = await switch_to_self_spec_at_8()
    costs.view = cells(ar=(1000.0, 6), self_spec=(700.0, 6 + MIN_WINDOWS))
    while await step(policy, board, clock, load, costs, 8, seconds=0.5) != "ar":
        pass
    undone = policy.last_switch_clock
    costs.view = cells(ar=(400.0, 6 + 2 * MIN_WINDOWS), self_spec=(700.0, 6 + MIN_WINDOWS))
    modes = []
    while clock.t - undone < policy.spec.mode.min_dwell_s - 0.5:
        modes.append(await step(policy, board, clock, load, costs, 8, seconds=0.5))
    assert set(modes) == {"ar"} and policy.snapshot()["goodput"]["choice"] == "self_spec"


async def test_a_burst_after_an_idle_switch_to_self_spec_goes_to_ar_within_the_dwell():
    """The cost model rates self_spec best at 1 request and ar at 32: the fleet goes idle, the
    policy moves to self_spec, and a burst of 32 requests a few seconds later is in ar at once."""
    policy, board, clock, load, costs = make()
    costs.view = view(tokens_per_cycle=6.0, steps=1000)
    for _ in range(12):
        await step(policy, board, clock, load, costs, 32)
    assert policy.mode == "ar"
    for _ in range(30):  # the smoothed load decays to 1 request
        if await step(policy, board, clock, load, costs, 1) == "self_spec":
            break
    assert policy.mode == "self_spec"
    switched = policy.last_switch_clock
    await step(policy, board, clock, load, costs, 1, seconds=2.0)  # idle a little longer, within the dwell
    modes = [await step(policy, board, clock, load, costs, 32, seconds=0.25) for _ in range(4)]
    assert clock.t - switched < policy.spec.mode.min_dwell_s  # within the dwell
    # at the first evaluation: the rates smoothed at 1 request do not hold self_spec at 32
    assert modes == ["ar"] * 4 and policy.snapshot()["goodput"]["choice"] == "ar"


async def test_before_its_first_view_the_calibrating_preset_sends_ar():
    """A gateway that just started has no view of the fleet: `initial_mode: ar`, not the sparse
    mode (on a model whose draft is never accepted, self_spec takes ~6x as long)."""
    from policies import PRESETS, load_policy_file

    spec = load_policy_file(PRESETS / "adaptive.yaml")
    assert spec.mode.initial_mode == "ar" and spec.mode.sparse_mode == "self_spec"
    clock = Clock()
    policy = AdaptiveModePolicy(spec, SignalBoard([FakeSource("fleet"), Costs()], clock=clock), clock=clock, wall=clock)
    assert policy.decide(ModeRequest()).mode == "ar" and policy.engine_settings() is None
    with pytest.raises(PolicyFileError, match="initial_mode"):
        parse_policy(POLICY.replace("min_dwell_s: 10", "min_dwell_s: 10\n  initial_mode: diffusion"))


async def test_the_running_mode_unmeasured_at_the_load_re_polls_every_settle_s():
    """The preset polls the cost model every 10 s. While the running mode has no measurement near
    the load (a step into a load it never ran at), the policy asks for an extra poll every
    `settle_s`, so the view that measured it decides within seconds; a mode measured there, a
    steady load or a step between measured loads polls nothing extra."""
    import asyncio

    class Counting(Costs):
        interval_s = 30.0  # far longer than the test: only the re-polls can poll it again

        def __init__(self) -> None:
            super().__init__()
            self.reads = 0
            self.cells = (1, 16)

        async def read(self) -> float:
            self.reads += 1
            self.view = v = view(tokens_per_cycle=6.0, steps=1000)  # each poll: a new view
            v.realized = {(m, n): (predict(v, m, n, tiers=TIERS, rule=RULE).tokens_per_s, MIN_WINDOWS)
                          for m in ("ar", "self_spec") for n in self.cells}
            return await super().read()

    load, costs = FakeSource("fleet"), Counting()
    load.interval_s = 0.05
    board = SignalBoard([load, costs])
    spec = parse_policy(POLICY.replace("min_cycles: 10}", "min_cycles: 10, settle_s: 0.2}")
                        .replace("ewma_half_life_s: 2", "ewma_half_life_s: 0"))
    policy = AdaptiveModePolicy(spec, board, metrics=PolicyMetrics(CollectorRegistry()), eval_interval_s=0.05)
    load.value = 1.0
    policy.start()
    try:
        await asyncio.sleep(0.5)
        assert policy.chooser.steps == 1 and board.refreshes == 0  # measured at 1: nothing extra
        load.value = 16.0  # a step of four octaves, to a load measured too
        await asyncio.sleep(0.5)
        assert policy.chooser.steps == 2 and board.refreshes == 0 and policy.mode == "ar"
        costs.cells = (1,)  # the fleet forgets 16 (say, a new replica set): ar unmeasured there
        await board.poll_once("costs")
        await asyncio.sleep(0.7)
        assert policy.chooser.unmeasured and 2 <= board.refreshes <= 5
        costs.cells = (1, 16)  # measured again: the re-polls stop
        await asyncio.sleep(0.5)
        done = board.refreshes
        await asyncio.sleep(0.5)
        assert not policy.chooser.unmeasured and board.refreshes == done
    finally:
        await policy.stop()
