"""Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s as WireGuard uses it (whitepaper §5.4).

Primitives (whitepaper §5.4): HASH = BLAKE2s-256, MAC = keyed BLAKE2s-128, HMAC = HMAC-BLAKE2s-256,
KDF_n = HKDF built on that HMAC, AEAD = ChaCha20-Poly1305 with a 96-bit nonce of 32 zero bits
followed by the 64-bit little-endian counter, DH = X25519.

The handshake functions take the local identity, a per-peer :class:`Handshake` and a decoded
message, update the Handshake and return the next message, or raise :class:`HandshakeError` with a
short reason (used as the device's drop-counter key). :mod:`.cookie` adds and checks the MACs.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from . import messages as m

CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"  # whitepaper §5.4: protocol name
IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"  # whitepaper §5.4: prologue
LABEL_MAC1 = b"mac1----"  # whitepaper §5.4.4
LABEL_COOKIE = b"cookie--"  # whitepaper §5.4.7
ZERO_KEY = bytes(32)
HANDSHAKE_INITIATION_RATE = 1.0 / 50  # wireguard-go: at most 50 initiations/s consumed per peer

_NONCE = struct.Struct("<4xQ")  # 32 zero bits then the 64-bit LE counter


def hash_(*parts: bytes) -> bytes:
    """HASH(a || b || ...): BLAKE2s with a 32-byte digest."""
    h = hashlib.blake2s()
    for p in parts:
        h.update(p)
    return h.digest()


def mac(key: bytes, data: bytes | memoryview) -> bytes:
    """MAC(key, data): keyed BLAKE2s with a 16-byte digest (mac1, mac2, cookies)."""
    return hashlib.blake2s(data, digest_size=16, key=key).digest()


def hmac_(key: bytes, data: bytes) -> bytes:
    """HMAC-BLAKE2s-256 (RFC 2104 over BLAKE2s, block size 64)."""
    return hmac.digest(key, data, hashlib.blake2s)


def kdf1(ck: bytes, data: bytes) -> bytes:
    t0 = hmac_(ck, data)
    return hmac_(t0, b"\x01")


def kdf2(ck: bytes, data: bytes) -> tuple[bytes, bytes]:
    t0 = hmac_(ck, data)
    t1 = hmac_(t0, b"\x01")
    return t1, hmac_(t0, t1 + b"\x02")


def kdf3(ck: bytes, data: bytes) -> tuple[bytes, bytes, bytes]:
    t0 = hmac_(ck, data)
    t1 = hmac_(t0, b"\x01")
    t2 = hmac_(t0, t1 + b"\x02")
    return t1, t2, hmac_(t0, t2 + b"\x03")


def nonce(counter: int) -> bytes:
    return _NONCE.pack(counter)


def aead_encrypt(key: bytes, counter: int, plaintext: bytes, ad: bytes) -> bytes:
    return ChaCha20Poly1305(key).encrypt(_NONCE.pack(counter), plaintext, ad)


def aead_decrypt(key: bytes, counter: int, ciphertext: bytes, ad: bytes) -> bytes:
    """Raises HandshakeError on a bad tag."""
    try:
        return ChaCha20Poly1305(key).decrypt(_NONCE.pack(counter), ciphertext, ad)
    except InvalidTag as e:
        raise HandshakeError("bad_auth") from e


def public_bytes(priv: X25519PrivateKey) -> bytes:
    return priv.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def dh(priv: X25519PrivateKey, public: bytes) -> bytes:
    """X25519; a low-order public key (all-zero result) is a HandshakeError, as in wireguard-go."""
    try:
        shared = priv.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as e:
        raise HandshakeError("bad_public_key") from e
    if shared == ZERO_KEY:
        raise HandshakeError("bad_public_key")
    return shared


INITIAL_CHAIN_KEY = hash_(CONSTRUCTION)  # Ci = HASH(CONSTRUCTION)
INITIAL_HASH = hash_(INITIAL_CHAIN_KEY, IDENTIFIER)  # Hi = HASH(Ci || IDENTIFIER)


class HandshakeError(Exception):
    """A handshake message failed; ``reason`` is the drop-counter key."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class State(enum.Enum):
    ZEROED = 0
    INITIATION_CREATED = 1
    INITIATION_CONSUMED = 2
    RESPONSE_CREATED = 3
    RESPONSE_CONSUMED = 4


