"""Small steps on one torch thread (`threads.step_threads`, `EngineConfig.parallel_min_tokens`)."""

from __future__ import annotations

import pytest
import torch

from replicas.engine import BatchEngine, DecodeParams, EngineConfig
from replicas.engine.runner import ModelRunner
from replicas.engine.threads import step_threads


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_a_small_step_runs_on_one_thread_and_the_count_comes_back(two_threads):
    with step_threads(3, 8) as used:
        assert used == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    for tokens, min_tokens in ((8, 8), (40, 8), (3, 0), (0, 8)):  # large, off, and an empty step
        with step_threads(tokens, min_tokens) as used:
            assert used == 2 and torch.get_num_threads() == 2


def test_the_count_comes_back_when_the_step_raises(two_threads):
    with pytest.raises(RuntimeError, match="forward failed"):
        with step_threads(1, 8):
            raise RuntimeError("forward failed")
    assert torch.get_num_threads() == 2


def test_a_one_thread_process_is_left_alone():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with step_threads(1, 8) as used:
            assert used == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


class ThreadRecordingRunner(ModelRunner):
    seen: list[tuple[int, int]] = []  # (tokens of the forward, torch threads while it ran)

    def run_with_greedy(self, items):
        ThreadRecordingRunner.seen.append((sum(len(p.tokens) for _, p in items), torch.get_num_threads()))
        return super().run_with_greedy(items)


def test_the_engine_runs_steps_below_parallel_min_tokens_on_one_thread(engine, monkeypatch, two_threads):
    """Prefill (6 tokens a row) and 4-token self-spec cycles cross the threshold of 6; AR rows stay below."""
    monkeypatch.setattr(engine, "runner_cls", ThreadRecordingRunner)
    ThreadRecordingRunner.seen = []
    be = BatchEngine(engine, EngineConfig(max_batch_size=4, max_seq_len=128, parallel_min_tokens=6))
    be.submit([1, 2, 3, 4, 5, 6], DecodeParams(mode="ar", max_new_tokens=6, ignore_eos=True))
    be.submit([7, 8, 9, 10, 11, 12], DecodeParams(mode="self_spec", block_length=4, max_new_tokens=6,
                                                  ignore_eos=True))
    while be.has_work():
        be.step()
    assert ThreadRecordingRunner.seen, "no forward ran"
    for tokens, threads in ThreadRecordingRunner.seen:
        assert threads == (1 if tokens < 6 else 2), ThreadRecordingRunner.seen
    assert {t for _, t in ThreadRecordingRunner.seen} == {1, 2}  # both kinds of step happened
    assert torch.get_num_threads() == 2  # the process's count is untouched between steps


def test_parallel_min_tokens_is_checked():
    assert EngineConfig().parallel_min_tokens == 16  # the measured default
    with pytest.raises(ValueError, match="parallel_min_tokens: must be >= 0"):
        EngineConfig(parallel_min_tokens=-1)
