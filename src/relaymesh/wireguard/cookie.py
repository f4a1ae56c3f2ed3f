"""mac1, mac2 and cookie replies: WireGuard's DoS mitigation (whitepaper §5.3, §5.4.4, §5.4.7).

- mac1 = MAC(HASH(LABEL_MAC1 || receiver's static public), msg[:mac1 offset]) is always present: a
  handshake message without it is dropped before any Curve25519 work.
- Under load a responder also wants mac2 = MAC(cookie, msg[:mac2 offset]) where
  cookie = MAC(R_secret, sender ip || port) and R_secret changes every COOKIE_REFRESH_TIME. A
  message without a valid mac2 is answered with a cookie reply instead of being processed.
- The cookie reply carries the cookie encrypted with XChaCha20-Poly1305 under
  HASH(LABEL_COOKIE || responder's static public), random 24-byte nonce, and the mac1 of the message
  it answers as associated data (so only the real sender of that message can use it).

:class:`CookieChecker` is the receiving side (one per device, keyed by our public key);
:class:`CookieGenerator` is the sending side (one per peer, keyed by the peer's public key).
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Callable, Hashable

from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
)
from nacl.exceptions import CryptoError

from . import messages as m
from .noise import LABEL_COOKIE, LABEL_MAC1, hash_, mac

COOKIE_REFRESH_TIME = 120.0  # whitepaper §6.1: R_secret and received cookies live 2 minutes


def endpoint_bytes(endpoint: Hashable) -> bytes:
    """The bytes the cookie binds to: packed IP address then port (LE), as wireguard-go does.

    Endpoints that are not (ip, port) tuples (e.g. a relay path in tests) fall back to their repr:
    the cookie is only ever checked by the device that made it, so any stable encoding works.
    """
    if isinstance(endpoint, tuple) and len(endpoint) >= 2:
        host, port = endpoint[0], endpoint[1]
        try:
            packed = ipaddress.ip_address(host).packed
            return packed + int(port).to_bytes(2, "little")
        except (ValueError, TypeError, OverflowError):
            pass
    return repr(endpoint).encode()


class CookieChecker:
    """Validates mac1/mac2 of messages sent to us and makes cookie replies."""

    __slots__ = ("_cookie_key", "_mac1_key", "_random", "_refresh", "_secret", "_secret_time")

    def __init__(
        self,
        local_public: bytes,
        random_bytes: Callable[[int], bytes],
        refresh_time: float = COOKIE_REFRESH_TIME,
    ) -> None:
        self._mac1_key = hash_(LABEL_MAC1, local_public)
        self._cookie_key = hash_(LABEL_COOKIE, local_public)
        self._random = random_bytes
        self._refresh = refresh_time
        self._secret = random_bytes(32)
        self._secret_time = float("-inf")

    def check_mac1(self, msg: bytes | memoryview) -> bool:
        n = len(msg)
        return hmac.compare_digest(
            mac(self._mac1_key, msg[: n - 32]), bytes(msg[n - 32 : n - 16])
        )

    def _cookie(self, source: Hashable) -> bytes:
        return mac(self._secret, endpoint_bytes(source))

    def check_mac2(self, msg: bytes | memoryview, source: Hashable, now: float) -> bool:
        if now - self._secret_time > self._refresh:
            return False  # no cookie handed out with the current secret is still valid
        n = len(msg)
        return hmac.compare_digest(
            mac(self._cookie(source), msg[: n - 16]), bytes(msg[n - 16 :])
        )

    def create_reply(
        self, msg: bytes | memoryview, receiver_index: int, source: Hashable, now: float
    ) -> m.MessageCookieReply:
        """Cookie reply to ``msg`` (an initiation or response whose mac1 was valid)."""
        if now - self._secret_time > self._refresh:
            self._secret = self._random(32)
            self._secret_time = now
        n = len(msg)
        mac1 = bytes(msg[n - 32 : n - 16])
        nonce = self._random(m.COOKIE_NONCE_SIZE)
        enc = crypto_aead_xchacha20poly1305_ietf_encrypt(
            self._cookie(source), mac1, nonce, self._cookie_key
        )
        return m.MessageCookieReply(receiver_index, nonce, bytes(enc))


class CookieGenerator:
    """Adds mac1/mac2 to messages we send to one peer and consumes that peer's cookie replies."""

    __slots__ = ("_cookie", "_cookie_key", "_cookie_time", "_last_mac1", "_mac1_key", "_refresh")

    def __init__(self, remote_public: bytes, refresh_time: float = COOKIE_REFRESH_TIME) -> None:
        self._mac1_key = hash_(LABEL_MAC1, remote_public)
        self._cookie_key = hash_(LABEL_COOKIE, remote_public)
        self._refresh = refresh_time
        self._cookie: bytes | None = None
        self._cookie_time = float("-inf")
        self._last_mac1: bytes | None = None

    @property
    def has_cookie(self) -> bool:
        return self._cookie is not None

    def add_macs(self, msg: bytes, now: float) -> bytes:
        """Return ``msg`` (MAC fields ignored) with mac1, and mac2 if we hold a fresh cookie."""
        n = len(msg)
        body = msg[: n - 32]
        mac1 = mac(self._mac1_key, body)
        self._last_mac1 = mac1
        mac2 = m.ZERO_MAC
        if self._cookie is not None and now - self._cookie_time <= self._refresh:
            mac2 = mac(self._cookie, body + mac1)
        return body + mac1 + mac2

    def consume_reply(self, reply: m.MessageCookieReply, now: float) -> bool:
        """Decrypt and store the cookie; False if it does not answer our last message."""
        if self._last_mac1 is None:
            return False
        try:
            cookie = crypto_aead_xchacha20poly1305_ietf_decrypt(
                reply.encrypted_cookie, self._last_mac1, reply.nonce, self._cookie_key
            )
        except CryptoError:
            return False
        self._cookie = bytes(cookie)
        self._cookie_time = now
        self._last_mac1 = None  # one reply per message sent, as wireguard-go
        return True
