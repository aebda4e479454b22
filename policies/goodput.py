"""Goodput: from the fleet's measured cost model, the mode predicted to serve best.

Contract: `predict(view, mode, n, ...)` gives a mode's step seconds, tokens/s and seconds per
token for a replica running `n` requests, all in that mode (`view`: a `policies.cost_view.
CostView`): a step of n rows costs `intercept + n * (per_row + w * (per_token + per_logit))` with
w tokens per row (ar 1, self_spec and diffusion their block); a self-spec cycle is two such steps
(draft, verify) and makes `tokens_per_cycle` tokens (a step's seconds come from the fit, pulled
toward the measured step shapes near it: `step_seconds`), a diffusion pass makes
`tokens_per_pass`. The model's prediction is then scaled by what the replicas really delivered
in that mode (`corrected`): realized / modelled tokens/s at the nearest load cell measured with
`MIN_WINDOWS` windows, within `MAX_OCTAVES` octaves of the load (prefill, request turnover, the
serving processes' CPU and misfit of the step model are in the realized rate, not in the model).
`GoodputChooser.choose(view, current, projected, mode, now)` predicts every level's mode at both
loads, keeps those within the latency SLO, and picks the best tokens/s at the higher of the two
loads (a rising load acts early; a falling one waits for the smoothing), smoothed over time
(EWMA of log tokens/s, half-life `smoothing_s`); it leaves the current mode only for a gain
above `margin`, and only a mode it picked at this load holds by that margin: a load step (an
octave, `STEP_OCTAVES`) clears it, and until a cost view first seen `settle_s` after the step
picks a mode, nothing holds by it (views polled before the step predicted the new load from
other loads' measurements; `step_at` tells the caller to re-poll). It returns None (cold: the caller keeps its static thresholds) until the view
has `min_steps` steps and a yield for every mode it needs.
Non-goals: reading the metrics (`policies.cost_view`), measuring (the engine:
`replicas/engine/cost_model.py`), dwell and staleness (the policy), torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .cost_view import CostView, GoodputSource, merge  # noqa: F401 - re-exported: the goodput signal's parts
from .schema import DraftTier, GoodputRule


# ---- prediction ----------------------------------------------------------------------------
def draft_block(tiers: list[DraftTier], running: float, requested: int) -> int:
    """The engine's rule (`EngineConfig.draft_block`) for a replica running `running` requests."""
    for tier in tiers:
        if running <= tier.max_running:
            return min(requested, tier.block_length)
    return min(requested, tiers[-1].block_length) if tiers else requested


def acceptance(tokens_per_cycle: float, block: int) -> float:
    """alpha with (1 - alpha^B) / (1 - alpha) = tokens per cycle: each draft accepted with
    probability alpha after its predecessor (geometric), solved by bisection."""
    target = min(max(tokens_per_cycle, 1.0), block - 1e-6)
    lo, hi = 0.0, 1.0 - 1e-9
    for _ in range(60):
        mid = (lo + hi) / 2
        if (1 - mid ** block) / (1 - mid) < target:
            lo = mid
        else:
            hi = mid
    return lo


def tokens_per_cycle(view: CostView, block: int, min_cycles: float) -> float | None:
    """Measured at `block` when it has `min_cycles`; else extrapolated, with the geometric
    acceptance, from the best-measured block length."""
    known = {b: v for b, v in view.self_spec.items() if v[1] > 0}
    if sum(n for _, n in known.values()) < min_cycles:
        return None
    if block in known and known[block][1] >= min_cycles:
        return known[block][0]
    b, (tpc, _) = max(known.items(), key=lambda kv: kv[1][1])
    alpha = acceptance(tpc, b)
    return (1 - alpha ** block) / (1 - alpha) if alpha > 0 else 1.0


@dataclass(frozen=True)
class Prediction:
    mode: str
    block: int
    step_s: float
    tokens_per_s: float  # the replica's, with n requests in this mode
    s_per_token: float  # one request's
    latency_s: float  # one request of `request_tokens` tokens
    correction: float = 1.0  # realized / modelled at the nearest measured load cell (1: none)

    def as_dict(self) -> dict:
        return {"block": self.block, "step_s": self.step_s, "tokens_per_s": self.tokens_per_s,
                "s_per_token": self.s_per_token, "latency_s": self.latency_s, "correction": self.correction}

    def scaled(self, factor: float) -> "Prediction":
        return Prediction(self.mode, self.block, self.step_s, self.tokens_per_s * factor, self.s_per_token / factor,
                          self.latency_s / factor, factor)


