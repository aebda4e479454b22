"""Per-request inboxes: one wake-up per need, merged chunks, failures that never hang."""

from __future__ import annotations

import asyncio

import pytest

from replicas.engine.errors import EngineError
from replicas.engine.outputs import OutputRouter, StreamChunk, pack, unpack


def chunk(rid: str, tokens: list[int], finish: str | None = None, passes: int = 0) -> StreamChunk:
    stats = {"forward_passes": passes} if finish else None
    return StreamChunk(rid, tokens, finish_reason=finish, stats=stats, forward_passes=passes, mode="ar")


def test_a_final_only_inbox_wakes_once_with_every_token_in_order():
    async def main():
        router = OutputRouter()
        inbox = router.open("a", wake="final")
        wakes = 0

        async def consume():
            nonlocal wakes
            got = await inbox.take()
            wakes += 1
            return got

        task = asyncio.create_task(consume())
        for step in range(5):  # five engine steps, one token each
            router.deliver([chunk("a", [step], passes=step + 1)])
            await asyncio.sleep(0)
            assert not task.done()  # nobody is woken for tokens the consumer does not need yet
        router.deliver([chunk("a", [5], finish="length", passes=6)])
        got = await task
        return got, wakes

    got, wakes = asyncio.run(main())
    assert wakes == 1
    assert got.token_ids == [0, 1, 2, 3, 4, 5] and got.finish_reason == "length" and got.forward_passes == 6


def test_an_each_inbox_merges_what_arrived_while_the_consumer_was_busy():
    async def main():
        router = OutputRouter()
        inbox = router.open("a", wake="each")
        router.deliver([chunk("a", [1])])
        router.deliver([chunk("a", [2, 3], passes=2)])
        first = await inbox.take()
        router.deliver([chunk("a", [4], finish="stop", passes=3)])
        last = await inbox.take()
        return first, last

    first, last = asyncio.run(main())
    assert first.token_ids == [1, 2, 3] and first.finish_reason is None and first.forward_passes == 2
    assert last.token_ids == [4] and last.finish_reason == "stop" and last.stats == {"forward_passes": 3}


def test_fail_wakes_a_waiting_consumer_at_once():
    async def main():
        router = OutputRouter()
        inboxes = [router.open(rid, wake="final") for rid in ("a", "b")]
        waiting = [asyncio.create_task(i.take()) for i in inboxes]
        await asyncio.sleep(0)
        router.fail("a", ValueError("prompt_ids: bad"))
        router.fail_all(EngineError("the engine process exited"))
        return await asyncio.gather(*waiting, return_exceptions=True)

    a, b = asyncio.run(main())
    assert isinstance(a, ValueError) and "prompt_ids" in str(a)  # the first failure wins
    assert isinstance(b, EngineError)


def test_chunks_nobody_reads_are_reported_for_abort_and_duplicate_ids_refused():
    router = OutputRouter()
    router.open("a", wake="each")
    with pytest.raises(ValueError, match="already in flight"):
        router.open("a", wake="each")
    orphans = router.deliver([chunk("a", [1]), chunk("gone", [2]), chunk("done", [3], finish="stop")])
    assert orphans == ["gone"]  # still running, nobody listens: abort it; a finished one needs nothing
    router.close("a")
    assert router.request_ids() == []


def test_packed_chunks_round_trip():
    c = StreamChunk("r", [1, 2], finish_reason="length", stats={"x": 1}, error=None, forward_passes=3, mode="self_spec")
    assert unpack(pack(c)) == c


def test_a_tap_takes_middle_chunks_at_delivery_and_the_consumer_wakes_only_for_the_last():
    async def main():
        router = OutputRouter()
        inbox = router.open("a", wake="each")
        other = router.open("b", wake="each")
        tapped: list[list[int]] = []
        assert router.tap("a", lambda c: tapped.append(c.token_ids) or True)
        assert not router.tap("gone", lambda c: True)  # not in flight
        task = asyncio.create_task(inbox.take())
        for step in range(4):
            router.deliver([chunk("a", [step], passes=step + 1), chunk("b", [10 + step])])
            await asyncio.sleep(0)
            assert not task.done()  # handled in the delivery itself: no wake-up
        router.deliver([chunk("a", [4], finish="length", passes=5)])
        return tapped, await task, other.take_now(), inbox.first_token_at

    tapped, last, other, first_at = asyncio.run(main())
    assert tapped == [[0], [1], [2], [3]]
    assert last.token_ids == [4] and last.finish_reason == "length" and last.forward_passes == 5
    assert other.token_ids == [10, 11, 12, 13]  # an untapped inbox beside it is unchanged
    assert first_at is not None  # the first token's time is kept for the request's metrics


def test_a_tap_waits_while_output_is_unread_so_order_is_kept():
    router = OutputRouter()
    inbox = router.open("a", wake="each")
    router.deliver([chunk("a", [1])])  # before the tap: unread
    tapped: list[list[int]] = []
    router.tap("a", lambda c: tapped.append(c.token_ids) or True)
    router.deliver([chunk("a", [2])])  # still behind unread output: queued, not tapped
    assert tapped == [] and inbox.take_now().token_ids == [1, 2]
    router.deliver([chunk("a", [3])])
    assert tapped == [[3]]


def test_a_tap_that_stops_wakes_its_consumer_with_an_empty_chunk_and_is_removed():
    async def main():
        router = OutputRouter()
        inbox = router.open("a", wake="each")
        calls: list[list[int]] = []
        router.tap("a", lambda c: calls.append(c.token_ids) or len(calls) < 2)
        router.deliver([chunk("a", [1])])
        router.deliver([chunk("a", [2], passes=2)])  # the tap took it, and stops
        woken = await inbox.take()
        router.deliver([chunk("a", [3], passes=3)])  # no tap any more: the consumer's, as before
        return calls, woken, inbox.take_now()

    calls, woken, after = asyncio.run(main())
    assert calls == [[1], [2]]
    assert woken.token_ids == [] and woken.finish_reason is None and woken.forward_passes == 2
    assert after.token_ids == [3]


def test_a_tap_that_raises_fails_its_request_only():
    async def main():
        router = OutputRouter()
        inbox = router.open("a", wake="each")
        other = router.open("b", wake="each")

        def broken(c):
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad byte")

        router.tap("a", broken)
        router.deliver([chunk("a", [1]), chunk("b", [2])])
        with pytest.raises(UnicodeDecodeError):
            await inbox.take()
        return other.take_now()

    assert asyncio.run(main()).token_ids == [2]
