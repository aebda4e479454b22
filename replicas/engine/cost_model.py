"""The engine's measured cost model: what a step costs, and what each mode gets out of a pass.

Contract: `StepCosts.observe(rows, tokens, logits, seconds)` records one batched step (rows run,
tokens in all passes, logit rows asked for, wall seconds); `StepCosts.fit()` returns the linear
model `seconds ~ intercept + per_row * rows + per_token * tokens + per_logit * logits`
(coefficients >= 0) fitted by ridge least squares on relative errors over shape buckets: each
bucket (rows, tokens, logits rounded to a coarse grid) keeps an EWMA of its steps' features and
seconds (each step capped at `SPIKE_CAP` times the bucket's value), and weighs in with
min(count, `BUCKET_WEIGHT_CAP`) / seconds^2. Buckets keep what old regimes taught (e.g. the
cost of wide self-spec passes while the fleet runs AR) while each bucket's value follows drift.
The buckets themselves are exported too: a linear model cannot fit every shape (on a CPU a
32-row step of 8-token passes costs more than the fit over mostly one-row steps says), and the
policy predicts from the measured shapes near the one it asks about (`policies.goodput`).
`ModeYields` keeps EWMAs of the tokens a self-spec cycle makes (accepted drafts + 1) per draft
block length, and of the tokens per pass of a diffusion block (commit included) per block
length. `RealizedRates.observe(mode, running, tokens, seconds)` records what a step really delivered
while every decoding request ran one mode (`running`: the load it is filed under, `LoadPeak`, so a
steady load's request turnover counts for it): per (mode, load cell) it sums tokens and wall seconds
(prefill steps, request turnover and the CPU the serving processes take included) and folds
each `WINDOW_S` of them into an EWMA of tokens/s; the policy scales its model's prediction for a
mode by realized / modelled at the nearest cell it measured (`policies.predict.corrected`).
`CostModel.snapshot()` is the plain dict the engine's stats carry under "cost_model".
Non-goals: predicting goodput or choosing modes (the policy does, in `policies.goodput`),
context-length effects (attention over long contexts is not a feature), per-prompt classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

FEATURES = ("intercept_s", "per_row_s", "per_token_s", "per_logit_s")
BUCKET_WEIGHT_CAP = 20  # a bucket's weight in the fit: its steps, up to this many
BUCKET_ALPHA = 0.1  # EWMA weight of a new step in its bucket
YIELD_ALPHA = 0.01  # EWMA weight of a new cycle / block: ~100 cycles, many requests (acceptance varies by text)
SPIKE_CAP = 1.5  # a step counts as at most this many times its bucket's current value
RIDGE = 1e-3  # relative ridge on the non-intercept coefficients (keeps collinear fits finite)


def _grid(x: int) -> int:
    """Coarse bucket key: exact up to 16, then steps of an eighth of the power of two below."""
    if x <= 16:
        return x
    step = 1 << max(x.bit_length() - 4, 0)
    return x // step * step


@dataclass
class _Bucket:
    x: list[float]  # [rows, tokens, logits], EWMA
    y: float  # seconds, EWMA
    count: int = 1


@dataclass
class StepCosts:
    buckets: dict[tuple[int, int, int], _Bucket] = field(default_factory=dict)
    steps: int = 0
    _fitted: tuple[int, dict | None] = (-1, None)  # (steps at the last fit, its result)

    def observe(self, rows: int, tokens: int, logits: int, seconds: float) -> None:
        if rows <= 0 or seconds <= 0:
            return
        self.steps += 1
        key = (_grid(rows), _grid(tokens), _grid(logits))
        b = self.buckets.get(key)
        x = [float(rows), float(tokens), float(logits)]
        if b is None:
            self.buckets[key] = _Bucket(x, seconds)
            return
        a = max(BUCKET_ALPHA, 1.0 / (b.count + 1))  # a plain mean while the bucket is young
        b.x = [bx + a * (xi - bx) for bx, xi in zip(b.x, x)]
        # winsorised: a step stalled by another process (a shared CPU) moves the bucket by at most
        # half its value; a lasting change still gets through in a few steps
        b.y += a * (min(seconds, SPIKE_CAP * b.y) - b.y)
        b.count += 1

    def fit(self) -> dict[str, float] | None:
        """Non-negative ridge least squares over the buckets; None before any step. Cached until
        the next step (a fit over a few hundred buckets takes milliseconds of pure Python)."""
        if self._fitted[0] == self.steps:
            return self._fitted[1]
        coef = self._fit() if self.buckets else None
        self._fitted = (self.steps, coef)
        return coef

    def _fit(self) -> dict[str, float]:
        # relative errors: a 5 ms AR step weighs as much as a 50 ms wide one (weights / seconds^2)
        rows = [([1.0, *b.x], b.y, min(b.count, BUCKET_WEIGHT_CAP) / max(b.y, 1e-6) ** 2)
                for b in self.buckets.values()]
        active = list(range(len(FEATURES)))
        while True:
            coef = _ridge(rows, active)
            negative = [i for i in active if coef[i] < 0]
            if not negative:
                return dict(zip(FEATURES, coef))
            active.remove(min(negative, key=lambda i: coef[i]))  # drop the most negative term, refit


def _ridge(rows: list[tuple[list[float], float, float]], active: list[int]) -> list[float]:
    """Weighted ridge least squares on the `active` features (the others are 0)."""
    k = len(active)
    a = [[0.0] * k for _ in range(k)]
    v = [0.0] * k
    for x, y, w in rows:
        xs = [x[i] for i in active]
        for r in range(k):
            v[r] += w * xs[r] * y
            for c in range(k):
                a[r][c] += w * xs[r] * xs[c]
    for r in range(k):
        if active[r] != 0:  # no ridge on the intercept; scaled to the feature's own magnitude
            a[r][r] += RIDGE * max(a[r][r], 1e-12)
    sol = _solve(a, v)
    out = [0.0] * len(FEATURES)
    for r, i in enumerate(active):
        out[i] = sol[r]
    return out


def _solve(a: list[list[float]], v: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting; a singular direction gets 0."""
    n = len(v)
    m = [row[:] + [v[i]] for i, row in enumerate(a)]
    for col in range(n):
        piv = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[piv][col]) < 1e-18:
            continue
        m[col], m[piv] = m[piv], m[col]
        for r in range(n):
            if r != col and m[r][col] != 0.0:
                f = m[r][col] / m[col][col]
                m[r] = [rv - f * cv for rv, cv in zip(m[r], m[col])]
    return [m[i][n] / m[i][i] if abs(m[i][i]) >= 1e-18 else 0.0 for i in range(n)]