MIN_WINDOWS = 3  # one-second windows of realized throughput before a load cell corrects the model
MAX_OCTAVES = 2.0  # a cell corrects predictions up to this far from it (a factor of 4 in load)
CORRECTION_RANGE = (0.2, 5.0)  # the correction is clamped (a wild measurement cannot zero a mode)


def octaves_between(a: float, b: float) -> float:
    """How many octaves apart two loads are (a load below 1 counts as 1)."""
    return abs(math.log2(max(a, 1.0) / max(b, 1.0)))


def measured_cells(view: CostView, mode: str, n: float) -> list[tuple[float, int, float]]:
    """(distance in octaves from load `n`, load cell, tokens/s) of `mode`'s realized cells with
    at least `MIN_WINDOWS` windows."""
    return [(octaves_between(n, cell), cell, rate) for (m, cell), (rate, windows) in view.realized.items()
            if m == mode and windows >= MIN_WINDOWS]


def corrected(view: CostView, mode: str, n: float, *, tiers: list[DraftTier], rule: GoodputRule) -> Prediction | None:
    """`predict`, scaled by realized / modelled tokens/s at the measured load cell of `mode`
    nearest to `n` (in log load; the lower cell on a tie)."""
    raw = predict(view, mode, n, tiers=tiers, rule=rule)
    if raw is None:
        return None
    cells = [c for c in measured_cells(view, mode, n) if c[2] > 0]
    if not cells:
        return raw
    distance, cell, rate = min(cells)
    if distance > MAX_OCTAVES:
        return raw
    at_cell = predict(view, mode, cell, tiers=tiers, rule=rule)
    lo, hi = CORRECTION_RANGE
    return raw.scaled(min(max(rate / max(at_cell.tokens_per_s, 1e-12), lo), hi))


BANDWIDTH = 0.35  # kernel width of the local fit, in ln units of rows and tokens (a factor of ~1.4)
PRIOR = 0.05  # weight of the global fit against the local data's
CUTOFF = (4 * BANDWIDTH) ** 2  # shapes further than 4 kernel widths weigh nothing (exp(-8))


def step_seconds(view: CostView, rows: float, tokens: float) -> float:
    """Seconds of a step of `rows` rows and `tokens` tokens (logits at every token, or one per row
    for width 1). The global fit is the prior; measured shapes near this one pull the answer
    toward what they measured (a local weighted least-squares fit of seconds ~ 1 + rows + tokens
    on relative errors, kernel weights in log rows / log tokens, ridge toward the prior)."""
    c = view.coef
    prior = [c["intercept_s"], c["per_row_s"], c["per_token_s"] + c["per_logit_s"]]
    q = [1.0, rows, tokens]
    guess = max(sum(p * x for p, x in zip(prior, q)), 1e-6)
    a = [[0.0] * 3 for _ in range(3)]
    v = [0.0] * 3
    total = 0.0
    lr, lt = math.log(rows), math.log(tokens)
    for log_r, log_t, r, t, y, n in view.logged():
        d2 = (log_r - lr) ** 2 + (log_t - lt) ** 2
        if d2 > CUTOFF:
            continue
        w = min(n, 20.0) * math.exp(-d2 / (2 * BANDWIDTH ** 2)) / y ** 2
        x = [1.0, r, t]
        total += w
        for i in range(3):
            v[i] += w * x[i] * y
            for j in range(3):
                a[i][j] += w * x[i] * x[j]
    lam = PRIOR * total + 1.0 / guess ** 2  # the prior counts as one step at least
    for i in range(3):
        a[i][i] += lam * q[i] ** 2
        v[i] += lam * q[i] ** 2 * prior[i]
    beta = _solve3(a, v)
    return max(sum(b * x for b, x in zip(beta, q)), 1e-6)


def _solve3(a: list[list[float]], v: list[float]) -> list[float]:
    n = len(v)
    m = [row[:] + [v[i]] for i, row in enumerate(a)]
    for col in range(n):
        piv = max(range(col, n), key=lambda r: abs(m[r][col]))
        m[col], m[piv] = m[piv], m[col]
        if abs(m[col][col]) < 1e-30:
            continue
        for r in range(n):
            if r != col:
                f = m[r][col] / m[col][col]
                m[r] = [rv - f * cv for rv, cv in zip(m[r], m[col])]
    return [m[i][n] / m[i][i] if abs(m[i][i]) >= 1e-30 else 0.0 for i in range(n)]


