"""Polling helpers shared by the unit tests (imported as a plain module, like conftest): an async
one for tests on an event loop, a blocking one for tests of the threaded datapaths."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def wait_for(cond: Callable[[], bool], timeout: float = 3.0, what: str = "") -> None:
    """Poll ``cond`` every 10 ms on the running loop; AssertionError after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or cond}")
        await asyncio.sleep(0.01)


def poll_until(cond: Callable[[], bool], timeout: float = 3.0) -> bool:
    """Poll ``cond`` every 5 ms from this thread; whether it held within ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.005)
    return False