@dataclass(slots=True)
class StaticIdentity:
    """Our static key pair plus the values derived from it once."""

    private: X25519PrivateKey
    public: bytes

    @classmethod
    def from_raw(cls, raw_private: bytes) -> StaticIdentity:
        priv = X25519PrivateKey.from_private_bytes(raw_private)
        return cls(priv, public_bytes(priv))


@dataclass(slots=True)
class Handshake:
    """Per-peer handshake state (wireguard-go's Handshake struct)."""

    remote_static: bytes
    preshared_key: bytes = ZERO_KEY
    precomputed_static_static: bytes = ZERO_KEY  # DH(S_priv, S_remote), fixed per peer
    state: State = State.ZEROED
    hash: bytes = ZERO_KEY
    chain_key: bytes = ZERO_KEY
    local_ephemeral: X25519PrivateKey | None = None
    remote_ephemeral: bytes = ZERO_KEY
    local_index: int | None = None
    remote_index: int = 0
    latest_timestamp: bytes = bytes(12)  # greatest TAI64N accepted from this peer
    last_initiation_consumption: float = float("-inf")
    initiator_hash0: bytes = field(default=ZERO_KEY)  # HASH(Hi || S_remote), precomputed

    def zero(self) -> None:
        """Forget ephemeral material; keep the per-peer precomputations and the timestamp."""
        self.state = State.ZEROED
        self.hash = ZERO_KEY
        self.chain_key = ZERO_KEY
        self.local_ephemeral = None
        self.remote_ephemeral = ZERO_KEY
        self.remote_index = 0


def new_handshake(local: StaticIdentity, remote_static: bytes, psk: bytes | None) -> Handshake:
    """Per-peer state with the peer-constant values precomputed (DH(Si,Sr), HASH(Hi || Sr))."""
    try:
        ss = dh(local.private, remote_static)
    except HandshakeError:
        ss = ZERO_KEY  # a bogus peer key: handshakes with it will simply fail
    return Handshake(
        remote_static=remote_static,
        preshared_key=psk if psk is not None else ZERO_KEY,
        precomputed_static_static=ss,
        initiator_hash0=hash_(INITIAL_HASH, remote_static),
    )


def create_initiation(
    local: StaticIdentity,
    hs: Handshake,
    sender_index: int,
    timestamp: bytes,
    ephemeral: X25519PrivateKey | None = None,
) -> m.MessageInitiation:
    """Message 1 (whitepaper §5.4.2), MACs left zero."""
    if hs.precomputed_static_static == ZERO_KEY:
        raise HandshakeError("bad_public_key")
    eph = ephemeral if ephemeral is not None else X25519PrivateKey.generate()
    eph_pub = public_bytes(eph)
    ck = INITIAL_CHAIN_KEY
    h = hs.initiator_hash0  # HASH(HASH(Ci || IDENTIFIER) || Sr_pub)
    ck = kdf1(ck, eph_pub)
    h = hash_(h, eph_pub)
    ck, k = kdf2(ck, dh(eph, hs.remote_static))
    enc_static = aead_encrypt(k, 0, local.public, h)
    h = hash_(h, enc_static)
    ck, k = kdf2(ck, hs.precomputed_static_static)
    enc_ts = aead_encrypt(k, 0, timestamp, h)
    h = hash_(h, enc_ts)
    hs.state = State.INITIATION_CREATED
    hs.hash, hs.chain_key, hs.local_ephemeral = h, ck, eph
    hs.local_index = sender_index
    return m.MessageInitiation(sender_index, eph_pub, enc_static, enc_ts)


