"""The stream coalescer (:func:`hotswap.streaming.coalesced`): what a stream's items carry, in what order, and
what is held back for how long (by event order, not by wall-clock thresholds)."""

from __future__ import annotations

import asyncio

import pytest

from hotswap.generation import TokenEvent
from hotswap.streaming import WithText, coalesced


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


class Opened:  # stands for the scheduler's Started
    pass


def test_the_opening_event_goes_out_with_the_first_text_as_one_item():
    """One item instead of two for the version and the first text; the first text is still not held."""
    async def go():
        q: asyncio.Queue = asyncio.Queue()
        items = coalesced(q, interval_s=60.0, opening=(Opened,))
        opened = Opened()
        q.put_nowait(opened)
        task = await _pending(items)
        assert not task.done()  # waiting for the first text (the interval is a minute)
        q.put_nowait(T("a"))
        assert await asyncio.wait_for(task, 5) == WithText(opened, T("a"))  # at once, with it
        q.put_nowait(T("b", "stop"))
        assert await _next(items) == T("b", "stop")

    run(go())


@pytest.mark.parametrize("interval_s", [0.0, 0.02])
def test_the_opening_event_goes_out_alone_when_no_text_comes_within_the_interval(interval_s):
    """A request waiting long for its first token still gets its headers (the earlier merge held them until the
    first text, which broke the disconnect test: a client could not leave a request held before its first token)."""
    async def go():
        q: asyncio.Queue = asyncio.Queue()
        items = coalesced(q, interval_s=interval_s, opening=(Opened,))
        opened = Opened()
        q.put_nowait(opened)
        q.put_nowait(T(""))  # a token with no text yet does not release it either
        assert await _next(items) is opened  # the interval alone releases it
        q.put_nowait(T("a"))
        assert await _next(items) == T("a")

    run(go())


def test_an_event_after_the_opening_releases_it_first_and_in_order():
    async def go():
        q: asyncio.Queue = asyncio.Queue()
        items = coalesced(q, interval_s=60.0, opening=(Opened,))
        opened = Opened()
        q.put_nowait(opened)
        q.put_nowait("failed")
        assert await _next(items) is opened
        assert await _next(items) == "failed"

    run(go())


def test_an_opening_event_after_text_is_not_held():
    async def go():
        q: asyncio.Queue = asyncio.Queue()
        items = coalesced(q, interval_s=60.0, opening=(Opened,))
        q.put_nowait(T("a"))
        assert await _next(items) == T("a")
        late = Opened()
        q.put_nowait(late)
        assert await _next(items) is late

    run(go())


@pytest.mark.parametrize("opening", [False, True])
def test_a_cancel_in_the_turn_a_token_arrives_reaches_the_stream(opening):
    """The outside review: on Python 3.11 ``asyncio.wait_for`` dropped a cancellation that came in the loop turn its
    ``queue.get()`` completed, so a client that disconnected while tokens were held (or while the opening waited
    for its first text) kept its batch row until max_tokens (67 of 200 disconnects lost at 50 ms)."""
    async def go():
        q: asyncio.Queue = asyncio.Queue()
        released = []

        async def stream():  # shaped like ModelReplica.stream: the finally frees the row
            try:
                async for event in coalesced(q, interval_s=60.0, opening=(Opened,)):
                    yield event
            finally:
                released.append("ticket.cancel()")

        async def consume():  # what Serve runs for one streaming request
            async for _ in stream():
                pass

        task = asyncio.ensure_future(consume())
        if opening:
            q.put_nowait(Opened())  # held, waiting for its first text
        else:
            q.put_nowait(T("a"))  # sent at once ...
            for _ in range(5):
                await asyncio.sleep(0)
            q.put_nowait(T("b"))  # ... then this one is held for the interval
        for _ in range(5):
            await asyncio.sleep(0)
        q.put_nowait(T("c"))  # a token arrives (call_soon_threadsafe from the scheduler) ...
        task.cancel()  # ... in the same turn as the disconnect
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)
        assert released == ["ticket.cancel()"]

    run(go())
