"""The adaptive benchmark's statistics: the prompt-balanced p50 and the merge over rounds."""

from __future__ import annotations

import pytest

from benchmarks.adaptive import balanced_p50, merge_rounds, write_policy_files


def test_balanced_p50_does_not_jump_with_one_request_more_of_a_prompt():
    fast, slow = [0.20] * 4, [0.30] * 4  # two prompts, two latency clusters
    assert balanced_p50({0: fast, 1: slow}) == pytest.approx(0.25)
    assert balanced_p50({0: fast + [0.20], 1: slow}) == pytest.approx(0.25)  # the plain p50 would be 0.20
    assert balanced_p50({0: [0.1, 0.2, 0.9]}) == 0.2 and balanced_p50({}) is None


def row(policy, rnd, tok_s, by_prompt):
    lat = [v for vs in by_prompt.values() for v in vs]
    return {"policy": policy, "concurrency": 1, "round": rnd, "tokens_per_s": tok_s,
            "latency_p50_s": sorted(lat)[len(lat) // 2], "latency_by_prompt": by_prompt,
            "requests": len(lat), "modes": {"self_spec": len(lat)}}


def test_merge_takes_medians_over_rounds_and_pools_latencies_per_prompt():
    rows = [row("a", 0, 100.0, {0: [0.2], 1: [0.4]}), row("a", 1, 300.0, {0: [0.2, 0.2], "1": [0.6]}),
            row("a", 2, 200.0, {1: [0.5]})]
    (m,) = merge_rounds(rows, ["a"], [1])
    assert m["tokens_per_s"] == 200.0 and m["rounds"] == 3 and m["requests"] == 6
    assert m["latency_p50_balanced_s"] == pytest.approx((0.2 + 0.5) / 2)  # prompt 0: 0.2, prompt 1: 0.5
    assert m["modes"] == {"self_spec": 6}


def test_policy_variants_are_written_with_the_metrics_port(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("url: http://127.0.0.1:{metrics_port}/metrics\n")
    other = tmp_path / "other.yaml"
    other.write_text("local only\n")
    labels, files, texts = write_policy_files(f"ar,adaptive,local={other}", base, 4321, tmp_path)
    assert labels == ["ar", "adaptive", "local"] and set(files) == {"adaptive", "local"}
    assert files["adaptive"].read_text() == "url: http://127.0.0.1:4321/metrics\n" == texts["adaptive"]
    assert texts["local"] == "local only\n"


def test_c1_latency_ratio_leaves_out_a_fixed_mode_with_no_request_in_its_window():
    from benchmarks.adaptive import c1_latency_ratio

    row = lambda v: {"latency_p50_s": v}  # noqa: E731
    by = {("ar", 1): row(0.5), ("self_spec", 1): row(None), ("adaptive", 1): row(0.45)}
    assert c1_latency_ratio(by, "latency_p50_s") == 0.45 / 0.5
    by["self_spec", 1] = row(0.4)
    assert c1_latency_ratio(by, "latency_p50_s") == 0.45 / 0.4
    by["adaptive", 1] = row(None)
    assert c1_latency_ratio(by, "latency_p50_s") is None


def test_paired_ratios_compare_rounds_with_themselves():
    from benchmarks.adaptive import paired_over_best_fixed

    rows = [{"policy": p, "round": k, "concurrency": 4, "tokens_per_s": v}
            for k, (ar, ss, ad) in enumerate([(100, 50, 95), (200, 60, 198), (150, 160, 160)])
            for p, v in (("ar", ar), ("self_spec", ss), ("adaptive", ad))]
    rows.append({"policy": "adaptive", "round": 3, "concurrency": 4, "tokens_per_s": 1})  # no fixed runs in round 3
    out = paired_over_best_fixed(rows, [4])[4]
    assert out["paired_per_round"] == [0.95, 0.99, 1.0]
    assert out["paired_median"] == 0.99
