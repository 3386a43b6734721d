"""The catalog prepares versions in threads at a lower CPU priority than the controller's own (Linux)."""

from __future__ import annotations

import asyncio
import os
import sys
import threading

import pytest

from hotswap import catalog


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread priorities are Linux's")
def test_preparing_threads_run_at_a_lower_priority_than_the_caller():
    def priority() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    mine = priority()
    if mine >= 19:  # the lowest priority already: no thread can go lower, so the check could not fail
        pytest.skip("the test process runs at nice 19; run it at a higher priority")
    theirs = asyncio.run(catalog._background(priority))
    assert theirs == min(19, mine + catalog.PREPARE_NICE) and theirs > mine
    # control: the default executor (what the catalog used before) runs at the caller's priority
    assert asyncio.run(asyncio.to_thread(priority)) == mine
