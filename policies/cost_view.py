"""The fleet's measured cost model, read from the replicas' metrics pages.

Contract: `GoodputSource` (YAML `source: goodput`) reads the replicas' cost-model metrics from
Prometheus text pages (the Ray metrics page the other scrape signals read, fetched once per poll
through the policy's `PageFetcher`), keeps them per replica (`per` label) and merges them into
one `CostView` (`.view`); `read()` returns the fleet's measured step count. The view holds the
fitted step-cost terms, the measured step shapes, the self-spec and diffusion yields and the
realized tokens/s per (mode, load cell). Non-goals: predicting or choosing (`policies.goodput`),
measuring (the engine: `replicas/engine/cost_model.py`), torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .schema import GoodputSignal
from .signals import PageFetcher, samples

TERMS = ("intercept_s", "per_row_s", "per_token_s", "per_logit_s")


@dataclass
class CostView:
    coef: dict[str, float] = field(default_factory=dict)  # TERMS -> seconds
    steps: float = 0.0
    self_spec: dict[int, tuple[float, float]] = field(default_factory=dict)  # block -> (tokens/cycle, cycles)
    diffusion: dict[int, tuple[float, float]] = field(default_factory=dict)  # block -> (tokens/pass, blocks)
    shapes: list[tuple[float, float, float, float]] = field(default_factory=list)  # (rows, tokens, seconds, steps)
    realized: dict[tuple[str, int], tuple[float, float]] = field(default_factory=dict)  # (mode, running) -> (tok/s, windows)
    replicas: int = 0

    def logged(self) -> list[tuple[float, float, float, float, float, float]]:
        """(log rows, log tokens, rows, tokens, seconds, steps) of the usable shapes, computed once."""
        cached = getattr(self, "_logged", None)
        if cached is None or cached[0] != len(self.shapes):
            rows = [(math.log(r), math.log(t), r, t, y, n) for r, t, y, n in self.shapes if r > 0 and t > 0 and y > 0]
            cached = self._logged = (len(self.shapes), rows)
        return cached[1]

    def as_dict(self) -> dict:
        return {"coef": self.coef, "steps": self.steps, "replicas": self.replicas, "shapes": len(self.shapes),
                "self_spec": {str(b): {"tokens_per_cycle": t, "cycles": n} for b, (t, n) in sorted(self.self_spec.items())},
                "diffusion": {str(b): {"tokens_per_pass": t, "blocks": n} for b, (t, n) in sorted(self.diffusion.items())},
                "realized": {f"{m}@{n}": {"tokens_per_s": r, "windows": w}
                             for (m, n), (r, w) in sorted(self.realized.items())}}


def merge(views: list[CostView]) -> CostView:
    """One fleet view: coefficients weighted by each replica's steps, yields by their counts."""
    out = CostView(replicas=len(views))
    out.steps = sum(v.steps for v in views)
    if out.steps > 0:
        out.coef = {t: sum(v.coef.get(t, 0.0) * v.steps for v in views) / out.steps for t in TERMS}
    for attr in ("self_spec", "diffusion"):
        acc: dict[int, list[float]] = {}
        for v in views:
            for b, (mean, n) in getattr(v, attr).items():
                s = acc.setdefault(b, [0.0, 0.0])
                s[0] += mean * n
                s[1] += n
        setattr(out, attr, {b: (s[0] / s[1], s[1]) for b, s in acc.items() if s[1] > 0})
    out.shapes = [shape for v in views for shape in v.shapes]
    rates: dict[tuple[str, int], list[float]] = {}
    for v in views:  # a replica's rate at a cell, averaged over the replicas by their windows
        for key, (rate, windows) in v.realized.items():
            s = rates.setdefault(key, [0.0, 0.0])
            s[0] += rate * windows
            s[1] += windows
    out.realized = {key: (s[0] / s[1], s[1]) for key, s in rates.items() if s[1] > 0}
    return out


class GoodputSource:
    def __init__(self, spec: GoodputSignal, pages: PageFetcher) -> None:
        self.spec, self.pages = spec, pages
        self.name, self.interval_s, self.stale_after_s = spec.name, spec.interval_s, spec.stale_after_s
        self.view = CostView()

    async def read(self) -> float:
        by: dict[tuple, CostView] = {}
        p = self.spec.prefix

        def keep(labels):
            if any(labels.get(k) != v for k, v in self.spec.labels.items()):
                return None
            key = (url, labels.get(self.spec.per, ""))
            return by.setdefault(key, CostView())

        for url in self.spec.urls:
            text = await self.pages.text(url, self.spec.timeout_s)
            for labels, value in samples(text, p + "step_cost_seconds"):
                if (v := keep(labels)) is not None and labels.get("term") in TERMS:
                    v.coef[labels["term"]] = value
            for labels, value in samples(text, p + "cost_model_steps"):
                if (v := keep(labels)) is not None:
                    v.steps = value
            counts = {}
            for labels, value in samples(text, p + "step_shape_count"):
                if keep(labels) is not None:
                    counts[(url, labels.get(self.spec.per, ""), labels.get("rows"), labels.get("tokens"),
                            labels.get("logits"))] = value
            for labels, value in samples(text, p + "step_shape_seconds"):
                v = keep(labels)
                shape = [labels.get(k) for k in ("rows", "tokens", "logits")]
                if v is None or None in shape:
                    continue
                rows, tokens, logits = (float(x) for x in shape)
                if logits != tokens and tokens != rows:
                    continue  # a step with prefill chunks in it: not the shape of any mode's steady state
                n = counts.get((url, labels.get(self.spec.per, ""), *shape), 1.0)
                v.shapes.append((rows, tokens, value, n))
            for attr, mean_name, count_name in (("self_spec", "self_spec_tokens_per_cycle", "self_spec_cycles"),
                                                ("diffusion", "diffusion_tokens_per_pass", "diffusion_blocks")):
                counts = {}
                for labels, value in samples(text, p + count_name):
                    if keep(labels) is not None and "block" in labels:
                        counts[(url, labels.get(self.spec.per, ""), labels["block"])] = value
                for labels, value in samples(text, p + mean_name):
                    if (v := keep(labels)) is not None and "block" in labels:
                        n = counts.get((url, labels.get(self.spec.per, ""), labels["block"]), 0.0)
                        getattr(v, attr)[int(float(labels["block"]))] = (value, n)
            windows = {}
            for labels, value in samples(text, p + "realized_windows"):
                if keep(labels) is not None and "mode" in labels and "running" in labels:
                    windows[(url, labels.get(self.spec.per, ""), labels["mode"], labels["running"])] = value
            for labels, value in samples(text, p + "realized_tokens_per_second"):
                if (v := keep(labels)) is not None and "mode" in labels and "running" in labels:
                    w = windows.get((url, labels.get(self.spec.per, ""), labels["mode"], labels["running"]), 0.0)
                    v.realized[(labels["mode"], int(float(labels["running"])))] = (value, w)
        views = [v for v in by.values() if v.steps > 0 and len(v.coef) == len(TERMS)]
        self.view = merge(views)
        return self.view.steps