def consume_initiation(
    local: StaticIdentity,
    msg: m.MessageInitiation,
    lookup: Callable[[bytes], Handshake | None],
    now: float,
) -> Handshake:
    """Responder side of message 1; returns the sending peer's Handshake, updated.

    ``lookup`` maps the decrypted static key to that peer's Handshake (None: unknown peer). The
    timestamp must be strictly greater than the last one accepted from the peer (replay protection)
    and at most one initiation per HANDSHAKE_INITIATION_RATE is accepted per peer (flood guard).
    """
    ck = INITIAL_CHAIN_KEY
    h = hash_(INITIAL_HASH, local.public)
    ck = kdf1(ck, msg.ephemeral)
    h = hash_(h, msg.ephemeral)
    ck, k = kdf2(ck, dh(local.private, msg.ephemeral))
    try:
        static = aead_decrypt(k, 0, msg.encrypted_static, h)
    except HandshakeError as e:
        raise HandshakeError("bad_initiation") from e
    h = hash_(h, msg.encrypted_static)
    hs = lookup(static)
    if hs is None:
        raise HandshakeError("unknown_peer")
    if hs.precomputed_static_static == ZERO_KEY:
        raise HandshakeError("bad_public_key")
    ck, k = kdf2(ck, hs.precomputed_static_static)
    try:
        timestamp = aead_decrypt(k, 0, msg.encrypted_timestamp, h)
    except HandshakeError as e:
        raise HandshakeError("bad_initiation") from e
    h = hash_(h, msg.encrypted_timestamp)
    if timestamp <= hs.latest_timestamp:
        raise HandshakeError("replayed_initiation")
    if now - hs.last_initiation_consumption < HANDSHAKE_INITIATION_RATE:
        raise HandshakeError("initiation_flood")
    hs.latest_timestamp = timestamp
    hs.last_initiation_consumption = now
    hs.state = State.INITIATION_CONSUMED
    hs.hash, hs.chain_key = h, ck
    hs.remote_ephemeral = msg.ephemeral
    hs.remote_index = msg.sender
    hs.local_ephemeral = None
    return hs


def create_response(
    hs: Handshake, sender_index: int, ephemeral: X25519PrivateKey | None = None
) -> m.MessageResponse:
    """Message 2 (whitepaper §5.4.3), MACs left zero."""
    if hs.state is not State.INITIATION_CONSUMED:
        raise HandshakeError("bad_state")
    eph = ephemeral if ephemeral is not None else X25519PrivateKey.generate()
    eph_pub = public_bytes(eph)
    ck, h = hs.chain_key, hs.hash
    ck = kdf1(ck, eph_pub)
    h = hash_(h, eph_pub)
    ck = kdf1(ck, dh(eph, hs.remote_ephemeral))
    ck = kdf1(ck, dh(eph, hs.remote_static))
    ck, tau, k = kdf3(ck, hs.preshared_key)
    h = hash_(h, tau)
    enc_nothing = aead_encrypt(k, 0, b"", h)
    h = hash_(h, enc_nothing)
    hs.state = State.RESPONSE_CREATED
    hs.hash, hs.chain_key = h, ck
    hs.local_index = sender_index
    return m.MessageResponse(sender_index, hs.remote_index, eph_pub, enc_nothing)


def consume_response(local: StaticIdentity, hs: Handshake, msg: m.MessageResponse) -> None:
    """Initiator side of message 2; on success ``hs`` is in RESPONSE_CONSUMED."""
    if hs.state is not State.INITIATION_CREATED or hs.local_ephemeral is None:
        raise HandshakeError("unexpected_response")
    ck, h = hs.chain_key, hs.hash
    ck = kdf1(ck, msg.ephemeral)
    h = hash_(h, msg.ephemeral)
    ck = kdf1(ck, dh(hs.local_ephemeral, msg.ephemeral))
    ck = kdf1(ck, dh(local.private, msg.ephemeral))
    ck, tau, k = kdf3(ck, hs.preshared_key)
    h = hash_(h, tau)
    try:
        aead_decrypt(k, 0, msg.encrypted_nothing, h)
    except HandshakeError as e:
        raise HandshakeError("bad_response") from e
    h = hash_(h, msg.encrypted_nothing)
    hs.state = State.RESPONSE_CONSUMED
    hs.hash, hs.chain_key = h, ck
    hs.remote_index = msg.sender
    hs.remote_ephemeral = msg.ephemeral
    hs.local_ephemeral = None


def derive_transport_keys(hs: Handshake) -> tuple[bytes, bytes, bool]:
    """(send key, receive key, is_initiator) from a completed handshake (whitepaper §5.4.5).

    The chaining key and ephemerals are wiped afterwards: forward secrecy.
    """
    if hs.state is State.RESPONSE_CONSUMED:
        send, recv = kdf2(hs.chain_key, b"")
        initiator = True
    elif hs.state is State.RESPONSE_CREATED:
        recv, send = kdf2(hs.chain_key, b"")
        initiator = False
    else:
        raise HandshakeError("bad_state")
    hs.zero()
    return send, recv, initiator
