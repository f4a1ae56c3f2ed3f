"""Polling helper shared by the asyncio unit tests (imported as a plain module, like conftest)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def wait_for(cond: Callable[[], bool], timeout: float = 3.0, what: str = "") -> None:
    """Poll ``cond`` every 10 ms on the running loop; AssertionError after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or cond}")
        await asyncio.sleep(0.01)
