"""benchmarks/positions_speed.py on the shipped model, cut down to 3 prompts and 8 tokens: every
configuration is timed in every round (diffusion with and without the model's denoise adapter
among them), ar is the reference, and self-spec's output tokens per forward are those of the
decoding it timed."""

from __future__ import annotations

import json

from benchmarks import positions_speed


def test_positions_speed_reports_every_configuration_against_ar(tmp_path):
    out = tmp_path / "speed.json"
    res = positions_speed.main(["--every", "60", "--max-tokens", "8", "--rounds", "2", "--threads", "1",
                                "--out", str(out)])
    assert json.loads(out.read_text())["summary"] == res["summary"]
    names = [s["config"] for s in res["summary"]]
    assert names == ["ar", "self_spec B16", "self_spec B8", "self_spec B16 no LoRA", "diffusion B16 adapter",
                     "diffusion B16 no adapter"]  # the shipped model has a denoise adapter
    assert res["prompts"] == 3 and len(res["rows"]) == 2 * len(names)
    by = {s["config"]: s for s in res["summary"]}
    assert by["ar"]["over_ar_per_round"] == [1.0, 1.0]
    assert by["ar"]["tpf"] == 8 / 7  # one token per AR forward after the prefill, which makes the first
    for s in res["summary"]:
        assert s["tokens_per_s"] > 0 and len(s["over_ar_per_round"]) == 2 and s["ms_per_forward"] > 0
