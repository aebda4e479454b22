"""The replicas' reports, collected from their answers: a metrics page that needs no fetch.

Contract: every `/generate` answer of a replica carries one `x-nld-replica-report` header
(`replicas.wire.REPORT_HEADER`, made by `replicas.report`): `<replica id>;<seq>;<JSON>`, the
replica's load and measured cost model as of its engine's last stats snapshot (`seq` changes
with the snapshot). The gateway hands each header to `ReplicaReports.offer(value)`; a header
whose (replica, seq) was seen already costs a string split, a new one one JSON parse.
`page(now)` renders the reports of the replicas heard from within `keep_s` as Prometheus text
with the names and labels of the replicas' series on Ray's metrics page (`ray_nld_replica_*`,
labels `replica`, `model`, and `application` / `deployment` under Ray Serve), so the `scrape`
and `goodput` sources read it unchanged: a policy names it with the URL `reports:`
(`REPORTS_URL`). A replica not heard from for `idle_after_s` shows zero load (running,
waiting), its cost model kept: a report's load is as of its answer, and a replica that stopped
answering most likely ran out of requests (Ray's page shows the same replica at 0 within a
metrics report). The page is rendered once per change.

Why: reading the same series from Ray's metrics page costs Ray's dashboard agent about 55 ms of
CPU per fetch (a 700 KB page), which on a small CPU node lands on the engine's cores
(docs/PERFORMANCE.md); the reports ride on answers the replicas send anyway. What they cannot
see: a replica busy only with long streams started through OTHER gateways (this gateway's own
are in its `local` in-flight count) reads as idle after `idle_after_s`, and a replica gone
(scaled down) is counted until `keep_s` passes. Non-goals:
parsing Prometheus text (`signals`), deciding (`adaptive`, `goodput`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger("policies.reports")

REPORTS_URL = "reports:"  # the page of the collected reports, in a signal's `urls`
PREFIX = "ray_nld_replica_"  # the names the replicas' series carry on Ray's metrics page


@dataclass
class _Report:
    seq: str
    seen_at: float
    load: list[str] = field(default_factory=list)  # running, waiting, by mode, KV usage
    idle_load: list[str] = field(default_factory=list)  # the same, running and waiting at zero
    costs: list[str] = field(default_factory=list)  # the cost model (the same whether idle or not)


def _label(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class _Lines:
    """Prometheus sample lines of one replica's series (`labels` on each)."""

    def __init__(self, labels: str) -> None:
        self.labels, self.out = labels, []

    def add(self, name: str, value, **extra) -> None:
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
        tags = self.labels + "".join(f',{k}="{_label(v)}"' for k, v in extra.items())
        self.out.append(f"{PREFIX}{name}{{{tags}}} {float(value)!r}")


def render_load(labels: str, body: dict, idle: bool = False) -> list[str]:
    """The load lines of one report body (`replicas.report.report_body`'s dict); `idle`: its
    running and waiting counts at zero."""
    lines = _Lines(labels)
    zero = (lambda v: 0) if idle else (lambda v: v)
    lines.add("num_requests_running", zero(body.get("running")))
    lines.add("waiting_requests", zero(body.get("waiting")))
    lines.add("kv_cache_usage_ratio", body.get("kv_usage"))
    for mode, n in sorted((body.get("running_by_mode") or {}).items()):
        lines.add("running_requests", zero(n), mode=mode)
    return lines.out


