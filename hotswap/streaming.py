"""A stream's items, from one request's scheduler events: fewer, larger messages.

Every item a stream yields crosses two Ray hops (replica -> ingress -> proxy), and each hop has a
cost per item whatever the item carries (``benchmarks/serving.py`` reports streams against whole
answers, and the chunks per token). So the replica sends the tokens decoded within
``stream_interval_ms`` of the last item as one item, as Ray Serve LLM does (its
``stream_batching_interval_ms``, 50 ms by default). The first text goes at once (the time
to first token is not held back), and so does the end; events other than tokens pass through
in order. The event that opens a stream (the scheduler's ``Started``, which names the version
and lets the ingress send the response headers) waits up to the same interval for the first
text and goes out with it, one item instead of two; if no text comes within the interval it
goes out alone, so a client that waits long for its first token still gets its headers.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from hotswap.generation import TokenEvent

__all__ = ["Inbox", "LoopMailbox", "WithText", "coalesced"]

logger = logging.getLogger(__name__)


class LoopMailbox:
    """Hands events from the scheduler's thread to one event loop's queues (an ``asyncio.Queue`` for a whole answer,
    an :class:`Inbox` for a stream: anything with ``put_nowait``), one wake-up of the loop per burst.

    The scheduler delivers a step's events one callback at a time (a token for each of up to ``max_batch_size``
    rows). ``loop.call_soon_threadsafe`` for each one wakes the loop each time (a write to its self-pipe, then a
    turn of the loop, taking the GIL from the scheduler's thread); here the first event posted while no drain is
    pending schedules one :meth:`_drain` and the events posted until it runs join it (usually a step's, though
    the loop may drain partway through). Per queue, events arrive in the order they were posted.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._items: deque[tuple[asyncio.Queue | Inbox, object]] = deque()
        self._scheduled = False

    def sender(self, queue: asyncio.Queue | Inbox, *,
               keep: Callable[[object], bool] | None = None) -> Callable[[object], None]:
        """An ``on_event`` callback that posts to ``queue`` the events for which ``keep`` (if given) is true."""
        if keep is None:
            return lambda event: self.post(queue, event)
        return lambda event: self.post(queue, event) if keep(event) else None

    def post(self, queue: asyncio.Queue | Inbox, event: object) -> None:
        """From any thread: ``queue.put_nowait(event)`` on the loop."""
        with self._lock:
            if self.loop.is_closed():  # closed with a drain pending (which then never runs): nobody waits now
                self._items.clear()
                self._scheduled = False
                return
            self._items.append((queue, event))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop closed meanwhile (the replica is shutting down): nobody waits for the event
            with self._lock:
                self._items.clear()
                self._scheduled = False

    def _drain(self) -> None:
        with self._lock:
            items, self._items = self._items, deque()
            self._scheduled = False
        for queue, event in items:
            try:  # one queue that refuses an event must not cost the other requests of the burst theirs
                queue.put_nowait(event)
            except Exception:
                logger.exception("an event could not be handed to its request")


class Inbox:
    """One request's events on its event loop: what :class:`LoopMailbox` posts to and :func:`coalesced` reads.

    An unbounded FIFO like ``asyncio.Queue``, with one waiter and one difference: while the reader waits
    *quietly* (it holds text back until the stream interval ends), a token event that does not end the
    request is queued without waking it. A stream's reader then wakes about twice per item (the first token
    after an item, the end of the interval) instead of once per token, and each wake-up is a turn of the
    replica's event loop under the GIL that the scheduler's thread waits for. Loop thread only.
    """

    def __init__(self) -> None:
        self._items: deque[object] = deque()
        self._waiter: asyncio.Future | None = None
        self._quiet = False
        self.wakes = 0  # waits ended by an event (not by their timeout): what the quiet waits save

    def put_nowait(self, event: object) -> None:
        self._items.append(event)
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if self._quiet and isinstance(event, TokenEvent) and event.finish_reason is None:
            return  # taken when the quiet wait ends
        self.wakes += 1
        waiter.set_result(None)

    def empty(self) -> bool:
        return not self._items

    def get_nowait(self) -> object:
        """The oldest event; ``IndexError`` if there is none."""
        return self._items.popleft()

    async def wait(self, timeout_s: float | None, *, quiet: bool = False) -> None:
        """Until an event is queued from now on (while ``quiet``: one that is not a token in the middle of the
        request) or ``timeout_s`` has passed (None: no limit); the caller takes what was queued before
        (:meth:`empty`, :meth:`get_nowait`) first. One reader at a time. A cancellation always reaches the caller
        (a plain future is awaited, no ``wait_for``)."""
        if self._waiter is not None:
            raise RuntimeError("this Inbox already has a reader waiting; a stream's events have one reader")
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        self._quiet = quiet
        timer = None if timeout_s is None else loop.call_later(timeout_s, _resolve, waiter)
        try:
            await waiter
        finally:
            self._waiter, self._quiet = None, False
            if timer is not None:
                timer.cancel()


def _resolve(waiter: asyncio.Future) -> None:
    """A quiet wait's timer: the waiter may be done already (an event, or a cancel, in the same loop turn)."""
    if not waiter.done():
        waiter.set_result(None)


@dataclass(frozen=True)
class WithText:
    """A held opening ``event`` and the first text that followed it within the interval, as one item."""

    event: object
    text: TokenEvent


_NOTHING = object()  # what a wait that timed out takes from the queue


async def coalesced(inbox: Inbox, interval_s: float, *, opening: tuple[type, ...] = ()
                    ) -> AsyncIterator[object]:
    """Yield the events put in ``inbox``, :class:`~hotswap.generation.TokenEvent` s merged.

    A merged event's ``delta`` is the text of the tokens it stands for and its ``finish_reason`` the
    last one's; a token event with no text (held back by the detokenizer) is not yielded on its own.
    After an item with text, the next one waits until ``interval_s`` has passed since it (collecting
    tokens meanwhile, without waking for each: :class:`Inbox`) unless the request finishes or another
    kind of event arrives first. With ``interval_s`` 0 only the tokens already queued are merged (a slow
    consumer still gets one item, not a backlog). An event of an ``opening`` type that arrives before any
    text is held until the first text (then both go out as one :class:`WithText`), another event, or
    ``interval_s``, whichever comes first. The iteration never ends by itself: the caller stops at
    Finished / Failed. A cancellation of the consumer always reaches it (:meth:`Inbox.wait`)."""
    clock = asyncio.get_running_loop().time

    async def take(timeout_s: float | None = None, *, quiet: bool = False):
        """The next event, or ``_NOTHING`` if none came within ``timeout_s`` (None: wait as long as it takes)."""
        if not inbox.empty():
            return inbox.get_nowait()
        if timeout_s is not None and timeout_s <= 0:
            return _NOTHING
        await inbox.wait(timeout_s, quiet=quiet)
        return _NOTHING if inbox.empty() else inbox.get_nowait()

    pending = None  # an event taken while merging, yielded next
    sent_text = None  # when the last item with text was yielded
    held, held_until = None, 0.0  # an opening event waiting for the first text, and until when
    while True:
        if pending is not None:
            event, pending = pending, None
        else:
            event = await take(None if held is None else held_until - clock())
            if event is _NOTHING:  # no text within the interval: the opening goes out alone
                yield held
                held = None
                continue
        if not isinstance(event, TokenEvent):
            if held is not None:
                yield held
                held = None
            if isinstance(event, opening) and sent_text is None:
                held, held_until = event, clock() + interval_s
                continue
            yield event
            continue
        delta, finish = event.delta, event.finish_reason
        hold_until = float("-inf") if sent_text is None else sent_text + interval_s
        while finish is None:
            wait_s = hold_until - clock()
            # only what is already queued when there is nothing to hold back, or it was held long enough
            more = await take(wait_s if delta and wait_s > 0 else 0.0, quiet=True)
            if more is _NOTHING:
                break
            if not isinstance(more, TokenEvent):
                pending = more
                break
            delta, finish = delta + more.delta, more.finish_reason
        if delta or finish:
            if delta:
                sent_text = clock()
            merged = TokenEvent(row=event.row, delta=delta, finish_reason=finish)
            if held is not None:
                yield WithText(held, merged)
                held = None
            else:
                yield merged

