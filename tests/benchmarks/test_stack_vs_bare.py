"""`stack_vs_bare.py`'s arithmetic: the engine's view of a window from two `/stats` snapshots, the
snapshots taken inside the client's measured window, the per-round factors and the error count."""

from __future__ import annotations

import argparse

import pytest

from benchmarks.loadgen import summarise as summarise_client
from benchmarks.stack_vs_bare import StatsPoller, engine_window, factors, parse_cases, summarise


def snap(steps: int, step_sum: float, tokens: int) -> dict:
    return {"step_seconds": {"count": steps, "sum": step_sum}, "generated_tokens": tokens}


def test_parse_cases():
    assert parse_cases("json:16,sse:8") == [("json", 16), ("sse", 8)]
    for bad in ("json", "grpc:4", "sse:0", "json:x"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_cases(bad)


def test_engine_window_splits_tokens_per_second_into_its_factors():
    w = engine_window(snap(100, 1.0, 5000), snap(300, 2.8, 11000), wall=2.0)
    assert w["steps"] == 200 and w["step_mean_s"] == pytest.approx(0.009)
    assert w["tokens_per_step"] == pytest.approx(30.0) and w["busy_share"] == pytest.approx(0.9)
    # tokens/s = busy share / mean step x tokens per step, exactly, on the engine's own counters
    assert w["engine_tokens_per_s"] == pytest.approx(w["busy_share"] / w["step_mean_s"] * w["tokens_per_step"])


def test_the_poller_takes_the_snapshots_inside_the_client_window():
    p = StatsPoller("http://unused")
    p.snapshots = [(9.8, snap(0, 0.0, 0)), (10.3, snap(10, 0.1, 100)), (12.3, snap(210, 1.9, 4100)),
                   (14.6, snap(400, 3.9, 8000))]
    w = p.window(10.0, 14.0)  # the settle (9.8) and the tail (14.6) are left out
    assert w["steps"] == 200 and w["engine_window_s"] == pytest.approx(2.0)
    assert w["tokens_per_step"] == pytest.approx(20.0) and w["busy_share"] == pytest.approx(0.9)
    with pytest.raises(RuntimeError):
        p.window(10.0, 11.0)  # one snapshot inside: no window


def row(kind: str, rnd: int, stack_tps: float, bare_tps: float, errors_total: dict | None = None) -> dict:
    stack = {"tokens_per_s": stack_tps, "busy_share": 0.9, "step_mean_s": 0.012, "tokens_per_step": 30.0,
             "itl_p50_s": 0.0126 if kind == "sse" else None, "errors_total": errors_total or {}}
    bare = {"tokens_per_s": bare_tps, "busy_share": 1.0, "step_mean_s": 0.010, "step_p50_s": 0.0105,
            "tokens_per_step": 32.0}
    return {"round": rnd, "kind": kind, "concurrency": 32, "stack": stack, "bare": bare}


def test_factors_pair_the_neighbouring_windows_of_a_round():
    f = factors(row("sse", 0, 2000.0, 2500.0))
    assert f["tokens_per_s"] == pytest.approx(0.8) and f["busy_share"] == pytest.approx(0.9)
    assert f["step"] == pytest.approx(1.2) and f["tokens_per_step"] == pytest.approx(30 / 32)
    assert f["itl_over_bare_step"] == pytest.approx(1.2) and f["itl_over_stack_step"] == pytest.approx(1.05)
    assert "itl_over_bare_step" not in factors(row("json", 0, 2000.0, 2500.0))


def test_summarise_takes_medians_of_round_ratios_and_counts_every_error(capsys):
    rows = [row("json", 0, 100.0, 200.0), row("json", 1, 300.0, 200.0, {"503": 2}),
            row("json", 2, 150.0, 100.0, {"transport": 1})]
    (entry,) = summarise(rows, [("json", 32), ("sse", 8)])  # no sse:8 rows: no entry
    assert entry["tokens_per_s"] == {"median": 1.5, "min": 0.5, "max": 1.5}
    assert entry["errors"] == 3 and entry["rounds"] == 3
    assert "errors (failed or non-200 requests, every window): 3" in capsys.readouterr().out


def test_the_client_reports_its_measured_window_on_the_monotonic_clock():
    records = [{"start": 101.0, "end": 101.5, "first": 101.01, "gaps": [], "tokens": 8, "status": 200,
                "error": None, "prompt": 0}]
    assert summarise_client(records, 100.0, (1.0, 3.0))["window_monotonic_s"] == [101.0, 103.0]
