"""The replicas' reports on their answers (`replicas.report` -> `policies.reports`), read by the
unchanged `scrape` and `goodput` sources through the `reports:` page."""

from __future__ import annotations

import json

import httpx
import pytest

from policies.cost_view import GoodputSource
from policies.reports import REPORTS_URL, ReplicaReports
from policies.schema import GoodputSignal, ScrapeSignal
from policies.signals import PageFetcher, ScrapeSource
from replicas.engine.cost_model import CostModel
from replicas.report import MAX_REPORT_BYTES, Reporter, compact_costs, report_body

pytestmark = pytest.mark.anyio

CPU = {"intercept_s": 0.002, "per_row_s": 0.0001, "per_token_s": 0.00003, "per_logit_s": 0.00001}


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def measured_model(scale: float = 1.0) -> CostModel:
    """A real cost model fed a few hundred steps, cycles and realized windows."""
    m = CostModel()
    for i in range(300):
        rows = 1 + i % 32
        m.steps.observe(rows, rows, rows, scale * (CPU["intercept_s"] + rows * 0.00014))
    for _ in range(30):
        m.yields.observe_cycle(32, 3)
    for _ in range(5):
        m.yields.observe_block(16, 12)
    for _ in range(3):
        m.realized.observe("ar", 32, 3000, 1.0)
    return m


def stats(running: int, model: CostModel, waiting: int = 0) -> dict:
    return {"running": running, "waiting": waiting, "running_by_mode": {"prefill": 0, "ar": running},
            "kv_tokens_used": 10, "kv_tokens_total": 100, "cost_model": model.snapshot()}


def ray_page(replicas: dict[str, dict]) -> str:
    """The same series as Ray's metrics page carries them (`replicas.metrics.ReplicaMetrics`)."""
    lines = []
    for rid, st in replicas.items():
        tags = f'application="nld",deployment="NLDReplica",replica="{rid}",model="m"'
        lines.append(f"ray_nld_replica_num_requests_running{{{tags}}} {st['running']}")
        cm = st["cost_model"]
        for term, value in cm["coef"].items():
            lines.append(f'ray_nld_replica_step_cost_seconds{{{tags},term="{term}"}} {value}')
        lines.append(f"ray_nld_replica_cost_model_steps{{{tags}}} {cm['steps']}")
        for rows, tokens, logits, seconds, count in cm["buckets"]:
            shape = f'{tags},rows="{rows}",tokens="{tokens}",logits="{logits}"'
            lines.append(f"ray_nld_replica_step_shape_seconds{{{shape}}} {seconds}")
            lines.append(f"ray_nld_replica_step_shape_count{{{shape}}} {count}")
        for mode, running, rate, windows in cm["realized"]:
            cell = f'{tags},mode="{mode}",running="{running}"'
            lines.append(f"ray_nld_replica_realized_tokens_per_second{{{cell}}} {rate}")
            lines.append(f"ray_nld_replica_realized_windows{{{cell}}} {windows}")
        for kind, mean_key, count_key, mean_name, count_name in (
                ("self_spec", "tokens_per_cycle", "cycles", "self_spec_tokens_per_cycle", "self_spec_cycles"),
                ("diffusion", "tokens_per_pass", "blocks", "diffusion_tokens_per_pass", "diffusion_blocks")):
            for block, y in cm[kind].items():
                lines.append(f'ray_nld_replica_{mean_name}{{{tags},block="{block}"}} {y[mean_key]}')
                lines.append(f'ray_nld_replica_{count_name}{{{tags},block="{block}"}} {y[count_key]}')
    return "\n".join(lines) + "\n"


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def reports_of(replicas: dict[str, dict], clock=None) -> ReplicaReports:
    reports = ReplicaReports(clock=clock or Clock())
    for rid, st in replicas.items():
        reports.offer(Reporter(rid, "m", lambda st=st: st, application="nld").header())
    return reports


def goodput_spec(url: str) -> GoodputSignal:
    return GoodputSignal(name="costs", source="goodput", urls=[url])


async def test_the_reports_page_reads_as_the_same_cost_view_and_load_as_rays_page():
    fleet = {"r0": stats(30, measured_model()), "r1": stats(2, measured_model(scale=2.0))}
    page = ray_page(fleet)
    http = httpx.AsyncClient(transport=httpx.MockTransport(lambda req: httpx.Response(200, text=page)))
    from_ray = GoodputSource(goodput_spec("http://ray/metrics"), PageFetcher(http))
    from_reports = GoodputSource(goodput_spec(REPORTS_URL), PageFetcher(http, reports_of(fleet)))
    assert await from_ray.read() == await from_reports.read() == 600
    a, b = from_ray.view, from_reports.view
    assert b.replicas == 2 and flat(b.as_dict()) == pytest.approx(flat(a.as_dict()), rel=1e-5)  # 6 digits
    assert len(b.shapes) == len(a.shapes) > 10
    assert [x for s in sorted(b.shapes) for x in s] == pytest.approx([x for s in sorted(a.shapes) for x in s], rel=1e-5)
    for aggregate, want in (("mean", 16.0), ("count", 2.0), ("max", 30.0)):
        spec = ScrapeSignal(name="s", source="scrape", urls=[REPORTS_URL], labels={"application": "nld"},
                            metric="ray_nld_replica_num_requests_running", aggregate=aggregate)
        assert await ScrapeSource(spec, PageFetcher(http, reports_of(fleet))).read() == want
    await http.aclose()


