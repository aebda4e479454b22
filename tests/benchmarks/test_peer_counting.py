"""The peer benchmarks' client and tables count every failed request (settle and tail included),
and the rotating benchmark's per-round ratios pair windows of the same round."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from benchmarks.loadgen import summarise
from benchmarks.peer_rotate import (inter_token_totals, itl_over_step, paired_ratios, process_tree, signal_tree, thawed,
                                     switch_counts, window_order)
from benchmarks.peer_vllm import median_rows


def record(start, end, tokens=8, status=200, error=None, prompt=0):
    return {"start": start, "end": end, "first": start + 0.01, "gaps": [], "tokens": tokens, "status": status,
            "error": error, "prompt": prompt}


def test_summarise_counts_failures_outside_the_window_too():
    t0 = 100.0
    records = [record(100.5, 100.9, status=503, error="http", tokens=0),  # in the settle
               record(101.0, 101.5), record(101.5, 102.5, status=429, error="http", tokens=0),  # in the window
               record(103.1, 103.4, status=None, error="ReadTimeout", tokens=0)]  # in the tail
    s = summarise(records, t0, (1.0, 3.0))
    assert s["errors"] == {"429": 1}  # ended inside the window
    assert s["errors_total"] == {"503": 1, "429": 1, "transport": 1}  # none dropped
    assert s["sent"] == 4 and s["requests"] == 1


def test_summarise_counts_the_modes_measured_requests_ran_in():
    t0 = 100.0
    records = [dict(record(100.2, 100.9), mode="self_spec"),  # ended in the settle: not counted
               dict(record(101.0, 101.5), mode="self_spec"), dict(record(101.5, 102.0), mode="ar"),
               dict(record(102.0, 102.5), mode="ar"), record(102.5, 102.9)]  # a server without the header
    assert summarise(records, t0, (1.0, 3.0))["modes"] == {"self_spec": 1, "ar": 2}


def test_median_rows_sums_every_failure_over_rounds():
    def row(rnd, tps, errors, total):
        return {"system": "ar", "concurrency": 4, "stream": False, "round": rnd, "tokens_per_s": tps,
                "errors": errors, "errors_total": total, "requests": 10}

    m = median_rows([row(0, 100.0, {}, {"503": 2}), row(1, 300.0, {"429": 1}, {"429": 1, "503": 1}),
                     row(2, 200.0, {}, {})])[0]
    assert m["tokens_per_s"] == 200.0 and (m["tokens_per_s_min"], m["tokens_per_s_max"]) == (100.0, 300.0)
    assert m["errors_total"] == {"503": 3, "429": 1} and m["errors"] == {"429": 1} and m["requests"] == 30


def test_paired_ratios_divide_within_a_round():
    rows = [{"system": s, "concurrency": 8, "stream": False, "round": k, "tokens_per_s": v}
            for k, (ar, vllm) in enumerate([(100, 200), (400, 200), (150, 100)])
            for s, v in (("ar", ar), ("vllm", vllm))]
    r = paired_ratios(rows, [8])[8]["ar/vllm"]
    # per round 0.5, 2.0, 1.5: the median of the rounds' own ratios, not 150 / 200 of the medians
    assert (r["median"], r["min"], r["max"], r["rounds"]) == (1.5, 0.5, 2.0, 3)


def test_signal_tree_freezes_a_process_and_its_children():
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                               "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"])
    try:
        deadline = time.monotonic() + 10
        while len(process_tree(parent.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        tree = process_tree(parent.pid)
        assert len(tree) == 2 and tree[0] == parent.pid
        signal_tree(parent.pid, signal.SIGSTOP)

        def states():
            return [open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[0] for p in tree]

        deadline = time.monotonic() + 5
        while states() != ["T", "T"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert states() == ["T", "T"]
        with thawed(parent.pid):  # runs inside the block, frozen again after it
            deadline = time.monotonic() + 5
            while "T" in states() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert "T" not in states()
        deadline = time.monotonic() + 5
        while states() != ["T", "T"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert states() == ["T", "T"]
    finally:
        for p in reversed(process_tree(parent.pid)):
            os.kill(p, signal.SIGKILL)
        parent.wait()


def test_every_system_gets_the_same_settle_as_adaptive():
    """The VM slows under sustained load, so a longer settle for one system measures it later into
    that slowdown: every system of a run waits as long as the adaptive one must."""
    import argparse

    from benchmarks.peer_vllm import window_settle

    args = argparse.Namespace(settle_seconds=2.0, adaptive_settle_seconds=8.0)
    assert window_settle(args, ["vllm", "ar", "adaptive", "bare"]) == 8.0
    assert window_settle(args, ["vllm", "ar", "bare"]) == 2.0  # no adaptive: the plain settle
    assert window_settle(argparse.Namespace(settle_seconds=10.0, adaptive_settle_seconds=8.0), ["adaptive"]) == 10.0


def test_the_bare_engine_warms_up_for_the_settle_it_is_given(tmp_path):
    """`bare_engine(warm_s=...)`: unmeasured load first, then a window of steps; on a tiny checkpoint."""
    from benchmarks.peer_vllm import bare_engine
    from replicas.engine.testing import write_random_checkpoint

    model = write_random_checkpoint(tmp_path / "m")
    t0 = time.monotonic()
    r = bare_engine(str(model), [[1, 2, 3, 4]], 2, 0.3, 4, None, warm_s=0.5)
    assert time.monotonic() - t0 >= 0.8 and r["tokens_per_s"] > 0 and r["busy_share"] > 0


def test_the_engine_side_inter_token_time_sums_every_replica_and_mode():
    """The histogram's sum and count over its label sets; its buckets and other metrics ignored."""
    page = """# HELP ray_nld_replica_inter_token_latency_seconds seconds per token between chunks
# TYPE ray_nld_replica_inter_token_latency_seconds histogram
ray_nld_replica_inter_token_latency_seconds_bucket{le="0.01",mode="ar",replica="a"} 3.0
ray_nld_replica_inter_token_latency_seconds_sum{mode="ar",replica="a"} 0.5
ray_nld_replica_inter_token_latency_seconds_count{mode="ar",replica="a"} 40.0
ray_nld_replica_inter_token_latency_seconds_sum{mode="self_spec",replica="b"} 0.25
ray_nld_replica_inter_token_latency_seconds_count{mode="self_spec",replica="b"} 10.0
ray_nld_replica_time_to_first_token_seconds_sum{mode="ar",replica="a"} 9.0
ray_nld_replica_time_to_first_token_seconds_count{mode="ar",replica="a"} 9.0
"""
    assert inter_token_totals(page) == (0.75, 50.0)
    assert inter_token_totals("") == (0.0, 0.0)


