"""The engine in its own process (what a replica serves with), and the loop's liveness in both
hosts: outputs equal the in-process engine's, errors are precise, a dead loop never hangs a stream."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from multiprocessing import Pipe
from pathlib import Path

import pytest

from replicas.engine import (AsyncEngine, BatchEngine, DecodeParams, Engine, EngineConfig, EngineError,
                             EngineOverloaded, EngineProcess, EngineSpec)
from replicas.engine.core_loop import CoreLoop

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def proc_engine(lora_ckpt_dir):
    eng = EngineProcess(EngineSpec(str(lora_ckpt_dir), EngineConfig(max_batch_size=4, max_seq_len=128, max_waiting=2),
                                   torch_threads=1))
    yield eng
    eng.shutdown()


def run(coro):
    return asyncio.run(coro)


def test_streams_and_whole_answers_equal_the_in_process_engine(proc_engine, lora_engine):
    prompts = [[1, 2, 3], [7, 8, 9, 10], [5] * 6]
    modes = ["self_spec", "ar", "diffusion"]

    async def main():
        async def streamed(prompt, mode):
            chunks = [c async for c in proc_engine.stream(prompt, DecodeParams(mode=mode, max_new_tokens=20,
                                                                               block_length=4))]
            return chunks

        streams = await asyncio.gather(*(streamed(p, m) for p, m in zip(prompts, modes)))
        whole = await proc_engine.generate(prompts[0], DecodeParams(mode="self_spec", max_new_tokens=20,
                                                                    block_length=4))
        return streams, whole

    streams, whole = run(main())
    for prompt, mode, chunks in zip(prompts, modes, streams):
        expected = lora_engine.generate(prompt, DecodeParams(mode=mode, max_new_tokens=20, block_length=4))
        assert [t for c in chunks for t in c.token_ids] == expected.token_ids
        assert chunks[-1].finish_reason == expected.finish_reason
        assert all(c.finish_reason is None for c in chunks[:-1])
        stats = chunks[-1].stats
        assert stats["mode"] == mode and stats["forward_passes"] == expected.forward_passes
        assert 0 < stats["first_token_seconds"] <= stats["seconds"]
    ar = lora_engine.generate(prompts[0], DecodeParams(mode="ar", max_new_tokens=20)).token_ids
    assert whole.token_ids == ar and whole.mode == "self_spec" and whole.seconds > 0  # self-spec == AR, greedy


def test_submission_errors_are_precise_and_the_engine_keeps_serving(proc_engine):
    async def main():
        with pytest.raises(ValueError, match="prompt_ids: token id 99999 is outside the vocabulary"):
            await anext(proc_engine.stream([1, 99999]))
        params = DecodeParams(max_new_tokens=100, ignore_eos=True)
        held = [proc_engine.stream([1, 2], params) for _ in range(6)]  # 4 slots + 2 waiting
        firsts = [asyncio.create_task(anext(s)) for s in held]
        for _ in range(400):
            if (await proc_engine.fresh_stats())["waiting"] == 2:
                break
            await asyncio.sleep(0.01)
        with pytest.raises(EngineOverloaded):
            await anext(proc_engine.stream([1, 2]))
        for task in firsts:
            task.cancel()
        await asyncio.gather(*firsts, return_exceptions=True)
        for s in held:
            await s.aclose()
        out = await proc_engine.generate([1, 2, 3], DecodeParams(max_new_tokens=5))
        return out, await settle(proc_engine)

    out, stats = run(main())
    assert len(out.token_ids) == 5
    assert stats["kv_slots_used"] == 0 and stats["waiting"] == 0 and stats["rejected_requests"] >= 1


async def settle(eng, timeout: float = 10.0) -> dict:
    """Stats once nothing runs or waits any more (aborts apply at the child's next step)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = await eng.fresh_stats()
        if (stats["kv_slots_used"] == 0 and stats["waiting"] == 0) or time.monotonic() > deadline:
            return stats
        await asyncio.sleep(0.02)


def test_closing_a_stream_early_frees_its_kv(proc_engine):
    async def main():
        before = (await proc_engine.fresh_stats())["aborted_requests"]
        stream = proc_engine.stream([4, 5, 6], DecodeParams(max_new_tokens=110, ignore_eos=True))
        await anext(stream)
        assert (await proc_engine.fresh_stats())["kv_slots_used"] == 1
        await stream.aclose()
        stats = await settle(proc_engine)
        return stats, before

    stats, before = run(main())
    assert stats["kv_slots_used"] == 0 and stats["aborted_requests"] == before + 1
    assert stats["generated_tokens"] < 10_000


def test_min_interval_sends_fewer_larger_chunks_with_every_token(proc_engine, lora_engine):
    async def main():
        t0 = time.monotonic()
        chunks = [c async for c in proc_engine.stream([1, 2, 3], DecodeParams(max_new_tokens=60, ignore_eos=True),
                                                      min_interval_s=0.05)]
        return chunks, time.monotonic() - t0

    chunks, seconds = run(main())
    expected = lora_engine.generate([1, 2, 3], DecodeParams(max_new_tokens=60, ignore_eos=True)).token_ids
    assert [t for c in chunks for t in c.token_ids] == expected
    assert len(chunks) <= seconds / 0.05 + 2  # at most one chunk per interval (plus the last)


def test_the_serving_process_never_imports_torch(lora_ckpt_dir):
    script = f"""
import asyncio, sys
from replicas.engine import EngineProcess, EngineSpec, EngineConfig, DecodeParams
eng = EngineProcess(EngineSpec({str(lora_ckpt_dir)!r}, EngineConfig(max_batch_size=2, max_seq_len=64), torch_threads=1))
out = asyncio.run(eng.generate([1, 2, 3], DecodeParams(mode="self_spec", max_new_tokens=6)))
eng.shutdown()
assert len(out.token_ids) == 6, out
print("torch" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_a_killed_engine_process_fails_open_streams_at_once_and_reports_unhealthy(lora_ckpt_dir):
    eng = EngineProcess(EngineSpec(str(lora_ckpt_dir), EngineConfig(max_batch_size=2, max_seq_len=4096),
                                   torch_threads=1))

    async def main():
        assert eng.health() is None
        stream = eng.stream([1, 2, 3], DecodeParams(max_new_tokens=4000, ignore_eos=True))
        await anext(stream)
        os.kill(eng._proc.pid, signal.SIGKILL)  # the engine dies mid-request
        t0 = time.monotonic()
        with pytest.raises(EngineError, match="exited"):
            async for _ in stream:
                pass
        waited = time.monotonic() - t0
        with pytest.raises(EngineError):
            await anext(eng.stream([1, 2]))  # no new request is accepted either
        return waited

    try:
        waited = run(main())
    finally:
        eng.shutdown()
    assert waited < 1.0
    assert "exited" in eng.health()


class ExplodingCore:
    """A core whose step fails outside BatchEngine's own error boundary."""

    def has_work(self):
        return True

    def step(self):
        raise RuntimeError("kernel fault surfaced at a host sync")

    def stats_snapshot(self):
        return {}


def test_the_core_loop_reports_a_failed_step_as_fatal_and_stops():
    parent, child = Pipe()
    loop = CoreLoop(child, ExplodingCore(), stats_interval_s=0.5)
    thread = threading.Thread(target=loop.run)
    thread.start()
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert parent.poll(1) and parent.recv() == ("fatal", "RuntimeError: kernel fault surfaced at a host sync")


def test_a_dead_loop_thread_fails_every_stream_at_once(ckpt_dir):
    core = BatchEngine(Engine.from_pretrained(ckpt_dir), EngineConfig(max_batch_size=2, max_seq_len=4096))
    eng = AsyncEngine(core)

    async def main():
        stream = eng.stream([1, 2, 3], DecodeParams(max_new_tokens=4000, ignore_eos=True))
        await anext(stream)

        def explode():
            raise RuntimeError("CUDA error: an illegal memory access")

        core.step = explode  # the next step fails outside the forward's guard
        t0 = time.monotonic()
        with pytest.raises(EngineError, match="illegal memory access"):
            async for _ in stream:
                pass
        return time.monotonic() - t0

    waited = run(main())
    assert waited < 1.0 and "illegal memory access" in eng.health()
    eng.shutdown()


def test_a_stuck_loop_is_reported_while_requests_wait(ckpt_dir):
    core = BatchEngine(Engine.from_pretrained(ckpt_dir), EngineConfig(max_batch_size=2, max_seq_len=128))
    eng = AsyncEngine(core, stall_timeout_s=0.3)
    release = threading.Event()
    real_step = core.step

    def stuck():
        release.wait(10)
        return real_step()

    async def main():
        core.step = stuck
        task = asyncio.create_task(eng.generate([1, 2, 3], DecodeParams(max_new_tokens=3)))
        await asyncio.sleep(0.6)
        problem = eng.health()
        core.step = real_step
        release.set()
        out = await task
        return problem, out

    problem, out = run(main())
    assert problem is not None and "no progress" in problem
    assert len(out.token_ids) == 3 and eng.health() is None  # it recovered: healthy again
    eng.shutdown()


def test_flush_tokens_sends_a_chunk_before_the_interval_is_up(proc_engine, lora_engine):
    async def main():
        return [c async for c in proc_engine.stream([1, 2, 3], DecodeParams(max_new_tokens=60, ignore_eos=True),
                                                    min_interval_s=10.0, flush_tokens=8)]

    chunks = run(main())
    expected = lora_engine.generate([1, 2, 3], DecodeParams(max_new_tokens=60, ignore_eos=True)).token_ids
    assert [t for c in chunks for t in c.token_ids] == expected
    assert len(chunks) >= 60 // 16 and all(len(c.token_ids) >= 8 for c in chunks[1:-1])  # a 10 s interval alone: 2 chunks


def test_a_whole_answer_crosses_the_process_boundary_once(proc_engine, lora_engine, monkeypatch):
    """`generate` (a consumer that wakes only at the end) gets its tokens in ONE message from the
    engine process, with the same tokens and a first-token time inside the request; a stream of
    the same request gets one chunk per step."""
    seen: dict[str, list] = {}
    dispatch = proc_engine._dispatch

    def counting(msg):
        if msg[0] == "out":
            for packed in msg[1]:  # (a copy of the stats: the inbox takes first_token_at out of them)
                seen.setdefault(packed[0], []).append((*packed[:3], dict(packed[3] or {})))
        dispatch(msg)

    monkeypatch.setattr(proc_engine, "_dispatch", counting)
    params = DecodeParams(mode="ar", max_new_tokens=12, ignore_eos=True)

    async def main():
        whole = await proc_engine.generate([1, 2, 3], params, request_id="quiet-1")
        last = None
        async for last in proc_engine.stream([1, 2, 3], params, request_id="loud-1"):
            pass
        return whole, last

    whole, last = run(main())
    expected = lora_engine.generate([1, 2, 3], params).token_ids
    assert whole.token_ids == expected and len(seen["quiet-1"]) == 1  # one message, every token
    assert seen["quiet-1"][0][2] == "length" and "first_token_at" in seen["quiet-1"][0][3]  # the child's clock
    assert len(seen["loud-1"]) >= 12  # per step (prefill makes the first token)
    assert 0 < last.stats["first_token_seconds"] <= last.stats["seconds"]


def test_a_held_answer_reports_when_its_first_token_came(proc_engine):
    """The first-token time of a quiet request is the engine's, not the arrival of its one message."""
    async def main():
        chunks = [c async for c in proc_engine.stream([4, 5, 6], DecodeParams(mode="ar", max_new_tokens=40,
                                                                              ignore_eos=True), wake="final")]
        return chunks

    chunks = run(main())
    assert len(chunks) == 1 and len(chunks[0].token_ids) == 40
    stats = chunks[0].stats
    assert "first_token_at" not in stats  # consumed by the inbox, never passed on
    assert 0 < stats["first_token_seconds"] < stats["seconds"]
    # 39 more steps came after the first token: not the ~whole request that its one late message would say
    assert stats["first_token_seconds"] < 0.5 * stats["seconds"]


def cpus_of_every_thread(pid: int) -> set[frozenset[int]]:
    return {frozenset(os.sched_getaffinity(int(tid))) for tid in os.listdir(f"/proc/{pid}/task")}


def test_the_engine_process_binds_every_thread_to_its_cpus(ckpt_dir):
    one = min(os.sched_getaffinity(0))
    eng = EngineProcess(EngineSpec(str(ckpt_dir), EngineConfig(max_batch_size=2, max_seq_len=64),
                                   torch_threads=1, cpus=(one,)))
    try:
        out = run(eng.generate([1, 2, 3], DecodeParams(mode="ar", max_new_tokens=4)))
        assert len(out.token_ids) == 4
        assert cpus_of_every_thread(eng._proc.pid) == {frozenset({one})}  # threads started later too
        assert os.sched_getaffinity(0) != {one} or len(os.sched_getaffinity(0)) == 1  # the parent is not bound
    finally:
        eng.shutdown()


def test_cpus_the_machine_lacks_fail_the_start_with_the_reason(ckpt_dir):
    with pytest.raises(EngineError, match=r"engine_cpus \[4095\]: the CPUs this process may use are"):
        EngineProcess(EngineSpec(str(ckpt_dir), EngineConfig(max_batch_size=2, max_seq_len=64), cpus=(4095,)))
