"""`AdaptiveModePolicy`: self-speculation while traffic is sparse, AR batching under load.

Each evaluation computes the `mode.signal` expression over the signals, smooths it (EWMA with
a half-life in seconds), and moves between levels [sparse_mode, (middle band), loaded_mode]
with hysteresis: up when the value exceeds a level's `enter_above`, down when it falls below
its `leave_below`, and never sooner than `min_dwell_s` after the previous switch (so a load
sitting on a threshold causes at most one switch per dwell window), except a move up once the
load is an octave above both the load at the last switch and the level's threshold (a load
step: a burst must not wait out the dwell in the sparse mode). When a signal the
expression uses is stale, `on_stale: hold` keeps the mode and `fallback` moves to
`stale_mode`. `decide()` re-evaluates at most every `eval_interval_s` (local counters are
read instantly) and applies `client_override` to explicit modes: allow, deny, or clamp
(an explicit mode is honoured only if it is not costlier under load than the current level,
i.e. no self_spec while loaded). Switches are counted in Prometheus metrics and kept in the
snapshot that `GET /v1/nld/policy` serves. `engine_settings()` is what replicas should apply
now (draft tiers; downgrade of running self_spec requests while loaded) and `since` when the
policy adopted them, so a replica can ignore settings older than the ones it applied. It is
None until the first evaluation on fresh signals ("attached"): a gateway that just started
has no view of the fleet yet, and must not overwrite, with a newer date, what a running
gateway decided (a rollout or a scale-up of gateways would otherwise reset the fleet to sparse).
With a goodput rule, while the chooser finds the running mode unmeasured at the load (a load
step into a load it never ran at, for a bounded time) the policy asks the board for an extra poll
of the signals every `settle_s`, so the cost model it decides on has measured the new load
without waiting for the next interval. A goodput switch rests on the chosen mode's earlier
measurement: once the replicas have measured it again near that load, a choice against it undoes
the switch within the dwell (once per dwell). Non-goals: polling (see `signals.SignalBoard`), HTTP.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable

from prometheus_client import CollectorRegistry

from .base import MODES, ModeDecision, ModePolicyBase, ModeRequest
from .expr import compile_expression
from .goodput import STEADY_OCTAVES, GoodputChooser, octaves_between, windows_near
from .levels import Level, PolicyMetrics, Switch
from .predict import MIN_WINDOWS
from .schema import PolicyFile
from .signals import SignalBoard


class AdaptiveModePolicy(ModePolicyBase):
    def __init__(self, spec: PolicyFile, board: SignalBoard, *, metrics: PolicyMetrics | None = None,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 eval_interval_s: float = 0.1) -> None:
        self.spec = spec
        rule = spec.mode
        self.board, self.clock, self.wall = board, clock, wall
        self.expr = compile_expression(rule.signal)
        self.levels = [Level(rule.sparse_mode, spec_algorithm=rule.sparse_self_spec_algorithm)]
        if rule.middle is not None:
            self.levels.append(Level(rule.middle.mode, rule.middle.enter_above, rule.middle.leave_below,
                                     rule.middle.self_spec_algorithm))
        self.levels.append(Level(rule.loaded_mode, rule.enter_loaded_above, rule.leave_loaded_below,
                                 rule.loaded_self_spec_algorithm))
        modes = [lv.mode for lv in self.levels]
        self.level = modes.index(rule.initial_mode) if rule.initial_mode is not None else 0
        self.chooser = (GoodputChooser(rule.goodput, [lv.mode for lv in self.levels], spec.engine.draft_tiers)
                        if rule.goodput is not None else None)
        self.goodput: dict | None = None  # the last goodput evaluation (for the snapshot)
        self.repoll_due = float("-inf")  # when the pending re-poll fires (no second one before it)
        self.attached_at: float | None = None  # wall clock of the first evaluation on fresh signals
        self.settings_since = wall()
        self.smoothed: float | None = None
        self.raw: float | None = None
        self.values: dict[str, float] = {}
        self.stale: set[str] = set()
        self.last_eval: float | None = None
        self.last_switch_clock = float("-inf")
        self.tried_at: float | None = None  # the load at which the current mode was entered as a try
        self.recheck: tuple[str, float, float] | None = None  # a goodput switch's (mode, load, windows there)
        self.switch_load: float | None = None  # the smoothed load at the last switch
        self.last_switch: Switch | None = None
        self.switch_count = 0
        self.eval_interval_s = eval_interval_s
        self._ticker: asyncio.Task | None = None
        self.metrics = metrics or PolicyMetrics(CollectorRegistry())
        self._publish_mode()

    # ---- state carried across a reload ---------------------------------------------------
    def adopt(self, old: "AdaptiveModePolicy") -> None:
        """Keep the previous policy's mode, smoothing and dwell clock (hot reload)."""
        modes = [lv.mode for lv in self.levels]
        if old.mode in modes:
            self.level = modes.index(old.mode)
        self.smoothed, self.last_switch_clock, self.last_switch = old.smoothed, old.last_switch_clock, old.last_switch
        self.switch_count, self.tried_at, self.switch_load = old.switch_count, old.tried_at, old.switch_load
        self.recheck = old.recheck
        self.attached_at = old.attached_at  # the view carries over; the new file's settings date from now
        self._publish_mode()

    @property
    def mode(self) -> str:
        return self.levels[self.level].mode

    # ---- evaluation ----------------------------------------------------------------------
    def evaluate(self) -> str:
        now = self.clock()
        values, stale = self.board.read(now)
        values.setdefault("replicas", self.spec.mode.replicas)
        rule = self.spec.mode
        watched = self.expr.names | ({rule.goodput.costs} if rule.goodput is not None else set())
        self.values, self.stale = values, stale & watched
        for name, v in values.items():
            self.metrics.signal.labels(name=name).set(v)
        if self.stale:
            if rule.on_stale == "fallback":  # the schema guarantees stale_mode is one of the levels
                target = [lv.mode for lv in self.levels].index(rule.stale_mode)
                self._switch_to(target, now, "stale", f"stale signals: {', '.join(sorted(self.stale))}")
            self.last_eval = now
            return self.mode
        raw = self.expr.evaluate(values)
        if self.attached_at is None:  # the first view of the fleet: settings date from now
            self.attached_at = self.settings_since = self.wall()
        half = rule.smoothing.ewma_half_life_s
        if self.smoothed is None or half <= 0 or self.last_eval is None:
            self.smoothed = raw
        else:
            alpha = 1.0 - 0.5 ** (max(now - self.last_eval, 0.0) / half)
            self.smoothed += alpha * (raw - self.smoothed)
        self.raw, self.last_eval = raw, now
        self.metrics.signal.labels(name="smoothed").set(self.smoothed)
        if self.chooser is not None and self._decide_by_goodput(now):
            return self.mode
        target = self.level
        while target + 1 < len(self.levels) and self.smoothed > self.levels[target + 1].enter_above:
            target += 1
        while target > 0 and self.smoothed < self.levels[target].leave_below:
            target -= 1
        if target != self.level:
            reason = "rising" if target > self.level else "falling"
            edge = self.levels[target].enter_above if target > self.level else self.levels[self.level].leave_below
            detail = f"signal {self.smoothed:.2f} {'>' if target > self.level else '<'} {edge:g}"
            self._switch_to(target, now, reason, detail, ignore_dwell=self._load_stepped_up(target, edge))
        return self.mode

    def _decide_by_goodput(self, now: float) -> bool:
        """Switch to the level with the best predicted goodput; False while the cost model is cold
        (the thresholds decide then)."""
        source = self.board.sources[self.spec.mode.goodput.costs]
        view = source.view
        choice = self.chooser.choose(view, self.smoothed, self.raw, self.mode, now)
        cold = self.chooser.ready(view) or (None if choice is not None else "cold: a mode's yield not measured yet")
        self.goodput = {"decided_by": "thresholds" if choice is None else "goodput", "cold": cold,
                        "load": {"current": self.smoothed, "projected": self.raw},
                        "choice": None if choice is None else choice.mode,
                        "predictions": None if choice is None else choice.predictions, "model": view.as_dict(),
                        "load_step": {"load": self.chooser.step_n, "steps": self.chooser.steps,
                                      "margin_holds": self.chooser.merit}}
        settle = self.spec.mode.goodput.settle_s
        if self.chooser.unmeasured and now >= self.repoll_due and self.board.refresh_after(settle):
            self.repoll_due = now + settle  # the running mode is new at this load: see its measurement soon
        if choice is None:
            return False
        at = "projected" if self.raw > self.smoothed else "current"
        for m, p in choice.predictions[at].items():
            self.metrics.predicted.labels(mode=m).set(p["tokens_per_s"])
        target = [lv.mode for lv in self.levels].index(choice.mode)
        if target != self.level:
            load = max(self.smoothed, self.raw)
            void = self.tried_at is not None and octaves_between(load, self.tried_at) > STEADY_OCTAVES
            done = self.tried_at is not None and self.chooser.basis.get(self.mode, False)
            rechecked = self._rechecked(view)
            dwell_over = self._dwell_over(now)
            if self._switch_to(target, now, choice.reason, choice.detail,
                               ignore_dwell=void or done or rechecked or self._load_stepped_up(target),
                               tried_at=load if choice.reason == "explore" else None):
                if choice.reason == "goodput" and (dwell_over or not rechecked):
                    self.recheck = (self.mode, load, windows_near(view, self.mode, load))
        return True

    def _rechecked(self, view) -> bool:
        """Whether the running mode, entered by a goodput switch (not by undoing one), has since been
        measured again near the load it was entered at (`MIN_WINDOWS` new windows of its realized
        rate). The switch rested on that mode's rate measured earlier, perhaps in another speed
        phase of the machine; once the replicas have measured it now, a choice against it may undo
        the switch within the dwell (one undo per dwell: the undo itself is not re-checked). Seen in
        a peer run at 8 requests per replica: self_spec predicted 1.13x ar from an older cell,
        measured 0.88x, and the dwell held it for the rest of the window (0.82x fixed ar)."""
        if self.recheck is None or self.recheck[0] != self.mode:
            return False
        mode, load, windows = self.recheck
        return windows_near(view, mode, load) - windows >= MIN_WINDOWS

    def _switch_to(self, target: int, now: float, reason: str, detail: str, ignore_dwell: bool = False,
                   tried_at: float | None = None) -> bool:
        """`ignore_dwell`: a try (goodput's `explore`) whose load has since moved away measures
        nothing useful, and one whose mode is now measured near its load has done its job, so the
        policy leaves it at once instead of holding it for the dwell (a try of self_spec at 4
        requests per replica, at half ar's tokens/s, had held a whole 14 s peer window).
        `tried_at`: the load of a switch that is a try (every other switch forgets the last try).
        Every switch forgets the last goodput switch's re-check too. Whether it switched."""
        if target == self.level or (not ignore_dwell and not self._dwell_over(now)):
            return False
        self.tried_at, self.recheck = tried_at, None
        self.switch_load = self.smoothed
        old = self.mode
        self.level = target
        self.last_switch_clock = now
        self.last_switch = Switch(self.wall(), old, self.mode, reason, detail)
        self.settings_since = self.last_switch.at
        self.switch_count += 1
        self.metrics.switches.labels(**{"from": old, "to": self.mode, "reason": reason}).inc()
        self._publish_mode()
        return True

    def _dwell_over(self, now: float) -> bool:
        """Whether `min_dwell_s` has passed since the last switch."""
        return now - self.last_switch_clock >= self.spec.mode.min_dwell_s

    def _load_stepped_up(self, target: int, entry: float = 0.0) -> bool:
        """A move to a more loaded level once the load (smoothed or raw, the larger) is at least
        an octave above the load at the last switch and above `entry` (a threshold level's
        `enter_above`): a load step, which the dwell must not hold in the sparse mode (an idle
        fleet falls to self_spec; a burst of 32 requests then ran up to a dwell in it at 0.77x
        ar's tokens/s, docs/PERFORMANCE.md). Noise around a threshold or a crossover moves the
        load less, so the dwell still bounds switching there; every move down keeps the dwell."""
        if target <= self.level or self.switch_load is None:
            return False
        load = max(self.smoothed or 0.0, self.raw or 0.0)
        return load >= 2.0 * max(self.switch_load, entry, 1.0)

    def _publish_mode(self) -> None:
        for m in MODES:
            self.metrics.mode.labels(mode=m).set(1.0 if m == self.mode else 0.0)

    # ---- ModePolicy ----------------------------------------------------------------------
    def decide(self, request: ModeRequest) -> ModeDecision:
        if self.last_eval is None or self.clock() - self.last_eval >= self.eval_interval_s:
            self.evaluate()
        mode = self.mode
        asked = request.requested_mode
        decision = self._decide(mode, asked)
        algorithm = self.levels[self.level].spec_algorithm
        if decision.mode == "self_spec" and algorithm is not None:  # the level's self_spec algorithm
            return ModeDecision(decision.mode, decision.reason, algorithm)
        return decision

    def _decide(self, mode: str, asked: str) -> ModeDecision:
        if asked == "auto":
            return ModeDecision(mode, f"policy:{'loaded' if self.level == len(self.levels) - 1 else 'sparse'}"
                                if len(self.levels) == 2 else f"policy:level{self.level}")
        override = self.spec.mode.client_override
        if override == "allow":
            return ModeDecision(asked, "client")
        if override == "clamp":
            modes = [lv.mode for lv in self.levels]
            asked_level = modes.index(asked) if asked in modes else 0
            if asked_level >= self.level:
                return ModeDecision(asked, "client")
            return ModeDecision(mode, "clamped")
        return ModeDecision(mode, "override:deny")

    def engine_settings(self) -> dict | None:
        """What replicas should apply now; `since` (wall clock) is when the policy adopted them:
        at its first evaluation on fresh signals (or a reload), then at each switch. None before
        that first evaluation: no view yet, nothing to impose."""
        if self.attached_at is None:
            return None
        eng = self.spec.engine
        settings: dict = {"draft_tiers": [t.model_dump() for t in eng.draft_tiers], "since": self.settings_since}
        if eng.downgrade_running:
            settings["downgrade_self_spec"] = self.level == len(self.levels) - 1 and self.mode != "self_spec"
        return settings

    def snapshot(self) -> dict:
        now = self.clock()
        signals = {}
        for name, st in self.board.states.items():
            signals[name] = {"value": st.value, "age_s": None if st.updated_at is None else now - st.updated_at,
                             "stale": name in self.stale, "error": st.error}
        sw = self.last_switch
        return {
            "policy": "adaptive",
            "mode": self.mode,
            "levels": [lv.mode for lv in self.levels],
            "value": self.smoothed,
            "raw_value": self.raw,
            "signals": signals,
            "stale": bool(self.stale),
            "attached": self.attached_at is not None,
            "switches": self.switch_count,
            "last_switch": None if sw is None else {"at": sw.at, "from": sw.from_mode, "to": sw.to_mode,
                                                     "reason": sw.reason, "detail": sw.detail},
            "client_override": self.spec.mode.client_override,
            "engine": self.engine_settings(),
            "goodput": self.goodput,
        }

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Poll the signals and re-evaluate on a timer, so the mode follows the load even when
        no request arrives (e.g. back to the sparse mode after a burst ends)."""
        self.board.start()
        if self._ticker is None:
            self._ticker = asyncio.create_task(self._tick_loop(), name="policy-eval")

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(max(self.eval_interval_s, 0.05))
            self.evaluate()

    def cancel(self) -> None:
        self.board.cancel()
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None

    async def stop(self) -> None:
        ticker = self._ticker
        self.cancel()
        await self.board.stop()
        if ticker is not None:
            await asyncio.gather(ticker, return_exceptions=True)
