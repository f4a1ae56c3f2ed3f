"""Codecs for the four WireGuard messages (whitepaper §5.4), byte for byte as wireguard-go.

All integers are little-endian. Every message starts with a 4-byte header: one type byte followed by
three reserved zero bytes (so the header reads as the little-endian u32 1, 2, 3 or 4).

Handshake initiation, type 1, 148 bytes::

    0    type=1 | reserved 0,0,0          4
    4    sender index (u32 LE)            4
    8    unencrypted_ephemeral           32
    40   encrypted_static  (32 + 16 tag) 48
    88   encrypted_timestamp (12 + 16)   28
    116  mac1                            16
    132  mac2                            16

Handshake response, type 2, 92 bytes::

    0    type=2 | reserved 0,0,0          4
    4    sender index (u32 LE)            4
    8    receiver index (u32 LE)          4
    12   unencrypted_ephemeral           32
    44   encrypted_nothing (0 + 16 tag)  16
    60   mac1                            16
    76   mac2                            16

Cookie reply, type 3, 64 bytes::

    0    type=3 | reserved 0,0,0          4
    4    receiver index (u32 LE)          4
    8    nonce (XChaCha20 nonce)         24
    32   encrypted_cookie (16 + 16 tag)  32

Transport data, type 4, 32 bytes minimum (an empty, i.e. keepalive, payload is 16 bytes of tag)::

    0    type=4 | reserved 0,0,0          4
    4    receiver index (u32 LE)          4
    8    counter (u64 LE)                 8
    16   encrypted_encapsulated_packet   len(plaintext padded to 16) + 16

mac1 covers every byte before it; mac2 covers every byte before it (including mac1).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MESSAGE_INITIATION = 1
MESSAGE_RESPONSE = 2
MESSAGE_COOKIE_REPLY = 3
MESSAGE_TRANSPORT = 4

INITIATION_SIZE = 148
RESPONSE_SIZE = 92
COOKIE_REPLY_SIZE = 64
TRANSPORT_HEADER_SIZE = 16
TAG_SIZE = 16  # Poly1305 tag
TRANSPORT_MIN_SIZE = TRANSPORT_HEADER_SIZE + TAG_SIZE  # a keepalive
KEY_SIZE = 32
TIMESTAMP_SIZE = 12  # TAI64N
COOKIE_SIZE = 16
COOKIE_NONCE_SIZE = 24  # XChaCha20-Poly1305
MAC_SIZE = 16

ZERO_MAC = bytes(MAC_SIZE)

_INITIATION = struct.Struct("<II32s48s28s16s16s")
_RESPONSE = struct.Struct("<III32s16s16s16s")
_COOKIE_REPLY = struct.Struct("<II24s32s")
TRANSPORT_HEADER = struct.Struct("<IIQ")  # type word, receiver index, counter


class MalformedMessage(ValueError):
    """Bytes that do not parse as the expected message (wrong size, type or reserved bytes)."""


def _check(data: bytes | memoryview, size: int, mtype: int) -> None:
    if len(data) != size:
        raise MalformedMessage(f"type {mtype} message needs {size} bytes, got {len(data)}")
    if data[0] != mtype or data[1] or data[2] or data[3]:
        raise MalformedMessage(f"bad header for type {mtype}")


def _need(value: bytes, size: int, name: str) -> None:
    if len(value) != size:
        raise ValueError(f"{name} must be {size} bytes")


@dataclass(slots=True)
class MessageInitiation:
    sender: int
    ephemeral: bytes
    encrypted_static: bytes
    encrypted_timestamp: bytes
    mac1: bytes = ZERO_MAC
    mac2: bytes = ZERO_MAC

    def encode(self) -> bytes:
        _need(self.ephemeral, KEY_SIZE, "ephemeral")
        _need(self.encrypted_static, KEY_SIZE + TAG_SIZE, "encrypted_static")
        _need(self.encrypted_timestamp, TIMESTAMP_SIZE + TAG_SIZE, "encrypted_timestamp")
        _need(self.mac1, MAC_SIZE, "mac1")
        _need(self.mac2, MAC_SIZE, "mac2")
        return _INITIATION.pack(
            MESSAGE_INITIATION, self.sender, self.ephemeral, self.encrypted_static,
            self.encrypted_timestamp, self.mac1, self.mac2,
        )

    @classmethod
    def decode(cls, data: bytes | memoryview) -> MessageInitiation:
        _check(data, INITIATION_SIZE, MESSAGE_INITIATION)
        _, sender, eph, est, ets, m1, m2 = _INITIATION.unpack(data)
        return cls(sender, eph, est, ets, m1, m2)


@dataclass(slots=True)
class MessageResponse:
    sender: int
    receiver: int
    ephemeral: bytes
    encrypted_nothing: bytes
    mac1: bytes = ZERO_MAC
    mac2: bytes = ZERO_MAC

    def encode(self) -> bytes:
        _need(self.ephemeral, KEY_SIZE, "ephemeral")
        _need(self.encrypted_nothing, TAG_SIZE, "encrypted_nothing")
        _need(self.mac1, MAC_SIZE, "mac1")
        _need(self.mac2, MAC_SIZE, "mac2")
        return _RESPONSE.pack(
            MESSAGE_RESPONSE, self.sender, self.receiver, self.ephemeral,
            self.encrypted_nothing, self.mac1, self.mac2,
        )

    @classmethod
    def decode(cls, data: bytes | memoryview) -> MessageResponse:
        _check(data, RESPONSE_SIZE, MESSAGE_RESPONSE)
        _, sender, receiver, eph, enc, m1, m2 = _RESPONSE.unpack(data)
        return cls(sender, receiver, eph, enc, m1, m2)


@dataclass(slots=True)
class MessageCookieReply:
    receiver: int
    nonce: bytes
    encrypted_cookie: bytes

    def encode(self) -> bytes:
        _need(self.nonce, COOKIE_NONCE_SIZE, "nonce")
        _need(self.encrypted_cookie, COOKIE_SIZE + TAG_SIZE, "encrypted_cookie")
        return _COOKIE_REPLY.pack(
            MESSAGE_COOKIE_REPLY, self.receiver, self.nonce, self.encrypted_cookie
        )

    @classmethod
    def decode(cls, data: bytes | memoryview) -> MessageCookieReply:
        _check(data, COOKIE_REPLY_SIZE, MESSAGE_COOKIE_REPLY)
        _, receiver, nonce, enc = _COOKIE_REPLY.unpack(data)
        return cls(receiver, nonce, enc)


@dataclass(slots=True)
class MessageTransport:
    """Transport data. The device's hot path packs/unpacks TRANSPORT_HEADER directly instead."""

    receiver: int
    counter: int
    encrypted: bytes

    def encode(self) -> bytes:
        if len(self.encrypted) < TAG_SIZE:
            raise ValueError("encrypted payload shorter than a tag")
        return TRANSPORT_HEADER.pack(MESSAGE_TRANSPORT, self.receiver, self.counter) + bytes(
            self.encrypted
        )

    @classmethod
    def decode(cls, data: bytes | memoryview) -> MessageTransport:
        if len(data) < TRANSPORT_MIN_SIZE:
            raise MalformedMessage(f"transport message needs >= {TRANSPORT_MIN_SIZE} bytes")
        mtype, receiver, counter = TRANSPORT_HEADER.unpack_from(data)
        if mtype != MESSAGE_TRANSPORT:
            raise MalformedMessage("bad header for type 4")
        return cls(receiver, counter, bytes(data[TRANSPORT_HEADER_SIZE:]))


Message = MessageInitiation | MessageResponse | MessageCookieReply | MessageTransport


def decode(data: bytes | memoryview) -> Message:
    """Decode any WireGuard message by its type byte; MalformedMessage if it is none of them."""
    if len(data) < 4:
        raise MalformedMessage("shorter than a message header")
    t = data[0]
    if t == MESSAGE_INITIATION:
        return MessageInitiation.decode(data)
    if t == MESSAGE_RESPONSE:
        return MessageResponse.decode(data)
    if t == MESSAGE_COOKIE_REPLY:
        return MessageCookieReply.decode(data)
    if t == MESSAGE_TRANSPORT:
        return MessageTransport.decode(data)
    raise MalformedMessage(f"unknown message type {t}")
