"""The stream coalescer (:func:`hotswap.streaming.coalesced`): what a stream's items carry, in what order, and
what is held back for how long (by event order, not by wall-clock thresholds)."""

from __future__ import annotations

import asyncio

import pytest

from hotswap.generation import TokenEvent
from hotswap.streaming import coalesced


def T(delta: str, finish=None) -> TokenEvent:
    return TokenEvent(row=0, delta=delta, finish_reason=finish)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=30))


async def _next(items, timeout_s: float = 5.0):
    return await asyncio.wait_for(items.__anext__(), timeout_s)


async def _pending(items):
    """The next item as a task, after giving the coalescer time to run: ``task.done()`` says whether it was held."""
    task = asyncio.ensure_future(items.__anext__())
    for _ in range(20):
        await asyncio.sleep(0.005)
    return task


def test_the_first_text_is_not_held_back_and_the_next_tokens_wait_for_the_interval():
    async def go():
        q: asyncio.Queue = asyncio.Queue()
        items = coalesced(q, interval_s=60.0)
        q.put_nowait(T("a"))
        assert await _next(items) == T("a")  # at once, although the interval is a minute
        q.put_nowait(T("b"))
        q.put_nowait(T("c"))
        task = await _pending(items)
        assert not task.done()  # held: within the interval of the last item
        q.put_nowait(T("d", "length"))  # the end is never held back
        assert await asyncio.wait_for(task, 5) == T("bcd", "length")

    run(go())


def test_other_events_pass_in_order_and_flush_the_tokens_held_before_them():
    async def go():
        q: asyncio.Queue = asyncio.Queue()
        items = coalesced(q, interval_s=60.0)
        q.put_nowait("started")
        assert await _next(items) == "started"
        q.put_nowait(T("a"))
        assert await _next(items) == T("a")
        q.put_nowait(T("b"))
        task = await _pending(items)
        assert not task.done()
        q.put_nowait("failed")
        assert await asyncio.wait_for(task, 5) == T("b")  # not lost, and before the event that followed it
        assert await _next(items) == "failed"

    run(go())


def test_interval_zero_merges_only_what_is_already_queued():
    async def go():
        q: asyncio.Queue = asyncio.Queue()
        items = coalesced(q, interval_s=0.0)
        for d in "abc":
            q.put_nowait(T(d))
        assert await _next(items) == T("abc")  # a slow consumer gets one item, not a backlog
        q.put_nowait(T("d"))
        assert await _next(items) == T("d")  # and nothing is held once the queue is empty
        q.put_nowait(T("e"))
        assert await _next(items) == T("e")

    run(go())


@pytest.mark.parametrize("interval_s", [0.0, 0.02])
def test_held_tokens_go_out_when_the_interval_ends_without_more_events(interval_s):
    async def go():
        q: asyncio.Queue = asyncio.Queue()
        items = coalesced(q, interval_s=interval_s)
        q.put_nowait(T("a"))
        assert await _next(items) == T("a")
        q.put_nowait(T("b"))
        assert await _next(items) == T("b")  # no further event comes: the interval alone releases it

    run(go())


def test_a_token_without_text_is_not_an_item_of_its_own():
    async def go():
        q: asyncio.Queue = asyncio.Queue()
        items = coalesced(q, interval_s=0.0)
        q.put_nowait(T(""))  # bytes of a character not complete yet
        task = await _pending(items)
        assert not task.done()
        q.put_nowait(T("é"))
        assert await asyncio.wait_for(task, 5) == T("é")
        q.put_nowait(T("", "stop"))  # an end without text still goes out
        assert await _next(items) == T("", "stop")

    run(go())


def test_the_merged_text_is_the_concatenation_whatever_the_timing():
    """Every delta arrives exactly once, in order, however the items are cut."""
    async def go():
        q: asyncio.Queue = asyncio.Queue()
        items = coalesced(q, interval_s=0.003)
        deltas = [f"{i} " for i in range(200)]

        async def produce():
            for i, d in enumerate(deltas):
                q.put_nowait(T(d, "length" if i == len(deltas) - 1 else None))
                if i % 7 == 0:
                    await asyncio.sleep(0.001)

        producer = asyncio.ensure_future(produce())
        got, n = "", 0
        while True:
            item = await _next(items)
            got, n = got + item.delta, n + 1
            if item.finish_reason:
                break
        await producer
        assert got == "".join(deltas) and item.finish_reason == "length"
        assert n < len(deltas)  # it did merge

    run(go())