async def test_a_policy_without_reports_gets_a_clear_error_for_the_reports_url():
    async with httpx.AsyncClient() as http:
        with pytest.raises(RuntimeError, match="reports:"):
            await PageFetcher(http).text(REPORTS_URL, 1.0)


def test_a_known_snapshot_costs_no_parse_and_a_new_one_replaces_the_old():
    clock = Clock()
    reports = ReplicaReports(clock=clock)
    snap = stats(3, measured_model())
    reporter = Reporter("r0", "m", lambda: snap, min_interval_s=0.0)
    header = reporter.header()
    for _ in range(5):
        reports.offer(header)
    assert (reports.offers, reports.parsed) == (5, 1)
    assert 'num_requests_running{replica="r0",model="m"} 3.0' in reports.page()
    snap = stats(7, measured_model())  # the engine pushed a new snapshot
    reports.offer(reporter.header())
    assert reports.parsed == 2 and "3.0\n" not in reports.page().split("num_requests_running")[1].split("\n")[0]
    assert 'num_requests_running{replica="r0",model="m"} 7.0' in reports.page()


def test_a_silent_replica_reads_idle_then_is_forgotten():
    clock = Clock()
    reports = ReplicaReports(keep_s=60.0, idle_after_s=5.0, clock=clock)
    reports.offer(Reporter("r0", "m", lambda: stats(12, measured_model(), waiting=4)).header())
    assert 'num_requests_running{replica="r0",model="m"} 12.0' in reports.page()
    clock.t = 6.0  # no answer for longer than idle_after_s: no load, the cost model kept
    page = reports.page()
    assert 'num_requests_running{replica="r0",model="m"} 0.0' in page
    assert 'waiting_requests{replica="r0",model="m"} 0.0' in page
    assert 'running_requests{replica="r0",model="m",mode="ar"} 0.0' in page
    assert "ray_nld_replica_cost_model_steps" in page
    assert reports.replicas() == ["r0"]
    clock.t = 61.0
    assert reports.replicas() == [] and reports.page() == ""


@pytest.mark.parametrize("value", ["garbage", "r0;1;", "r0;1;[1, 2]", "r0;1;{bad json", ";1;{}",
                                   'r0;1;{"running": "many"}',
                                   'r0;1;{"cost_model": {"coef": {"a": 1}, "buckets": [[1]]}}'])
def test_a_malformed_report_is_counted_and_ignored(value):
    reports = ReplicaReports()
    reports.offer(Reporter("ok", "m", lambda: stats(1, CostModel())).header())
    before = reports.page()
    reports.offer(value)
    assert reports.rejected == 1 and reports.page() == before and reports.replicas() == ["ok"]
    reports.offer(None)  # an answer without the header (an older replica): nothing happens
    assert reports.offers == 2


def test_the_reporter_renders_once_per_snapshot_and_at_most_every_min_interval():
    clock = Clock()
    reads = []
    snap = stats(1, CostModel())

    def read():
        reads.append(clock.t)
        return snap

    reporter = Reporter("a;b", "m", read, min_interval_s=0.25, clock=clock)
    first = reporter.header()
    rid, seq, body = first.split(";", 2)
    assert rid == "a_b" and seq == "1" and json.loads(body) == report_body("m", snap)
    clock.t = 0.1
    assert reporter.header() is first and reads == [0.0]  # within min_interval: no read
    clock.t = 0.3
    assert reporter.header() is first and reads == [0.0, 0.3]  # same snapshot object: no render
    snap = stats(2, CostModel())
    clock.t = 0.6
    assert reporter.header().startswith("a_b;2;") and reporter.seq == 2
    assert Reporter(None, "m", read).replica_id.startswith("local-")


def test_a_report_keeps_decode_step_buckets_rounded_and_under_its_size_cap():
    m = measured_model()
    m.steps.observe(4, 512, 4, 0.05)  # a step with a prefill chunk: the policy never reads it
    costs = compact_costs(m.snapshot())
    assert all(lg == t or t == r for r, t, lg, _, _ in costs["buckets"])
    assert len(costs["buckets"]) == len(m.snapshot()["buckets"]) - 1
    assert all(len(repr(b[3])) <= 12 for b in costs["buckets"])  # 6 significant digits
    huge = CostModel()
    for rows in range(1, 65):  # a long-running replica's table: thousands of decode shapes
        for tokens in range(rows, 40 * rows, max(1, rows // 2)):
            huge.steps.observe(rows, tokens, tokens, 0.001 * tokens)
    snap = huge.snapshot()
    assert len(json.dumps(snap["buckets"])) > MAX_REPORT_BYTES
    header = Reporter("r0", "m", lambda: {"running": 1, "cost_model": snap}).header()
    assert len(header) <= MAX_REPORT_BYTES
    kept = json.loads(header.split(";", 2)[2])["cost_model"]["buckets"]
    dropped = [b for b in snap["buckets"] if b[:3] not in [k[:3] for k in kept]]
    assert kept == sorted(kept) and kept and dropped
    assert min(b[4] for b in kept) >= max(b[4] for b in dropped)  # the most-measured kept
