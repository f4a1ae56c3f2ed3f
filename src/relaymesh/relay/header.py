"""The 8-byte Geneve-style header on every packet of a peer-relay path.

Layout (big-endian), modelled on Geneve (RFC 8926) with no options::

    byte 0   version (top 2 bits, VERSION = 0) | option length (low 6 bits, must be 0)
    byte 1   control bit (0x80): set = for the relay itself (bind/challenge/answer),
             clear = forward to the other side;
             the other 7 bits are reserved and must be 0
    2..3     protocol of what follows: PROTO_DISCO (0x5244, "RD") or PROTO_WIREGUARD (0x5257, "RW")
    4..6     session id (VNI), 24 bits
    7        reserved, must be 0

Why it cannot be confused with the node's other UDP traffic: WireGuard messages start with a type
byte 1..4, disco with "R", and STUN carries the magic cookie 0x2112A442 at bytes 4..7 (byte 7 is
0x42, ours is 0). Data packets (control clear) are forwarded unmodified, header included; the relay
reads only bytes 1 and 4..6 on that hot path.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

HEADER_LEN = 8
VERSION = 0  # top two bits of byte 0
CONTROL_BIT = 0x80  # byte 1
PROTO_DISCO = 0x5244  # "RD": a sealed disco packet follows
PROTO_WIREGUARD = 0x5257  # "RW": a WireGuard packet follows
PROTOCOLS = frozenset({PROTO_DISCO, PROTO_WIREGUARD})
# bytes 0..3 of every relay-framed WireGuard data packet (version 0, no options, control clear):
# one compare tells a receiving node's datapath it is WireGuard for the device, not disco
WIREGUARD_PREFIX = bytes([VERSION << 6, 0]) + PROTO_WIREGUARD.to_bytes(2, "big")
MAX_SESSION_ID = (1 << 24) - 1  # 24-bit VNI

_HDR = struct.Struct(">BBHI")  # VNI and the reserved byte share the last 32 bits


class HeaderError(ValueError):
    """Not a valid relay header: drop the packet and count it."""


@dataclass(frozen=True, slots=True)
class RelayHeader:
    control: bool
    protocol: int
    session_id: int
    version: int = VERSION


def encode_header(session_id: int, protocol: int, control: bool = False) -> bytes:
    """The 8 header bytes; prepend them to the disco or WireGuard packet."""
    if not 0 <= session_id <= MAX_SESSION_ID:
        raise HeaderError(f"session id {session_id} does not fit 24 bits")
    if protocol not in PROTOCOLS:
        raise HeaderError(f"unknown relay protocol {protocol:#06x}")
    return _HDR.pack(VERSION << 6, CONTROL_BIT if control else 0, protocol, session_id << 8)


def decode_header(data: bytes | bytearray | memoryview) -> RelayHeader:
    """Parse and validate the header at the start of ``data``; raises HeaderError."""
    if len(data) < HEADER_LEN:
        raise HeaderError(f"relay packet shorter than {HEADER_LEN} bytes")
    b0, b1, proto, tail = _HDR.unpack_from(data)
    if b0 >> 6 != VERSION:
        raise HeaderError(f"unknown relay header version {b0 >> 6}")
    if b0 & 0x3F:
        raise HeaderError("relay header options are not supported")
    if b1 & ~CONTROL_BIT & 0xFF:
        raise HeaderError("reserved flag bits set")
    if tail & 0xFF:
        raise HeaderError("reserved byte set")
    if proto not in PROTOCOLS:
        raise HeaderError(f"unknown relay protocol {proto:#06x}")
    return RelayHeader(control=bool(b1 & CONTROL_BIT), protocol=proto, session_id=tail >> 8)


def is_control(data: bytes | bytearray | memoryview) -> bool:
    """Cheap: does this look like a packet for the relay itself (not to be forwarded)?"""
    return len(data) >= HEADER_LEN and bool(data[1] & CONTROL_BIT)


def looks_like_relay(data: bytes | bytearray | memoryview) -> bool:
    """Cheap classifier check for magicsock: version/options byte 0 and a known protocol."""
    return (
        len(data) >= HEADER_LEN
        and data[0] == 0
        and data[7] == 0
        and int.from_bytes(data[2:4], "big") in PROTOCOLS
    )