@dataclass
class _Yield:
    mean: float
    count: int = 1

    def add(self, value: float) -> None:
        a = max(YIELD_ALPHA, 1.0 / (self.count + 1))
        self.mean += a * (value - self.mean)
        self.count += 1


@dataclass
class ModeYields:
    self_spec: dict[int, _Yield] = field(default_factory=dict)  # block length -> tokens per cycle
    diffusion: dict[int, _Yield] = field(default_factory=dict)  # block length -> tokens per pass

    def observe_cycle(self, block: int, accepted: int) -> None:
        """A self-spec cycle at draft block `block` accepted `accepted` drafts (+1 token)."""
        _add(self.self_spec, block, accepted + 1.0)

    def observe_block(self, block: int, denoise_passes: int) -> None:
        """A finished diffusion block: `block` tokens in `denoise_passes` + 1 commit passes."""
        _add(self.diffusion, block, block / (denoise_passes + 1.0))


def _add(table: dict[int, _Yield], key: int, value: float) -> None:
    y = table.get(key)
    if y is None:
        table[key] = _Yield(value)
    else:
        y.add(value)


WINDOW_S = 1.0  # realized rates: wall seconds of steps per folded window
REALIZED_ALPHA = 0.3  # EWMA weight of a new window (a load cell follows a change in a few seconds)


