"""TAI64N timestamps for the handshake initiation (whitepaper §5.1, §5.4.2).

Layout, 12 bytes, big-endian (unlike the rest of WireGuard)::

    0   seconds: 2**62 + 10 + unix seconds (u64 BE)   8
    8   nanoseconds (u32 BE)                          4

The responder keeps the greatest timestamp seen per peer and rejects any initiation whose timestamp
is not strictly greater: that is WireGuard's replay protection for message 1. Bytes compare in the
same order as the times they encode, so a plain ``>`` on the 12-byte strings is the comparison.

Like wireguard-go we clear the low 24 bits of the nanoseconds ("whitening", ~16.8 ms granularity) so
that the timestamp is not a precise clock oracle for an observer who can decrypt it later.
"""

from __future__ import annotations

import struct

TAI64_BASE = 2**62 + 10  # TAI64 label of the unix epoch (+10 s TAI-UTC offset, as wireguard-go)
WHITENER_MASK = 0x1000000 - 1  # low 24 bits of nanoseconds cleared, as wireguard-go
TIMESTAMP_SIZE = 12
_TAI64N = struct.Struct(">QI")


def encode(unix_time: float, *, whiten: bool = True) -> bytes:
    """Encode ``unix_time`` (seconds since 1970, may be fractional) as TAI64N."""
    secs = int(unix_time // 1)
    nanos = round((unix_time - secs) * 1e9)
    if nanos >= 1_000_000_000:
        secs, nanos = secs + 1, nanos - 1_000_000_000
    if whiten:
        nanos &= ~WHITENER_MASK
    return _TAI64N.pack(TAI64_BASE + secs, nanos)


def decode(stamp: bytes) -> tuple[int, int]:
    """Return (unix seconds, nanoseconds) of a 12-byte TAI64N timestamp."""
    if len(stamp) != TIMESTAMP_SIZE:
        raise ValueError("TAI64N timestamp must be 12 bytes")
    label, nanos = _TAI64N.unpack(stamp)
    return label - TAI64_BASE, nanos
