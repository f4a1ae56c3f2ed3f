"""Sliding replay window for transport counters (whitepaper §5.4.6, RFC 6479 ring of bitmap blocks).

The window is a ring of RING_BLOCKS 64-bit words. Counter ``c`` lives in block ``c >> 6`` at bit
``c & 63``. Moving the window forward clears the blocks skipped over (at most the whole ring), so
each update is O(1) amortised and never shifts a big bitmap. A counter is accepted iff it is below
REJECT_AFTER_MESSAGES, has not been accepted before, and is no more than WINDOW_SIZE behind the
greatest counter accepted so far. Call :meth:`ReplayWindow.check_and_update` only after the packet
authenticated, so a forged counter cannot move the window.
"""

from __future__ import annotations

from .timers import REJECT_AFTER_MESSAGES

BLOCK_BITS = 64
RING_BLOCKS = 128  # 8192 bits, as wireguard-go
_RING_MASK = RING_BLOCKS - 1
WINDOW_SIZE = (RING_BLOCKS - 1) * BLOCK_BITS  # 8128: one block is always being refilled


class ReplayWindow:
    __slots__ = ("_limit", "_ring", "last")

    def __init__(self, reject_after_messages: int = REJECT_AFTER_MESSAGES) -> None:
        self.last = 0  # greatest counter accepted (0 before any)
        self._ring = [0] * RING_BLOCKS
        self._limit = reject_after_messages

    def check_and_update(self, counter: int) -> bool:
        """True (and remember it) if ``counter`` is fresh; False for a replay or a too-old one."""
        last = self.last
        if counter > last:
            # Moving forward (the common case). A counter above the greatest one accepted cannot
            # have been seen: its block is either the current one (bits above `last` are clear)
            # or one of the blocks cleared here.
            if counter >= self._limit:
                return False
            ring = self._ring
            block = counter >> 6
            current = last >> 6
            if block != current:
                diff = block - current
                if diff > RING_BLOCKS:
                    diff = RING_BLOCKS
                for i in range(current + 1, current + diff + 1):
                    ring[i & _RING_MASK] = 0
            self.last = counter
            ring[block & _RING_MASK] |= 1 << (counter & 63)
            return True
        if last - counter > WINDOW_SIZE:
            return False
        ring = self._ring
        idx = (counter >> 6) & _RING_MASK
        bit = 1 << (counter & 63)
        word = ring[idx]
        if word & bit:
            return False
        ring[idx] = word | bit
        return True