def load_cell(running: int) -> int:
    """Half-octave cell of a running count: 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, ..."""
    if running <= 4:
        return max(running, 1)
    low = 1 << (running.bit_length() - 1)
    return low + low // 2 if running >= low + low // 2 else low


PEAK_HOLD_S = 1.0  # realized rates: a step is filed under the most requests run within one to two of these


@dataclass
class LoadPeak:
    """The load a realized sample is filed under: the most requests running within the last one to
    two `hold_s` windows, when the step's own count is above half of it (turnover within a steady
    load), else the step's own count (the load fell). A closed loop of 8 self-spec requests finishes
    them at scattered steps; filed by the count at each step, the steps between a completion and the
    next request's arrival went to the cell of 6, and the cell of 8 held only the full steps: 1,390-
    1,486 tok/s where the clients saw 1,197-1,340, which kept the policy in self_spec against ar's
    1,380 (ar's requests finish together, in waves, whose refill is a few steps)."""
    hold_s: float = PEAK_HOLD_S
    start: float | None = None
    current: int = 0  # the most running in the open window
    previous: int = 0  # ... in the window before it (0 when it was longer ago)

    def update(self, now: float, running: int) -> int:
        if self.start is None or now - self.start >= self.hold_s:
            recent = self.start is not None and now - self.start < 2 * self.hold_s
            self.previous, self.current, self.start = self.current if recent else 0, 0, now
        self.current = max(self.current, running)
        peak = max(self.current, self.previous)
        return peak if 2 * running > peak else running


@dataclass
class _Rate:
    tokens: float = 0.0  # the open window
    seconds: float = 0.0
    rate: float | None = None  # EWMA tokens/s of the folded windows
    windows: int = 0


@dataclass
class RealizedRates:
    cells: dict[tuple[str, int], _Rate] = field(default_factory=dict)

    def observe(self, mode: str, running: int, tokens: int, seconds: float) -> None:
        """A step (and what the loop did until the next) while `running` requests held a KV slot
        and every decoding one ran `mode`; it delivered `tokens` tokens in `seconds`."""
        if running <= 0 or seconds <= 0:
            return
        cell = self.cells.setdefault((mode, load_cell(running)), _Rate())
        cell.tokens += tokens
        cell.seconds += seconds
        if cell.seconds >= WINDOW_S:
            value = cell.tokens / cell.seconds
            a = max(REALIZED_ALPHA, 1.0 / (cell.windows + 1))
            cell.rate = value if cell.rate is None else cell.rate + a * (value - cell.rate)
            cell.windows += 1
            cell.tokens = cell.seconds = 0.0

    def snapshot(self) -> list[list]:
        """[mode, load cell, tokens/s, windows] per cell with at least one folded window."""
        return [[m, n, c.rate, c.windows] for (m, n), c in sorted(self.cells.items()) if c.rate is not None]


@dataclass
class CostModel:
    steps: StepCosts = field(default_factory=StepCosts)
    yields: ModeYields = field(default_factory=ModeYields)
    realized: RealizedRates = field(default_factory=RealizedRates)

    def snapshot(self) -> dict:
        return {
            "coef": self.steps.fit(),
            "steps": self.steps.steps,
            # the measured table: [rows, tokens, logit rows, seconds, steps] per bucket: its grid key
            # (stable, so it can label a metric series) and EWMA seconds
            "buckets": [[*key, b.y, b.count] for key, b in sorted(self.steps.buckets.items())],
            "self_spec": {str(b): {"tokens_per_cycle": y.mean, "cycles": y.count}
                          for b, y in sorted(self.yields.self_spec.items())},
            "diffusion": {str(b): {"tokens_per_pass": y.mean, "blocks": y.count}
                          for b, y in sorted(self.yields.diffusion.items())},
            "realized": self.realized.snapshot(),
        }
