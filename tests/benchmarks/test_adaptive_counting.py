"""The adaptive benchmark accounts for every request (200s with their usage, every other status
and every transport failure counted by kind, none dropped), and tunes its thresholds on other
prompts than it measures."""

from __future__ import annotations

import asyncio
import itertools
import json

import httpx
import pytest

from benchmarks.adaptive import (closed_loop, merge_rounds, prompt_split_record, split_prompts, tune_thresholds,
                                 tuned_policy_text)
from policies import parse_policy

OK_BODY = {"usage": {"completion_tokens": 5}}


def scripted_transport(script):
    """A mock gateway answering requests in turn from `script` (cycled): a status (200 with a
    completion body, anything else with an error body), "bad" (200, not a completion) or an
    exception class to raise. Counts what it answered."""
    answered: dict[str, int] = {}
    steps = itertools.cycle(script)

    def handler(request: httpx.Request) -> httpx.Response:
        step = next(steps)
        key = step if isinstance(step, (int, str)) else step.__name__
        answered[str(key)] = answered.get(str(key), 0) + 1
        if isinstance(step, type):
            raise step("scripted failure", request=request)
        if step == "bad":
            return httpx.Response(200, json={"object": "text_completion"})
        if step == 200:
            return httpx.Response(200, json=OK_BODY, headers={"x-nld-decoding-mode": "ar"})
        return httpx.Response(step, json={"error": {"message": "x", "type": "t", "param": None, "code": "c"}})

    return httpx.MockTransport(handler), answered


def test_every_request_is_counted_and_none_dropped():
    script = [200, 429, 200, 500, httpx.ConnectError, 503, "bad", httpx.ReadTimeout, 200, 400]
    transport, answered = scripted_transport(script)
    r = asyncio.run(closed_loop("http://gw", 3, 0.4, [{"prompt": "a"}, {"prompt": "b"}], transport=transport))
    assert r["sent"] == sum(answered.values()) > len(script)  # several passes over the script
    failed = sum(r["errors_total"].values())
    assert r["ok_total"] + failed == r["sent"]
    assert r["ok_total"] == answered["200"]
    assert r["errors_total"] == {"400": answered["400"], "429": answered["429"], "500": answered["500"],
                                 "503": answered["503"], "ConnectError": answered["ConnectError"],
                                 "ReadTimeout": answered["ReadTimeout"], "bad_body": answered["bad"]}
    assert all(n <= r["errors_total"][k] for k, n in r["errors"].items())  # those that ended in the window
    assert r["modes"] == {"ar": r["requests"]}


def test_errors_in_the_window_are_those_that_ended_in_it():
    transport, answered = scripted_transport([503])
    r = asyncio.run(closed_loop("http://gw", 1, 0.6, [{"prompt": "a"}], window=(0.3, 0.6), transport=transport))
    assert r["ok_total"] == 0 and r["errors_total"] == {"503": r["sent"]}
    assert 0 < r["errors"]["503"] < r["sent"]  # ~half ended in the window (one request every 50 ms)


def test_merge_sums_requests_and_errors_over_rounds():
    def row(rnd, errors, sent):
        return {"policy": "ar", "concurrency": 2, "round": rnd, "tokens_per_s": 10.0 + rnd, "latency_p50_s": 0.1,
                "latency_by_prompt": {0: [0.1]}, "requests": 1, "modes": {"ar": 1}, "sent": sent,
                "errors": errors, "errors_total": errors}

    (m,) = merge_rounds([row(0, {"429": 2}, 5), row(1, {"429": 1, "ReadTimeout": 1}, 4), row(2, {}, 3)], ["ar"], [2])
    assert m["sent"] == 12 and m["errors"] == m["errors_total"] == {"429": 3, "ReadTimeout": 1}


def test_tuning_and_measuring_prompts_are_disjoint():
    prompts = [[i, i + 1] for i in range(16)]
    tune, measure = split_prompts(prompts)
    assert tune == prompts[:8] and measure == prompts[8:]
    assert prompt_split_record(tune, measure)["disjoint"] is True
    assert split_prompts([[1]]) == ([[1]], [[1]]) and not prompt_split_record([[1]], [[1]])["disjoint"]
    json.dumps(prompt_split_record(tune, measure))  # goes into the results file


def rates(ar: dict, spec: dict) -> list[dict]:
    return ([{"policy": "ar", "concurrency": c, "tokens_per_s": v} for c, v in ar.items()]
            + [{"policy": "self_spec", "concurrency": c, "tokens_per_s": v} for c, v in spec.items()])


@pytest.mark.parametrize("ar, spec, expect", [
    # self-spec leads at 1-2, AR from 4 on: loaded above 3, back below 2.5 (the hand-tuned values)
    ({1: 10, 2: 18, 4: 40, 8: 70}, {1: 25, 2: 30, 4: 31, 8: 32}, (4, 3.0, 2.5)),
    # a noisy win of AR at 2 does not count: the crossover is where AR keeps winning
    ({1: 10, 2: 31, 4: 29, 8: 70}, {1: 25, 2: 30, 4: 31, 8: 32}, (8, 6.0, 5.0)),
    ({1: 30, 2: 40}, {1: 10, 2: 11}, (1, 0.5, 0.25)),  # AR ahead everywhere
    ({1: 10, 2: 11}, {1: 30, 2: 40}, (None, 4.0, 3.0)),  # never: stays sparse within the range swept
])
def test_thresholds_come_from_the_crossover(ar, spec, expect):
    t = tune_thresholds(rates(ar, spec), sorted(ar))
    assert (t["crossover"], t["enter_loaded_above"], t["leave_loaded_below"]) == expect
    assert t["leave_loaded_below"] < t["enter_loaded_above"]


def test_the_tuned_policy_keeps_the_file_and_validates():
    text = open("benchmarks/adaptive_cpu.yaml").read().replace("{metrics_port}", "8080")
    tuned = tuned_policy_text(text, {"crossover": 8, "enter_loaded_above": 6.0, "leave_loaded_below": 5.0})
    spec = parse_policy(tuned)
    assert (spec.mode.enter_loaded_above, spec.mode.leave_loaded_below) == (6.0, 5.0)
    assert spec.signals == parse_policy(text).signals and spec.engine == parse_policy(text).engine