def test_each_system_follows_each_other_about_equally_often():
    """Over four rounds at any level, a system runs right after another one as often as right
    before it, give or take one (a plain rotation kept `adaptive` right after `ar` in every round
    at one level)."""
    from collections import Counter

    systems = ["vllm", "ar", "adaptive", "bare"]
    for level in range(4):
        follows: Counter = Counter()
        for rnd in range(4):
            order = window_order(systems, rnd, level)
            assert sorted(order) == sorted(systems)
            follows.update(zip(order, order[1:]))
        assert all(abs(follows[a, b] - follows[b, a]) <= 1 for a in systems for b in systems)
        assert follows["ar", "adaptive"] >= 1 and follows["adaptive", "ar"] >= 1


def test_the_policy_switches_are_counted_by_kind():
    page = """# TYPE nld_policy_switches_total counter
nld_policy_switches_total{from="ar",reason="falling",to="self_spec"} 1.0
nld_policy_switches_total{from="self_spec",reason="explore",to="ar"} 2.0
nld_policy_switches_created{from="ar",reason="falling",to="self_spec"} 1.7e+09
"""
    assert switch_counts(page) == {"ar->self_spec (falling)": 1.0, "self_spec->ar (explore)": 2.0}


def test_split_load_spreads_the_clients_as_evenly_as_the_engines_allow():
    from benchmarks.bare_servers import split_load

    assert split_load(8, 2) == [4, 4]
    assert split_load(1, 2) == [1, 0]
    assert split_load(7, 4) == [2, 2, 2, 1]
    assert sum(split_load(33, 3)) == 33


