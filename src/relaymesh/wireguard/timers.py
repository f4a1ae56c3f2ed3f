"""WireGuard protocol constants and the tunable timer set (whitepaper §6.1, §6.2-§6.5).

The device reads every duration from a :class:`Timers` instance so that tests and the lab can
shorten them; the defaults are the whitepaper's values. Nothing here reads a clock: the device is
driven by the ``now`` its caller passes in.
"""

from __future__ import annotations

from dataclasses import dataclass

REKEY_AFTER_MESSAGES = 2**60  # §6.1: initiate a new handshake after this many messages sent
REJECT_AFTER_MESSAGES = 2**64 - 2**13 - 1  # §6.1: hard limit per key (nonce space minus window)
REKEY_AFTER_TIME = 120.0  # §6.1: the initiator rekeys a session this old when it sends
REJECT_AFTER_TIME = 180.0  # §6.1: a session this old is unusable in either direction
REKEY_ATTEMPT_TIME = 90.0  # §6.1: give up retrying a handshake after this long
REKEY_TIMEOUT = 5.0  # §6.1: retransmit an unanswered initiation after this (+ jitter)
REKEY_TIMEOUT_JITTER_MAX = 0.333  # §6.1: up to 333 ms random jitter on each retransmission
KEEPALIVE_TIMEOUT = 10.0  # §6.1: send a keepalive if we received data but sent nothing this long
COOKIE_REFRESH_TIME = 120.0  # §6.1: lifetime of a cookie and of the responder's cookie secret
MAX_STAGED_PACKETS = 128  # wireguard-go QueueStagedSize: packets held while a handshake runs


@dataclass(slots=True)
class Timers:
    """Defaults = whitepaper values; tests and the lab may shorten them."""

    rekey_after_messages: int = REKEY_AFTER_MESSAGES
    reject_after_messages: int = REJECT_AFTER_MESSAGES
    rekey_after_time: float = REKEY_AFTER_TIME
    reject_after_time: float = REJECT_AFTER_TIME
    rekey_attempt_time: float = REKEY_ATTEMPT_TIME
    rekey_timeout: float = REKEY_TIMEOUT
    keepalive_timeout: float = KEEPALIVE_TIMEOUT
    cookie_refresh_time: float = COOKIE_REFRESH_TIME
    rekey_timeout_jitter: float = REKEY_TIMEOUT_JITTER_MAX

    def scaled(self, factor: float) -> Timers:
        """All durations times ``factor`` (message counts unchanged): for lab rekey tests."""
        return Timers(
            rekey_after_messages=self.rekey_after_messages,
            reject_after_messages=self.reject_after_messages,
            rekey_after_time=self.rekey_after_time * factor,
            reject_after_time=self.reject_after_time * factor,
            rekey_attempt_time=self.rekey_attempt_time * factor,
            rekey_timeout=self.rekey_timeout * factor,
            keepalive_timeout=self.keepalive_timeout * factor,
            cookie_refresh_time=self.cookie_refresh_time * factor,
            rekey_timeout_jitter=self.rekey_timeout_jitter * factor,
        )
