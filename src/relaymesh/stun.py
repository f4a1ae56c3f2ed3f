"""RFC 5389 STUN binding request/response codec (sans-IO), plus RFC 5780 CHANGE-REQUEST.

Byte layout (all integers big-endian)::

    0                   1                   2                   3
    |0 0| message type (14 bits)  |      message length (bytes)   |   header: 20 bytes
    |                 magic cookie 0x2112A442                       |
    |                 transaction id (96 bits, 12 bytes)            |
    then attributes, each:  type (16) | length (16) | value, zero-padded to a multiple of 4

    message type = method bits interleaved with class bits C1 C0 (RFC 5389 section 6):
      binding request 0x0001, success response 0x0101, error response 0x0111

    (XOR-)MAPPED-ADDRESS value: 0x00 | family (0x01 IPv4, 0x02 IPv6) | port (16) | address (4/16)
      XOR form: port ^ (cookie >> 16); IPv4 address ^ cookie; IPv6 address ^ (cookie || txid)
    CHANGE-REQUEST value (RFC 5780): 32 bits, 0x4 = change IP, 0x2 = change port
    FINGERPRINT value: CRC-32 of the message up to (not including) this attribute, XOR 0x5354554E,
      computed with the header length already covering the FINGERPRINT attribute; always last.

Parsing never trusts lengths: anything malformed raises :class:`StunError` (a ValueError) and
callers in receive loops catch it, count it and drop the packet.
"""

from __future__ import annotations

import ipaddress
import os
import struct
import zlib
from dataclasses import dataclass, field

HEADER_LEN = 20
MAGIC_COOKIE = 0x2112A442  # RFC 5389 section 6: fixed value that tells STUN from other traffic
TXID_LEN = 12

# Message types (method binding 0x001 with the class bits).
BINDING_REQUEST = 0x0001
BINDING_SUCCESS = 0x0101
BINDING_ERROR = 0x0111

# Attribute types (RFC 5389 section 18.2; RFC 5780 section 7).
ATTR_MAPPED_ADDRESS = 0x0001
ATTR_CHANGE_REQUEST = 0x0003
ATTR_ERROR_CODE = 0x0009
ATTR_XOR_MAPPED_ADDRESS = 0x0020
ATTR_SOFTWARE = 0x8022
ATTR_FINGERPRINT = 0x8028
ATTR_RESPONSE_ORIGIN = 0x802B
ATTR_OTHER_ADDRESS = 0x802C

FINGERPRINT_XOR = 0x5354554E  # RFC 5389 section 15.5: "STUN" XOR-ed into the CRC
CHANGE_IP = 0x4  # RFC 5780 section 7.2
CHANGE_PORT = 0x2

FAMILY_V4 = 0x01
FAMILY_V6 = 0x02

Addr = tuple[str, int]


class StunError(ValueError):
    """Malformed or unexpected STUN bytes."""


@dataclass
class StunMessage:
    msg_type: int
    txid: bytes
    attributes: list[tuple[int, bytes]] = field(default_factory=list)
    fingerprint_ok: bool | None = None  # None: no FINGERPRINT attribute present

    def get(self, attr_type: int) -> bytes | None:
        for t, v in self.attributes:
            if t == attr_type:
                return v
        return None

    @property
    def mapped_address(self) -> Addr | None:
        """XOR-MAPPED-ADDRESS, or the legacy MAPPED-ADDRESS when that is all there is."""
        v = self.get(ATTR_XOR_MAPPED_ADDRESS)
        if v is not None:
            return decode_address(v, self.txid, xor=True)
        v = self.get(ATTR_MAPPED_ADDRESS)
        return None if v is None else decode_address(v, self.txid, xor=False)

    @property
    def change_request(self) -> int:
        v = self.get(ATTR_CHANGE_REQUEST)
        if v is None:
            return 0
        if len(v) != 4:
            raise StunError("CHANGE-REQUEST must be 4 bytes")
        return int.from_bytes(v, "big") & (CHANGE_IP | CHANGE_PORT)

    @property
    def response_origin(self) -> Addr | None:
        v = self.get(ATTR_RESPONSE_ORIGIN)
        return None if v is None else decode_address(v, self.txid, xor=False)


def new_transaction_id() -> bytes:
    """96 random bits (RFC 5389 section 6: must be uniformly random)."""
    return os.urandom(TXID_LEN)


def is_stun(data: bytes) -> bool:
    """Cheap demultiplexing check: top two bits zero and the magic cookie in place."""
    return (
        len(data) >= HEADER_LEN
        and data[0] & 0xC0 == 0
        and int.from_bytes(data[4:8], "big") == MAGIC_COOKIE
    )


def encode_address(addr: Addr, txid: bytes, *, xor: bool) -> bytes:
    host, port = addr
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise StunError(f"not an IP address: {host!r}") from None
    if not 0 <= port <= 0xFFFF:
        raise StunError(f"bad port {port}")
    raw = ip.packed
    family = FAMILY_V4 if ip.version == 4 else FAMILY_V6
    if xor:
        port ^= MAGIC_COOKIE >> 16
        key = MAGIC_COOKIE.to_bytes(4, "big") + txid
        raw = bytes(a ^ b for a, b in zip(raw, key, strict=False))
    return struct.pack("!BBH", 0, family, port) + raw


