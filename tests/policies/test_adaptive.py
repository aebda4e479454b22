"""The adaptive policy's decision logic on a simulated clock: hysteresis, dwell, smoothing,
staleness, overrides, expressions and the no-thrash guarantee."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from policies import AdaptiveModePolicy, ModeRequest, PolicyMetrics, parse_policy
from policies.expr import compile_expression
from policies.signals import SignalBoard

pytestmark = pytest.mark.anyio


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class FakeSource:
    """A polled source whose value the test sets; `fail` makes reads raise."""

    def __init__(self, name: str, stale_after_s: float = 5.0) -> None:
        self.name, self.interval_s, self.stale_after_s = name, 1.0, stale_after_s
        self.value, self.fail = 0.0, False

    async def read(self) -> float:
        if self.fail:
            raise RuntimeError("down")
        return self.value


POLICY = """
signals:
  - {name: fleet, source: prometheus, url: http://p:9090, query: q, stale_after_s: 5}
mode:
  signal: fleet
  enter_loaded_above: 8
  leave_loaded_below: 4
  min_dwell_s: 10
  {extra}
"""


def make(extra: str = "", **kw):
    spec = parse_policy(POLICY.replace("{extra}", extra))
    clock, src = Clock(), FakeSource("fleet")
    board = SignalBoard([src], clock=clock)
    registry = CollectorRegistry()
    policy = AdaptiveModePolicy(spec, board, metrics=PolicyMetrics(registry), clock=clock, wall=clock, **kw)
    return policy, src, clock, board, registry


async def feed(board, src, clock, value, seconds=1.0):
    src.value = value
    clock.t += seconds
    await board.poll_once(src.name)


def auto(policy) -> str:
    return policy.decide(ModeRequest()).mode


async def test_hysteresis_two_thresholds():
    policy, src, clock, board, _ = make()
    for value, expect in [(3, "self_spec"), (7, "self_spec"), (9, "ar"), (6, "ar"), (4.5, "ar")]:
        clock.t += 11
        await feed(board, src, clock, value)
        assert policy.evaluate() == expect, value
    clock.t += 11
    await feed(board, src, clock, 3.9)
    assert policy.evaluate() == "self_spec"
    snap = policy.snapshot()
    assert snap["switches"] == 2 and snap["last_switch"]["reason"] == "falling"
    assert "3.90 < 4" in snap["last_switch"]["detail"]


async def test_min_dwell_delays_the_next_switch():
    policy, src, clock, board, _ = make()
    await feed(board, src, clock, 9)
    assert policy.evaluate() == "ar"
    await feed(board, src, clock, 1, seconds=3)
    assert policy.evaluate() == "ar"  # only 3 s since the switch
    await feed(board, src, clock, 1, seconds=7.5)
    assert policy.evaluate() == "self_spec"


async def test_a_load_step_moves_up_within_the_dwell_and_moves_down_never_do():
    """An idle fleet falls to the sparse mode; a burst that arrives within the dwell goes to ar at
    once (held for the dwell it ran at 0.77x ar's tokens/s). A rise to just above the threshold
    still waits, and so does every move down."""
    policy, src, clock, board, _ = make()
    await feed(board, src, clock, 9)
    assert policy.evaluate() == "ar"
    await feed(board, src, clock, 0, seconds=11)
    assert policy.evaluate() == "self_spec"  # idle: sparse (after the dwell)
    await feed(board, src, clock, 9, seconds=2)
    assert policy.evaluate() == "self_spec"  # above 8, but not an octave above it: the dwell holds
    await feed(board, src, clock, 32, seconds=1)
    assert policy.evaluate() == "ar" and policy.snapshot()["last_switch"]["reason"] == "rising"
    await feed(board, src, clock, 0, seconds=1)
    assert policy.evaluate() == "ar"  # down: the dwell holds
    await feed(board, src, clock, 0, seconds=9.5)
    assert policy.evaluate() == "self_spec"


async def test_ewma_smoothing_ignores_a_short_spike():
    policy, src, clock, board, _ = make("smoothing: {ewma_half_life_s: 4}")
    await feed(board, src, clock, 1)
    policy.evaluate()
    await feed(board, src, clock, 30, seconds=0.5)  # a half-second spike
    policy.evaluate()
    assert policy.mode == "self_spec" and 1 < policy.smoothed < 30 * 0.2
    for _ in range(20):  # sustained load gets through
        await feed(board, src, clock, 30, seconds=1)
        policy.evaluate()
    assert policy.mode == "ar"


async def test_stale_signals_hold_or_fall_back():
    policy, src, clock, board, _ = make()
    await feed(board, src, clock, 9)
    assert policy.evaluate() == "ar"
    src.fail = True
    clock.t += 30
    await board.poll_once("fleet")
    assert policy.evaluate() == "ar" and policy.snapshot()["stale"]
    assert policy.snapshot()["signals"]["fleet"]["error"] == "down"
    fb, src2, clock2, board2, _ = make("on_stale: fallback\n  stale_mode: self_spec")
    await feed(board2, src2, clock2, 9)
    assert fb.evaluate() == "ar"
    clock2.t += 30  # no new reads: the value ages past stale_after_s
    assert fb.evaluate() == "self_spec" and fb.snapshot()["last_switch"]["reason"] == "stale"


async def test_client_override_rules():
    allow, src, clock, board, _ = make()
    await feed(board, src, clock, 9)
    allow.evaluate()
    assert allow.decide(ModeRequest("self_spec")).mode == "self_spec"
    deny, src, clock, board, _ = make("client_override: deny")
    assert deny.decide(ModeRequest("ar")).mode == "self_spec"
    clamp, src, clock, board, _ = make("client_override: clamp")
    assert clamp.decide(ModeRequest("ar")).mode == "ar"  # sparse: anything goes
    await feed(board, src, clock, 9)
    clamp.evaluate()
    d = clamp.decide(ModeRequest("self_spec"))
    assert d.mode == "ar" and d.reason == "clamped"  # loaded: no self_spec
    assert clamp.decide(ModeRequest("ar")).mode == "ar"


async def test_middle_band_for_diffusion():
    policy, src, clock, board, _ = make("middle: {mode: diffusion, enter_above: 3, leave_below: 2}")
    for value, expect in [(2.5, "self_spec"), (3.5, "diffusion"), (9, "ar"), (5, "ar"), (3.5, "diffusion"),
                          (1, "self_spec")]:
        clock.t += 11
        await feed(board, src, clock, value)
        assert policy.evaluate() == expect, value


async def test_load_held_at_the_threshold_does_not_thrash():
    """60 s of load hovering exactly around a threshold, evaluated 10 times a second: at most
    two switches in any window of two dwell periods."""
    policy, src, clock, board, _ = make()
    rng = random.Random(0)
    switch_times = []
    for _ in range(600):
        await feed(board, src, clock, 8 + rng.uniform(-4.5, 4.5), seconds=0.1)  # crosses both thresholds
        before = policy.mode
        policy.evaluate()
        if policy.mode != before:
            switch_times.append(clock.t)
    assert switch_times  # the signal did cross the thresholds
    dwell = policy.spec.mode.min_dwell_s
    for t in switch_times:
        assert sum(1 for s in switch_times if t <= s < t + 2 * dwell) <= 2


async def test_switches_and_signals_are_exported():
    policy, src, clock, board, registry = make()
    await feed(board, src, clock, 9)
    policy.evaluate()
    text = generate_latest(registry).decode()
    assert 'nld_policy_mode{mode="ar"} 1.0' in text
    assert 'nld_policy_switches_total{from="self_spec",reason="rising",to="ar"} 1.0' in text
    assert 'nld_policy_signal{name="fleet"} 9.0' in text


async def test_engine_settings_follow_the_mode_and_date_each_switch():
    spec = parse_policy(POLICY.replace("{extra}", "") + "engine: {downgrade_running: true, draft_tiers: "
                        "[{max_running: 4, block_length: 16}]}\n")
    clock, src = Clock(), FakeSource("fleet")
    board = SignalBoard([src], clock=clock)
    policy = AdaptiveModePolicy(spec, board, clock=clock, wall=clock)
    assert policy.engine_settings() is None  # no view of the fleet yet: nothing to impose
    clock.t += 1
    policy.evaluate()  # the signal was never read: still no view
    assert policy.engine_settings() is None and policy.snapshot()["attached"] is False
    await feed(board, src, clock, 3)
    policy.evaluate()
    attached = clock.t
    assert policy.engine_settings() == {"draft_tiers": [{"max_running": 4, "block_length": 16}],
                                        "downgrade_self_spec": False, "since": attached}  # adopted on fresh signals
    await feed(board, src, clock, 3)
    policy.evaluate()
    assert policy.engine_settings()["since"] == attached  # no switch: same settings, same date
    await feed(board, src, clock, 9)
    policy.evaluate()
    assert policy.engine_settings()["downgrade_self_spec"] is True
    assert policy.engine_settings()["since"] == clock.t > attached  # the switch's time: newer than any before


@pytest.mark.parametrize("text, values, expect", [
    ("max(a, b / replicas)", {"a": 2, "b": 9, "replicas": 3}, 3.0),
    ("min(a, 4) * 2 - -1", {"a": 7}, 9.0),
    ("a / b", {"a": 1, "b": 0}, 0.0),
])
def test_expressions(text, values, expect):
    assert compile_expression(text).evaluate(values) == expect


@pytest.mark.parametrize("text", ["__import__('os')", "a.b", "a ** 2", "max()", "a if b else c", "'x'"])
def test_expressions_reject_anything_else(text):
    with pytest.raises(ValueError, match="invalid expression"):
        compile_expression(text)


async def test_each_level_names_its_self_spec_algorithm():
    policy, src, clock, board, _ = make("sparse_self_spec_algorithm: quadratic\n  middle: {mode: self_spec, "
                                        "enter_above: 5, leave_below: 3, self_spec_algorithm: linear}")
    await feed(board, src, clock, 1)
    d = policy.decide(ModeRequest())
    assert (d.mode, d.spec_algorithm) == ("self_spec", "quadratic")
    clock.t += 11
    await feed(board, src, clock, 6)
    policy.evaluate()
    d = policy.decide(ModeRequest())
    assert (d.mode, d.spec_algorithm) == ("self_spec", "linear")
    clock.t += 11
    await feed(board, src, clock, 9)
    policy.evaluate()
    d = policy.decide(ModeRequest())
    assert (d.mode, d.spec_algorithm) == ("ar", None)
    d = policy.decide(ModeRequest(requested_mode="self_spec"))  # allowed; the loaded level names none
    assert (d.mode, d.spec_algorithm) == ("self_spec", None)
