"""Reconnect backoff of the control loop: doubling, capped at 30 s, jittered."""

from __future__ import annotations

from relaymesh.node.backend import BACKOFF_CAP, backoff_delay


def test_backoff_doubles_to_the_cap_with_jitter() -> None:
    top = [backoff_delay(n, lambda lo, hi: hi) for n in range(10)]
    assert top[:4] == [0.5, 1.0, 2.0, 4.0]
    assert max(top) == BACKOFF_CAP == 30.0 and top[-1] == 30.0
    assert backoff_delay(100, lambda lo, hi: lo) == 15.0  # jitter: never below half
