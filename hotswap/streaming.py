"""A stream's items, from one request's scheduler events: fewer, larger messages.

Every item a stream yields crosses two Ray hops (replica -> ingress -> proxy), and each hop has a
cost per item whatever the item carries (``benchmarks/serving.py`` reports streams against whole
answers, and the chunks per token). So the replica sends the tokens decoded within
``stream_interval_ms`` of the last item as one item, as Ray Serve LLM does (its
``stream_batching_interval_ms``, 50 ms by default). The first text goes at once (the time
to first token is not held back), and so does the end; events other than tokens pass through
in order.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from hotswap.generation import TokenEvent

__all__ = ["coalesced"]


async def coalesced(queue: asyncio.Queue, interval_s: float) -> AsyncIterator[object]:
    """Yield the events put on ``queue``, :class:`~hotswap.generation.TokenEvent` s merged.

    A merged event's ``delta`` is the text of the tokens it stands for and its ``finish_reason`` the
    last one's; a token event with no text (held back by the detokenizer) is not yielded on its own.
    After an item with text, the next one waits until ``interval_s`` has passed since it (collecting
    tokens meanwhile) unless the request finishes or another kind of event arrives first. With
    ``interval_s`` 0 only the tokens already queued are merged (a slow consumer still gets one item,
    not a backlog). The iteration never ends by itself: the caller stops at Finished / Failed."""
    clock = asyncio.get_running_loop().time
    pending = None  # an event taken while merging, yielded next
    sent_text = None  # when the last item with text was yielded
    while True:
        event, pending = (pending, None) if pending is not None else (await queue.get(), None)
        if not isinstance(event, TokenEvent):
            yield event
            continue
        delta, finish = event.delta, event.finish_reason
        hold_until = float("-inf") if sent_text is None else sent_text + interval_s
        while finish is None:
            if queue.empty():
                wait_s = hold_until - clock()
                if not delta or wait_s <= 0:  # nothing to hold back, or held long enough
                    break
                try:
                    more = await asyncio.wait_for(queue.get(), wait_s)
                except asyncio.TimeoutError:
                    break
            else:
                more = queue.get_nowait()
            if not isinstance(more, TokenEvent):
                pending = more
                break
            delta, finish = delta + more.delta, more.finish_reason
        if delta or finish:
            if delta:
                sent_text = clock()
            yield TokenEvent(row=event.row, delta=delta, finish_reason=finish)