def decode_address(value: bytes, txid: bytes, *, xor: bool) -> Addr:
    if len(value) < 4:
        raise StunError("address attribute too short")
    _, family, port = struct.unpack("!BBH", value[:4])
    raw = value[4:]
    if (family, len(raw)) not in ((FAMILY_V4, 4), (FAMILY_V6, 16)):
        raise StunError(f"bad address family {family} / length {len(raw)}")
    if xor:
        port ^= MAGIC_COOKIE >> 16
        key = MAGIC_COOKIE.to_bytes(4, "big") + txid
        raw = bytes(a ^ b for a, b in zip(raw, key, strict=False))
    return str(ipaddress.ip_address(raw)), port


def _attr(t: int, v: bytes) -> bytes:
    pad = (-len(v)) % 4
    return struct.pack("!HH", t, len(v)) + v + b"\x00" * pad


def encode(msg_type: int, txid: bytes, attributes: list[tuple[int, bytes]], *,
           fingerprint: bool = False) -> bytes:
    """Serialise a message; FINGERPRINT (if asked) is appended last as the RFC requires."""
    if len(txid) != TXID_LEN:
        raise StunError("transaction id must be 12 bytes")
    if msg_type & 0xC000:
        raise StunError("message type has the top two bits set")
    body = b"".join(_attr(t, v) for t, v in attributes)
    if not fingerprint:
        return struct.pack("!HHI", msg_type, len(body), MAGIC_COOKIE) + txid + body
    head = struct.pack("!HHI", msg_type, len(body) + 8, MAGIC_COOKIE) + txid + body
    crc = (zlib.crc32(head) ^ FINGERPRINT_XOR) & 0xFFFFFFFF
    return head + _attr(ATTR_FINGERPRINT, crc.to_bytes(4, "big"))


def decode(data: bytes) -> StunMessage:
    """Parse one STUN message; raises StunError on anything malformed."""
    if len(data) < HEADER_LEN:
        raise StunError(f"too short for a STUN header ({len(data)} bytes)")
    msg_type, length, cookie = struct.unpack("!HHI", data[:8])
    if msg_type & 0xC000:
        raise StunError("top two bits of the message type are not zero")
    if cookie != MAGIC_COOKIE:
        raise StunError("bad magic cookie")
    if length % 4:
        raise StunError("message length is not a multiple of 4")
    if HEADER_LEN + length != len(data):
        raise StunError(f"length field {length} does not match {len(data) - HEADER_LEN} bytes")
    txid = bytes(data[8:20])
    attrs: list[tuple[int, bytes]] = []
    fp_ok: bool | None = None
    off = HEADER_LEN
    while off < len(data):
        if off + 4 > len(data):
            raise StunError("truncated attribute header")
        t, alen = struct.unpack("!HH", data[off : off + 4])
        vstart = off + 4
        vend = vstart + alen
        if vend > len(data):
            raise StunError(f"attribute 0x{t:04x} overruns the message")
        if fp_ok is not None:
            raise StunError("attribute after FINGERPRINT")
        value = bytes(data[vstart:vend])
        if t == ATTR_FINGERPRINT:
            if alen != 4:
                raise StunError("FINGERPRINT must be 4 bytes")
            crc = (zlib.crc32(data[:off]) ^ FINGERPRINT_XOR) & 0xFFFFFFFF
            fp_ok = crc == int.from_bytes(value, "big")
        else:
            attrs.append((t, value))
        off = vend + ((-alen) % 4)
    if off != len(data):
        raise StunError("attribute padding runs past the message")
    if fp_ok is False:
        raise StunError("FINGERPRINT mismatch")
    return StunMessage(msg_type, txid, attrs, fp_ok)


def binding_request(txid: bytes | None = None, *, change_ip: bool = False,
                    change_port: bool = False, fingerprint: bool = False) -> tuple[bytes, bytes]:
    """A binding request; returns (txid, bytes). CHANGE-REQUEST only when a flag is set."""
    txid = txid or new_transaction_id()
    attrs: list[tuple[int, bytes]] = []
    flags = (CHANGE_IP if change_ip else 0) | (CHANGE_PORT if change_port else 0)
    if flags:
        attrs.append((ATTR_CHANGE_REQUEST, flags.to_bytes(4, "big")))
    return txid, encode(BINDING_REQUEST, txid, attrs, fingerprint=fingerprint)


def binding_response(txid: bytes, mapped: Addr, *, origin: Addr | None = None,
                     fingerprint: bool = False) -> bytes:
    """A binding success response carrying XOR-MAPPED-ADDRESS (and RESPONSE-ORIGIN if given)."""
    attrs = [(ATTR_XOR_MAPPED_ADDRESS, encode_address(mapped, txid, xor=True))]
    if origin is not None:
        attrs.append((ATTR_RESPONSE_ORIGIN, encode_address(origin, txid, xor=False)))
    return encode(BINDING_SUCCESS, txid, attrs, fingerprint=fingerprint)


def parse_binding_response(data: bytes, txid: bytes | None = None) -> Addr:
    """The mapped address from a success response (checking the txid when given)."""
    msg = decode(data)
    if msg.msg_type != BINDING_SUCCESS:
        raise StunError(f"not a binding success response (type 0x{msg.msg_type:04x})")
    if txid is not None and msg.txid != txid:
        raise StunError("transaction id mismatch")
    mapped = msg.mapped_address
    if mapped is None:
        raise StunError("success response without a mapped address")
    return mapped
