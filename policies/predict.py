"""Predicted goodput of each mode, from the fleet's measured cost model.

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
Non-goals: choosing a mode (`policies.goodput`), reading the metrics (`policies.cost_view`),
measuring (the engine: `replicas/engine/cost_model.py`), torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .cost_view import CostView
from .schema import DraftTier, GoodputRule


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