def test_bare_split_runs_one_bound_one_thread_engine_per_cpu_at_once(tmp_path):
    """`BareSplit` on a tiny checkpoint: one child per CPU (at most 4), each bound to its own CPU
    with one torch thread, measured together; the row sums their tokens/s."""
    import argparse
    import json

    from benchmarks.bare_servers import BareSplit
    from replicas.engine.testing import write_random_checkpoint

    cpus = sorted(os.sched_getaffinity(0))[:4]
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([[1, 2, 3, 4], [5, 6, 7]]))
    args = argparse.Namespace(seconds=0.5, max_tokens=4, prompts_file=prompts, settle_seconds=0.2, torch_threads=None)
    split = BareSplit(str(write_random_checkpoint(tmp_path / "m")), args)
    try:
        assert len(split.engines) == len(cpus)
        for engine, cpu in zip(split.engines, cpus):
            cmd = engine.proc.args
            assert cmd[:3] == ["taskset", "-c", str(cpu)] and cmd[cmd.index("--torch-threads") + 1] == "1"
        r = split.measure(2 * len(cpus))
        assert len(r["engines"]) == len(cpus) and all(e["tokens_per_s"] > 0 for e in r["engines"])
        assert r["tokens_per_s"] == sum(e["tokens_per_s"] for e in r["engines"])
        assert len(split.measure(1)["engines"]) == 1  # an engine without clients sits this window out
    finally:
        split.stop()
    assert all(e.proc.returncode == 0 for e in split.engines)


def test_itl_over_step_divides_each_rounds_itl_by_that_rounds_bare_step():
    rows = []
    for k, (itl, bare, bare_1t) in enumerate([(0.010, 0.005, 0.010), (0.012, 0.006, 0.008), (0.009, 0.006, 0.009)]):
        rows += [{"system": "ar", "concurrency": 32, "stream": True, "round": k, "itl_p50_s": itl},
                 {"system": "bare", "concurrency": 32, "stream": False, "round": k, "step_p50_s": bare},
                 {"system": "bare_1t", "concurrency": 32, "stream": False, "round": k, "step_p50_s": bare_1t},
                 {"system": "ar", "concurrency": 32, "stream": False, "round": k, "itl_p50_s": None}]
    r = itl_over_step(rows, [32])[32]
    # per round 2.0, 2.0, 1.5 against `bare`; 1.0, 1.5, 1.0 against `bare_1t`
    assert (r["ar/bare"]["median"], r["ar/bare"]["min"], r["ar/bare"]["max"]) == pytest.approx((2.0, 1.5, 2.0))
    assert (r["ar/bare_1t"]["median"], r["ar/bare_1t"]["max"]) == pytest.approx((1.0, 1.5))
    assert r["ar/bare_1t"]["rounds"] == 3
    assert "vllm/bare" not in r  # vLLM not measured: no ratio made up


def test_the_bare_systems_are_started_by_name_with_their_threads(monkeypatch):
    import benchmarks.peer_rotate as pr

    made = []
    monkeypatch.setattr(pr, "BareServer", lambda model, args, threads=None: made.append(("server", threads)) or "s")
    monkeypatch.setattr(pr, "BareSplit", lambda model, args: made.append(("split", None)) or "p")
    bares = pr.bare_systems("m", object(), ["vllm", "bare_1t", "ar", "bare_split"])
    assert bares == {"bare_1t": "s", "bare_split": "p"} and made == [("server", 1), ("split", None)]


def test_an_unknown_system_is_refused_before_anything_starts(capsys):
    from benchmarks.peer_rotate import main

    with pytest.raises(SystemExit):
        main(["--systems", "vllm,bare_2t"])
    assert "unknown systems ['bare_2t']" in capsys.readouterr().err
