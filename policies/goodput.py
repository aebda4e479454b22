"""Goodput: from the fleet's measured cost model, the mode predicted to serve best.

Contract: `GoodputChooser.choose(view, current, projected, mode, now)` predicts every level's mode
at both loads (`policies.predict.corrected`), keeps those within the latency SLO, and picks the
best tokens/s at the higher of the two loads (a rising load acts early; a falling one waits for
the smoothing, and never leaves a mode that wins at the load it falls to), smoothed over time
(EWMA of log tokens/s, half-life `smoothing_s`); it leaves the current mode only for a gain above
`margin`, and only a mode it picked at this load holds by that margin: a load step (an octave,
`STEP_OCTAVES`) clears it, and until a cost view first seen `settle_s` after the step picks a
mode, nothing holds by it (views polled before the step predicted the new load from other loads'
measurements; `steps` counts the steps). A mode whose prediction changes basis (extrapolated from
other loads <-> measured near this one) restarts its smoothing and clears the hold; while the
running mode is newly unmeasured at the load (`unmeasured`, for `UNMEASURED_REPOLL_S`) the policy
re-polls every `settle_s`. A mode not measured near a steady load may be proposed as a try
(`explore`). It returns None (cold: the caller keeps its static thresholds) until the view has
`min_steps` steps and a yield for every mode it needs.
Non-goals: predicting (`policies.predict`), reading the metrics (`policies.cost_view`),
measuring (the engine: `replicas/engine/cost_model.py`), dwell and staleness (the policy), torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .cost_view import CostView
from .predict import Prediction, corrected, measured_cells, octaves_between, tokens_per_cycle
from .schema import DraftTier, GoodputRule


@dataclass
class Choice:
    mode: str
    detail: str
    predictions: dict  # {"current": {mode: {...}}, "projected": {...}}
    reason: str = "goodput"  # or "explore": a mode not measured near this load, tried to measure it


# an unmeasured mode is tried when its modelled tokens/s is at least this share of the current's. On
# the 2-core VM the fit, from AR steps and prefills, put a one-row 32-token pass at 6.8 ms and
# self_spec at one request at 0.59x ar; measured, self_spec made 1.3-1.4x ar's tokens/s there (0.75
# never let it be tried, and the policy stayed in ar at one request until something else measured it).
EXPLORE_RATIO = 0.5
EXPLORE_RETRY_S = 300.0  # the same mode is not tried again at the same load cell sooner ...
EXPLORE_RETRY_MAX_S = 3600.0  # ... the wait doubles with each try that did not win there, up to this
STEADY_OCTAVES = 0.5  # exploring needs a steady load: current and projected within this (a factor of 1.41)
STEP_OCTAVES = 1.0  # a load this far from the load of the last step clears the margin's hold (a step)
UNMEASURED_REPOLL_S = 20.0  # the policy re-polls (every settle_s) this long after finding its mode unmeasured at a load


def measured_near(view: CostView, mode: str, n: float, octaves: float = 1.0) -> bool:
    """Whether the replicas measured what `mode` delivers within `octaves` of load `n`."""
    return any(distance <= octaves for distance, _, _ in measured_cells(view, mode, n))


def windows_near(view: CostView, mode: str, n: float, octaves: float = 1.0) -> float:
    """How many one-second windows of `mode`'s realized rate the replicas folded, in all, within
    `octaves` of load `n` (the count only grows: a rise says the mode was measured again there)."""
    return sum(windows for (m, cell), (_, windows) in view.realized.items()
               if m == mode and octaves_between(n, cell) <= octaves)


def load_octave(n: float) -> int:
    """The octave of a load that a try is remembered by."""
    return round(math.log2(max(n, 1.0)))


class GoodputChooser:
    def __init__(self, rule: GoodputRule, modes: list[str], tiers: list[DraftTier]) -> None:
        self.rule, self.modes, self.tiers = rule, modes, tiers
        self.smoothed: dict[str, float] = {}  # mode -> EWMA of log predicted tokens/s at the decision load
        self.last_t: float | None = None
        self.last_n: float | None = None  # the load of the smoothed rates (reset by a load step)
        self._memo_view: CostView | None = None
        self._memo: dict[tuple, Prediction | None] = {}
        self.explored: dict[tuple[str, int], float] = {}  # (mode, load octave) -> when it was tried
        self.tries: dict[tuple[str, int], int] = {}  # (mode, load octave) -> tries since it last won there
        self.step_n: float | None = None  # the load of the last load step (STEP_OCTAVES)
        self.step_at: float | None = None  # when it happened (None: no clock)
        self.steps = 0  # load steps seen
        self.merit: str | None = None  # the mode picked on a settled view since the last step: the margin holds it
        self._seen_view: CostView | None = None
        self._seen_at: float | None = None  # when the current view was first seen
        self._settled_step = 0  # the last step whose settled view has been seen
        self.basis: dict[str, bool] = {}  # mode -> its prediction at the decision load rests on a measurement near it
        self.unmeasured = False  # the running mode was just found unmeasured near the load: re-poll soon

    def _smooth(self, options: dict[str, Prediction], now: float | None, n: float) -> dict[str, float]:
        """EWMA (half-life `smoothing_s`) of each mode's log tokens/s at load `n`: noise in the
        measured costs does not flip the choice. A load step (`n` more than half an octave from the
        load of the last decision) starts afresh: the rates at the old load say nothing about the
        new one, and averaging them kept a burst of 32 requests in self_spec for about 3 s."""
        half = self.rule.smoothing_s
        stepped = self.last_n is None or octaves_between(n, self.last_n) > STEADY_OCTAVES
        alpha = 1.0 if now is None or self.last_t is None or half <= 0 or stepped else 1.0 - 0.5 ** (
            max(now - self.last_t, 0.0) / half)
        self.last_t = now
        if stepped:
            self.last_n = n  # the load the smoothed rates stand for (moved only by a step)
        for m, p in options.items():
            x = math.log(max(p.tokens_per_s, 1e-12))
            prev = self.smoothed.get(m)
            self.smoothed[m] = x if prev is None else prev + alpha * (x - prev)
        return {m: math.exp(self.smoothed[m]) for m in options}

    def _predict(self, view: CostView, mode: str, n: float) -> Prediction | None:
        """`corrected`, memoised per view (a new one per poll) and load rounded to 1/8 of a request:
        the policy evaluates every 0.1 s on the gateway's event loop."""
        if self._memo_view is not view:
            self._memo_view, self._memo = view, {}
        key = (mode, round(max(n, 1.0) * 8) / 8)
        if key not in self._memo:
            self._memo[key] = corrected(view, mode, key[1], tiers=self.tiers, rule=self.rule)
        return self._memo[key]

    def _track(self, view: CostView, n: float, now: float | None) -> bool:
        """Note a load step (clears the margin's hold) and a new view; whether the view is settled:
        first seen at least `settle_s` after the last step (always, with no clock). The first
        settled view after a step restarts the smoothing: the rates smoothed since the step came
        from views that had not measured the new load."""
        if view is not self._seen_view:
            self._seen_view, self._seen_at = view, now
        if self.step_n is None or octaves_between(n, self.step_n) >= STEP_OCTAVES:
            self.step_n, self.step_at, self.merit = n, now, None
            self.steps += 1
        settled = (now is None or self._seen_at is None or self.step_at is None
                   or self._seen_at >= self.step_at + self.rule.settle_s)
        if settled and self._settled_step != self.steps:
            self._settled_step = self.steps
            self.last_n = None  # `_smooth` starts afresh
        return settled

    def _rebase(self, view: CostView, options: dict[str, Prediction], n: float) -> None:
        """A mode whose prediction at the decision load changed basis (extrapolated from other
        loads <-> measured near this one) restarts its smoothing, and the margin's hold goes: the
        rates it smoothed, and the pick it held, rested on the other basis. Seen in a peer run:
        self_spec extrapolated to 8 requests at 3,158 tok/s against ar's measured 2,613 held the
        policy in self_spec for 4 s after its first measurement there (2,450 vs 2,648) arrived."""
        basis = {m: measured_near(view, m, n) for m in options}
        for m, near in basis.items():
            if self.basis.get(m) is not None and self.basis[m] != near:
                self.smoothed.pop(m, None)
                self.merit = None
        self.basis = basis

    def ready(self, view: CostView) -> str | None:
        """None when the view can decide; else why not (the cold start)."""
        if view.steps < self.rule.min_steps or not view.coef:
            return f"cold: {view.steps:g} of {self.rule.min_steps} steps measured"
        return None

    def choose(self, view: CostView, current: float, projected: float, mode: str,
               now: float | None = None) -> Choice | None:
        if self.ready(view) is not None:
            return None
        preds = {}
        for label, n in (("current", current), ("projected", projected)):
            preds[label] = {m: self._predict(view, m, n) for m in self.modes}
        if any(p is None for p in preds["current"].values()):
            return None  # a mode never measured (e.g. no self-spec cycle yet): the thresholds explore
        at = "projected" if projected > current else "current"
        options = preds[at]
        n = max(current, projected)
        settled = self._track(view, n, now)
        self._rebase(view, options, n)
        rate = self._smooth(options, now, n)
        slo = self.rule.latency_slo_s
        within = [m for m, p in options.items() if slo is None or p.latency_s <= slo]
        if not within:  # nothing meets the SLO: the fastest request wins
            best = min(options, key=lambda m: options[m].latency_s)
        else:
            best = max(within, key=lambda m: rate[m])
        keep = mode in within or not within
        gain = rate[best] / max(rate[mode], 1e-12) if mode in rate else float("inf")
        if best != mode and mode in within and self._undone_by_fall(preds, current, projected, best, mode):
            best = mode  # a falling load: no move that the load it falls to undoes
        elif best != mode and keep and self.merit == mode and gain <= 1.0 + self.rule.margin:
            best = mode  # not enough gain to move
        elif settled:
            self.merit = best  # picked on a view that has seen this load: the margin holds it from now
        octave = load_octave(n)
        here = (mode, octave)
        if self.basis[best]:
            self.tries.pop((best, octave), None)  # measured near this load and it wins: tries start over
        if not self.basis[mode] and now is not None and now - self.explored.get(here, -1e18) >= self._retry_s(here):
            self.explored[here] = now  # running a mode not measured at this load: it is being tried
            self.tries[here] = self.tries.get(here, 0) + 1
        self.unmeasured = (not self.basis[mode] and n >= 1.0 and now is not None
                           and now - self.explored.get(here, -1e18) <= UNMEASURED_REPOLL_S)
        detail = (f"{at} load {n:.2f}: " +
                  ", ".join(f"{m} {p.tokens_per_s:.0f} tok/s {p.latency_s:.3f} s" for m, p in options.items()))
        shown = {label: {m: p.as_dict() for m, p in ps.items()} for label, ps in preds.items()}
        if best == mode and (probe := self._explore(view, options, within, mode, current, projected, now)):
            return Choice(probe, f"explore {probe} (not measured near load {n:.2f}); " + detail, shown, "explore")
        return Choice(best, detail, shown)

    def _retry_s(self, key: tuple[str, int]) -> float:
        """How long after a try of (mode, load octave) the next one may start: `EXPLORE_RETRY_S`
        after the first, doubling with each further try that did not win there (a try that wins
        resets it), at most `EXPLORE_RETRY_MAX_S`. A mode that keeps losing at a steady load costs
        a dwell every 5 minutes without it: seen at 32 requests, a self_spec try took 70 of 343
        requests of a window and 12% of its tokens/s."""
        return min(EXPLORE_RETRY_S * 2 ** max(self.tries.get(key, 0) - 1, 0), EXPLORE_RETRY_MAX_S)

    @staticmethod
    def _undone_by_fall(preds: dict, current: float, projected: float, best: str, mode: str) -> bool:
        """Whether a move to `best` on a falling load would be undone where the load is going: the
        choice waits for the smoothed (current) load to fall, but a mode that wins at the projected
        load too is not left for one that wins only on the way down. Traced on the stack: load 4 -> 1
        in self_spec, the smoothed load passed 2 where ar wins, the policy moved to ar and its dwell
        then kept ar for 10 s at one request, where self_spec makes 1.3x ar's tokens/s."""
        if projected >= current:
            return False
        ahead, there = preds["projected"].get(best), preds["projected"].get(mode)
        return ahead is not None and there is not None and there.tokens_per_s >= ahead.tokens_per_s

    def _ceiling(self, view: CostView, mode: str, block: int) -> float:
        """The most a mode can make per AR step's cost: a linear self-spec cycle is two passes, each
        costing at least an AR step of the same rows, so it can beat ar only with more than 2
        tokens per cycle (a draft never accepted: never); diffusion, its tokens per pass."""
        if mode == "self_spec":
            tpc = tokens_per_cycle(view, block, self.rule.min_cycles)
            return 0.0 if tpc is None else tpc / 2.0
        if mode == "diffusion":
            known = view.diffusion.get(block)
            return 0.0 if known is None else known[0]
        return float("inf")

    def _explore(self, view: CostView, options: dict[str, Prediction], within: list[str], mode: str,
                 current: float, projected: float, now: float | None) -> str | None:
        """A mode worth measuring at this load: the current one was measured here and the load is
        steady, the other was never measured near it, and its modelled tokens/s is at least
        `EXPLORE_RATIO` of the current mode's (a model extrapolated from other shapes can be far
        off; a mode it rates far worse is not tried), and its ceiling (`_ceiling`) beats ar's by the
        margin (the draft's measured yield bounds self-spec whatever the step costs). Each (mode, load octave) once per
        `_retry_s` (`choose` records a try when it sees the mode running unmeasured; with
        no clock, every call may propose). The policy's dwell bounds how long a try lasts. Called by
        `choose` after `_rebase`, so `self.basis` holds each mode's measured-near-`n` answer."""
        n = max(current, projected)
        if octaves_between(projected, current) > STEADY_OCTAVES or \
                not measured_near(view, mode, n, octaves=0.5):
            return None
        for m in within:
            key = (m, load_octave(n))
            tried = self.explored.get(key)
            if m == mode or self.basis[m] or (tried is not None and now is not None
                                                          and now - tried < self._retry_s(key)):
                continue
            if options[m].tokens_per_s >= EXPLORE_RATIO * options[mode].tokens_per_s and \
                    self._ceiling(view, m, options[m].block) > 1.0 + self.rule.margin:
                return m  # proposed until the policy's dwell lets it switch (then `choose` records the try)
        return None