def predict(view: CostView, mode: str, n: float, *, tiers: list[DraftTier], rule: GoodputRule) -> Prediction | None:
    n = max(n, 1.0)

    def step(width: int) -> float:
        return step_seconds(view, n, n * width)

    if mode == "ar":
        block, t, per_step = 1, step(1), 1.0
    elif mode == "self_spec":
        block = draft_block(tiers, n, rule.block_length)
        tpc = tokens_per_cycle(view, block, rule.min_cycles)
        if tpc is None:
            return None
        t, per_step = step(block), tpc / 2.0  # draft + verify
    else:
        block = rule.block_length
        known = view.diffusion.get(block)
        if known is None or known[1] < rule.min_cycles:
            return None
        t, per_step = step(block), known[0]
    t = max(t, 1e-9)
    s_per_token = t / per_step
    return Prediction(mode, block, t, n / s_per_token, s_per_token, rule.request_tokens * s_per_token)


@dataclass
class Choice:
    mode: str
    detail: str
    predictions: dict  # {"current": {mode: {...}}, "projected": {...}}
    reason: str = "goodput"  # or "explore": a mode not measured near this load, tried to measure it


EXPLORE_RATIO = 0.75  # an unmeasured mode is tried when its modelled tokens/s is at least this share of the current's
EXPLORE_RETRY_S = 300.0  # the same mode is not tried again at the same load cell sooner
STEADY_OCTAVES = 0.5  # exploring needs a steady load: current and projected within this (a factor of 1.41)
STEP_OCTAVES = 1.0  # a load this far from the load of the last step clears the margin's hold (a step)


def measured_near(view: CostView, mode: str, n: float, octaves: float = 1.0) -> bool:
    """Whether the replicas measured what `mode` delivers within `octaves` of load `n`."""
    return any(distance <= octaves for distance, _, _ in measured_cells(view, mode, n))


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
        self.step_n: float | None = None  # the load of the last load step (STEP_OCTAVES)
        self.step_at: float | None = None  # when it happened (None: no clock)
        self.steps = 0  # load steps seen (the caller re-polls the cost model after each)
        self.merit: str | None = None  # the mode picked on a settled view since the last step: the margin holds it
        self._seen_view: CostView | None = None
        self._seen_at: float | None = None  # when the current view was first seen
        self._settled_step = 0  # the last step whose settled view has been seen

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
        rate = self._smooth(options, now, n)
        slo = self.rule.latency_slo_s
        within = [m for m, p in options.items() if slo is None or p.latency_s <= slo]
        if not within:  # nothing meets the SLO: the fastest request wins
            best = min(options, key=lambda m: options[m].latency_s)
        else:
            best = max(within, key=lambda m: rate[m])
        keep = mode in within or not within
        gain = rate[best] / max(rate[mode], 1e-12) if mode in rate else float("inf")
        if best != mode and keep and self.merit == mode and gain <= 1.0 + self.rule.margin:
            best = mode  # not enough gain to move
        elif settled:
            self.merit = best  # picked on a view that has seen this load: the margin holds it from now
        here = (mode, load_octave(n))
        if not measured_near(view, mode, n) and now is not None and now - self.explored.get(here, -1e18) >= EXPLORE_RETRY_S:
            self.explored[here] = now  # running a mode not measured at this load: it is being tried
        detail = (f"{at} load {n:.2f}: " +
                  ", ".join(f"{m} {p.tokens_per_s:.0f} tok/s {p.latency_s:.3f} s" for m, p in options.items()))
        shown = {label: {m: p.as_dict() for m, p in ps.items()} for label, ps in preds.items()}
        if best == mode and (probe := self._explore(view, options, within, mode, current, projected, now)):
            return Choice(probe, f"explore {probe} (not measured near load {n:.2f}); " + detail, shown, "explore")
        return Choice(best, detail, shown)

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
        `EXPLORE_RETRY_S` (`choose` records a try when it sees the mode running unmeasured; with
        no clock, every call may propose). The policy's dwell bounds how long a try lasts."""
        n = max(current, projected)
        if octaves_between(projected, current) > STEADY_OCTAVES or \
                not measured_near(view, mode, n, octaves=0.5):
            return None
        for m in within:
            key = (m, load_octave(n))
            tried = self.explored.get(key)
            if m == mode or measured_near(view, m, n) or (tried is not None and now is not None
                                                          and now - tried < EXPLORE_RETRY_S):
                continue
            if options[m].tokens_per_s >= EXPLORE_RATIO * options[mode].tokens_per_s and \
                    self._ceiling(view, m, options[m].block) > 1.0 + self.rule.margin:
                return m  # proposed until the policy's dwell lets it switch (then `choose` records the try)
        return None
