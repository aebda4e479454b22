"""benchmarks/engine_modes.py replays the engine's own forwards bare: the recording runner must see
every forward the engine makes (BatchEngine calls `run_with_greedy`, not `run`)."""

from __future__ import annotations

from benchmarks.engine_modes import RecordingRunner, measure
from replicas.engine import DecodeParams, Engine
from replicas.engine.testing import write_random_checkpoint


def test_every_forward_is_recorded_and_replayed(tmp_path):
    engine = Engine.from_pretrained(write_random_checkpoint(tmp_path / "m", seed=2), runner_cls=RecordingRunner)
    r = measure(engine, [[1, 5, 9, 13]], DecodeParams(mode="ar", max_new_tokens=6, ignore_eos=True), repeats=1)
    assert len(RecordingRunner.log) == r["forward_passes"] + 1  # the prefill, then one forward per AR token
    assert r["bare_forward_s"] > 0 and -50.0 < r["overhead_pct"] < 1000.0