def render_costs(labels: str, body: dict) -> list[str]:
    """The cost-model lines of one report body; none before the model has a fit (as Ray's page)."""
    lines = _Lines(labels)
    add = lines.add
    costs = body.get("cost_model") or {}
    if costs.get("coef"):
        for term, value in costs["coef"].items():
            add("step_cost_seconds", value, term=term)
        add("cost_model_steps", costs.get("steps"))
        for rows, tokens, logits, seconds, count in costs.get("buckets", []):
            add("step_shape_seconds", seconds, rows=rows, tokens=tokens, logits=logits)
            add("step_shape_count", count, rows=rows, tokens=tokens, logits=logits)
        for mode, running, rate, windows in costs.get("realized", []):
            add("realized_tokens_per_second", rate, mode=mode, running=running)
            add("realized_windows", windows, mode=mode, running=running)
        for block, y in sorted((costs.get("self_spec") or {}).items()):
            add("self_spec_tokens_per_cycle", y["tokens_per_cycle"], block=block)
            add("self_spec_cycles", y["cycles"], block=block)
        for block, y in sorted((costs.get("diffusion") or {}).items()):
            add("diffusion_tokens_per_pass", y["tokens_per_pass"], block=block)
            add("diffusion_blocks", y["blocks"], block=block)
    return lines.out


class ReplicaReports:
    """The last report of each replica this gateway heard from, and their page."""

    def __init__(self, keep_s: float = 120.0, idle_after_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if keep_s <= 0 or idle_after_s <= 0:
            raise ValueError(f"keep_s and idle_after_s must be > 0, got {keep_s}, {idle_after_s}")
        self.keep_s, self.idle_after_s, self.clock = keep_s, idle_after_s, clock
        self._reports: dict[str, _Report] = {}
        self._page: str | None = None
        self._page_ids: tuple[tuple[str, bool], ...] = ()
        self.offers = self.parsed = self.rejected = 0

    def offer(self, value: str | None) -> None:
        """Take one answer's header value (None: the answer had none, e.g. an older replica)."""
        if not value:
            return
        self.offers += 1
        now = self.clock()
        rid, sep, rest = value.partition(";")
        seq, sep2, payload = rest.partition(";")
        if not (sep and sep2 and rid):
            self._reject(value, "expected '<replica>;<seq>;<json>'")
            return
        known = self._reports.get(rid)
        if known is not None and known.seq == seq:
            known.seen_at = now
            return
        try:
            body = json.loads(payload)
            if not isinstance(body, dict):
                raise ValueError("not a JSON object")
            labels = f'replica="{_label(rid)}",model="{_label(body.get("model", ""))}"' + "".join(
                f',{k}="{_label(body[k])}"' for k in ("application", "deployment") if body.get(k))
            report = _Report(seq, now, render_load(labels, body), render_load(labels, body, idle=True),
                             render_costs(labels, body))
        except (ValueError, TypeError, KeyError) as e:
            self._reject(value, f"{type(e).__name__}: {e}")
            return
        self.parsed += 1
        self._reports[rid] = report
        self._page = None

    def _reject(self, value: str, why: str) -> None:
        self.rejected += 1
        if self.rejected == 1 or self.rejected % 1000 == 0:
            log.warning("ignoring a malformed replica report (%d so far): %s: %.80s", self.rejected, why, value)

    def snapshot(self) -> dict:
        """For `/v1/nld/policy`: the replicas heard from and the headers taken, parsed, rejected."""
        return {"replicas": self.replicas(), "offers": self.offers, "parsed": self.parsed, "rejected": self.rejected}

    def replicas(self, now: float | None = None) -> list[str]:
        """Ids of the replicas heard from within `keep_s` (older reports are dropped)."""
        now = self.clock() if now is None else now
        for rid in [r for r, rep in self._reports.items() if now - rep.seen_at > self.keep_s]:
            del self._reports[rid]
            self._page = None
        return sorted(self._reports)

    def page(self, now: float | None = None) -> str:
        """Prometheus text of the kept reports (empty when no replica was heard from)."""
        now = self.clock() if now is None else now
        ids = tuple((rid, now - self._reports[rid].seen_at > self.idle_after_s) for rid in self.replicas(now))
        if self._page is None or ids != self._page_ids:
            self._page_ids = ids
            lines = []
            for rid, idle in ids:
                report = self._reports[rid]
                lines += (report.idle_load if idle else report.load) + report.costs
            self._page = "".join(line + "\n" for line in lines)
        return self._page
