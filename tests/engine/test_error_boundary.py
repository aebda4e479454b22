"""One error boundary around the step: faults injected in a row's prepare, in the forward, in a
row's advance and in the scheduler end only that step's requests (finish_reason "error", blocks
freed); everyone else carries on and the next request is served."""

from __future__ import annotations

import pytest

from replicas.engine import BatchEngine, DecodeParams, EngineConfig
from replicas.engine.running import Running

PARAMS = {mode: DecodeParams(mode=mode, max_new_tokens=24, ignore_eos=True, block_length=4, threshold=0.5)
          for mode in ("ar", "self_spec", "diffusion")}


class Boom(RuntimeError):
    pass


def start(engine) -> tuple[BatchEngine, dict[str, tuple]]:
    """Three running requests, one per mode, past their prefill."""
    be = BatchEngine(engine, EngineConfig(max_batch_size=4, max_seq_len=64, kv_block_size=4))
    jobs = {be.submit([1, 2, 3 + i], PARAMS[m]): ([1, 2, 3 + i], PARAMS[m], []) for i, m in enumerate(PARAMS)}
    for _ in range(2):
        collect(be, jobs)
    return be, jobs


def collect(be: BatchEngine, jobs: dict) -> dict[str, str]:
    """One step; returns the finish reasons it reported."""
    finished = {}
    for c in be.step():
        jobs[c.request_id][2].extend(c.token_ids)
        if c.finish_reason:
            finished[c.request_id] = c.finish_reason
            if c.finish_reason == "error":
                assert "Boom" in c.error
    return finished


def finish(be: BatchEngine, jobs: dict) -> dict[str, str]:
    reasons = {}
    while be.has_work():
        reasons.update(collect(be, jobs))
    return reasons


def check_the_rest_and_the_next(engine, be: BatchEngine, jobs: dict, failed: set[str], reasons: dict) -> None:
    reasons.update(finish(be, jobs))
    assert {rid for rid, r in reasons.items() if r == "error"} == failed
    for rid, (prompt, params, tokens) in jobs.items():
        if rid not in failed:
            assert reasons[rid] == "length" and tokens == engine.generate(prompt, params).token_ids
    snap = be.stats_snapshot()
    assert snap["failed_requests"] == len(failed) and snap["kv_blocks_used"] == 0 and snap["kv_slots_used"] == 0
    nxt = be.submit([9, 8, 7], PARAMS["self_spec"])  # the next request is served
    tokens = []
    while be.has_work():
        for c in be.step():
            assert c.finish_reason != "error"
            tokens += c.token_ids
    assert tokens == engine.generate([9, 8, 7], PARAMS["ar"]).token_ids and nxt


@pytest.mark.parametrize("where", ["prepare", "advance"])
@pytest.mark.parametrize("victim_mode", ["ar", "self_spec", "diffusion"])
def test_a_fault_in_one_rows_prepare_or_advance_ends_only_that_request(engine, monkeypatch, where, victim_mode):
    be, jobs = start(engine)
    victim = next(rid for rid, (_, p, _) in jobs.items() if p.mode == victim_mode)
    original = getattr(Running, where)

    def faulty(self, *args):
        if self.request_id == victim:
            raise Boom(f"injected in {where}")
        return original(self, *args)

    monkeypatch.setattr(Running, where, faulty)
    reasons = collect(be, jobs)
    assert reasons == {victim: "error"}
    assert victim not in be.scheduler.running
    monkeypatch.setattr(Running, where, original)
    check_the_rest_and_the_next(engine, be, jobs, {victim}, reasons)


def test_a_fault_in_the_forward_ends_that_steps_requests(engine, monkeypatch):
    be, jobs = start(engine)
    waiting = be.submit([5, 6, 7], PARAMS["ar"])  # admitted at the faulting step: part of it
    jobs[waiting] = ([5, 6, 7], PARAMS["ar"], [])
    original = be.runner.run_with_greedy
    monkeypatch.setattr(be.runner, "run_with_greedy", lambda items: (_ for _ in ()).throw(Boom("injected in the forward")))
    reasons = collect(be, jobs)
    assert set(reasons) == set(jobs) and set(reasons.values()) == {"error"}
    monkeypatch.setattr(be.runner, "run_with_greedy", original)
    check_the_rest_and_the_next(engine, be, jobs, set(jobs), reasons)


def test_a_fault_in_scheduling_ends_the_running_requests_not_the_queue(engine, monkeypatch):
    be, jobs = start(engine)
    original = be.scheduler.schedule

    def once():
        monkeypatch.setattr(be.scheduler, "schedule", original)
        raise Boom("injected in schedule")

    monkeypatch.setattr(be.scheduler, "schedule", once)
    queued = be.submit([5, 6, 7], PARAMS["diffusion"])
    jobs[queued] = ([5, 6, 7], PARAMS["diffusion"], [])
    reasons = collect(be, jobs)
    failed = set(jobs) - {queued}
    assert reasons == {rid: "error" for rid in failed}
    check_the_rest_and_the_next(engine, be, jobs, failed, reasons)


def test_a_broken_engine_state_ends_every_request_and_starts_clean(engine, monkeypatch):
    """The boundary's own cleanup fails: every open request gets an error at once (none hangs)
    and a fresh scheduler serves the next request."""
    be, jobs = start(engine)
    queued = be.submit([5, 6, 7], PARAMS["ar"])
    jobs[queued] = ([5, 6, 7], PARAMS["ar"], [])
    monkeypatch.setattr(be.runner, "run_with_greedy", lambda items: (_ for _ in ()).throw(Boom("injected in the forward")))
    monkeypatch.setattr(be.scheduler, "remove", lambda rid: (_ for _ in ()).throw(Boom("and in cleanup")))
    reasons = collect(be, jobs)
    assert reasons == {rid: "error" for rid in jobs}
    monkeypatch.undo()
    assert not be.has_work() and be.stats_snapshot()["kv_blocks_used"] == 0
    check_the_rest_and_the_next(engine, be, jobs, set(jobs), reasons)
