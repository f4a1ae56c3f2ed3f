"""Typed Curve25519 keys.

Each kind of key has its own class so that a disco key can never be passed where a node key is
expected. Text forms carry a prefix (``nodekey:``, ``discokey:``, ``privkey:``) followed by
lowercase hex, like Tailscale; WireGuard-style base64 is accepted and produced too
(``to_base64``), because wg(8) and wg-quick files use it. ``short`` is the form for logs; a
private key never prints its material.
"""

from __future__ import annotations

import base64
import binascii
import os
from typing import ClassVar, Self

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

KEY_LEN = 32  # Curve25519 keys are 32 bytes


class KeyError_(ValueError):
    """A key string or byte string that is not a valid key."""


class _Key32:
    """32 immutable bytes with a text prefix."""

    PREFIX: ClassVar[str] = ""
    __slots__ = ("_raw",)

    def __init__(self, raw: bytes) -> None:
        if len(raw) != KEY_LEN:
            raise KeyError_(f"{type(self).__name__} needs {KEY_LEN} bytes, got {len(raw)}")
        self._raw = bytes(raw)

    @property
    def raw(self) -> bytes:
        return self._raw

    def __bytes__(self) -> bytes:
        return self._raw

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and isinstance(other, _Key32) and other._raw == self._raw

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._raw))

    def to_text(self) -> str:
        return f"{self.PREFIX}:{self._raw.hex()}"

    def to_base64(self) -> str:
        return base64.b64encode(self._raw).decode()

    @classmethod
    def parse(cls, text: str) -> Self:
        """Accept ``prefix:hex``, bare hex, or WireGuard base64."""
        s = text.strip()
        if ":" in s:
            prefix, _, body = s.partition(":")
            if prefix != cls.PREFIX:
                raise KeyError_(f"expected a {cls.PREFIX} key, got prefix {prefix!r}")
            s = body
        if len(s) == 2 * KEY_LEN:
            try:
                return cls(bytes.fromhex(s))
            except ValueError as e:
                raise KeyError_(f"bad hex in {cls.PREFIX} key") from e
        try:
            raw = base64.b64decode(s, validate=True)
        except binascii.Error as e:
            raise KeyError_(f"not a valid {cls.PREFIX} key (hex or base64)") from e
        return cls(raw)

    @classmethod
    def from_base64(cls, text: str) -> Self:
        return cls.parse(text)


class PublicKey(_Key32):
    """A Curve25519 public key; subclasses name its role."""

    PREFIX = "pubkey"

    @property
    def short(self) -> str:
        """Short form for logs and tables: ``[abcde]`` from the base64, like Tailscale."""
        return f"[{self.to_base64()[:5]}]"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.short})"

    def __str__(self) -> str:
        return self.to_text()


class NodeKey(PublicKey):
    """Identifies a node to WireGuard and DERP; rotates with node key expiry."""

    PREFIX = "nodekey"


class DiscoKey(PublicKey):
    """Seals disco messages (ping, pong, call-me-maybe, relay signalling); never used for data."""

    PREFIX = "discokey"


class MachineKey(PublicKey):
    """Long-lived machine identity towards the coordination server."""

    PREFIX = "mkey"


class PrivateKey(_Key32):
    """A Curve25519 private key. Its repr never shows the key material."""

    PREFIX = "privkey"

    @classmethod
    def generate(cls) -> Self:
        return cls(_clamp(os.urandom(KEY_LEN)))

    def public_raw(self) -> bytes:
        return X25519PrivateKey.from_private_bytes(self._raw).public_key().public_bytes(
            Encoding.Raw, PublicFormat.Raw
        )

    def node_public(self) -> NodeKey:
        return NodeKey(self.public_raw())

    def disco_public(self) -> DiscoKey:
        return DiscoKey(self.public_raw())

    def machine_public(self) -> MachineKey:
        return MachineKey(self.public_raw())

    def exchange(self, peer: PublicKey | bytes) -> bytes:
        """X25519 shared secret with ``peer``."""
        peer_raw = peer.raw if isinstance(peer, PublicKey) else peer
        return X25519PrivateKey.from_private_bytes(self._raw).exchange(
            X25519PublicKey.from_public_bytes(peer_raw)
        )

    def __repr__(self) -> str:
        return "PrivateKey(<redacted>)"

    def __str__(self) -> str:
        return "<redacted private key>"


def _clamp(raw: bytes) -> bytes:
    """RFC 7748 clamping, as wg genkey does, so key files match wg(8) byte for byte."""
    b = bytearray(raw)
    b[0] &= 248
    b[31] &= 127
    b[31] |= 64
    return bytes(b)
