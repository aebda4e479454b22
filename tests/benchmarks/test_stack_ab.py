"""`stack_ab.py`'s arithmetic: variants parsed from the command line, ratios taken per round
against the first variant, and every failed request counted."""

from __future__ import annotations

import argparse

import pytest

from benchmarks.stack_ab import ab_ratios, error_totals, parse_variant, print_summary


def test_parse_variant():
    assert parse_variant("base=") == ("base", [])
    assert parse_variant("one='--parallel-min-tokens 16' ") == ("one", ["--parallel-min-tokens 16"])
    assert parse_variant("t16=--parallel-min-tokens 16") == ("t16", ["--parallel-min-tokens", "16"])
    for bad in ("base", "=--flag"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_variant(bad)


def row(variant: str, rnd: int, tps: float, c: int = 8, system: str = "ar", errors: dict | None = None) -> dict:
    return {"variant": variant, "system": system, "concurrency": c, "round": rnd, "tokens_per_s": tps,
            "errors_total": errors or {}}


def test_ratios_pair_each_round_with_the_first_variant_of_that_round(capsys):
    rows = [row("base", 0, 100.0), row("new", 0, 120.0),
            row("base", 1, 200.0), row("new", 1, 180.0),
            row("base", 2, 50.0), row("new", 2, 60.0, errors={"503": 2}),
            row("base", 0, 10.0, c=16)]  # c=16: no window of `new`, so no ratio
    ratios = ab_ratios(rows, ["base", "new"], ["ar"], [8, 16])
    assert ratios == {"ar/8/new": {"median": pytest.approx(1.2), "min": pytest.approx(0.9),
                                   "max": pytest.approx(1.2), "rounds": 3}}
    assert error_totals(rows) == {"base": 0, "new": 2}
    print_summary(rows, ratios, ["base", "new"], ["ar"], [8, 16])
    out = capsys.readouterr().out
    assert "1.20 (0.90-1.20)" in out and "new 2" in out
