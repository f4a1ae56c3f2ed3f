"""Machine-key authentication of node requests and API keys of the admin API (sans-IO).

Node requests (control-protocol.md §1) carry two headers::

    X-Relaymesh-Machine: mkey:<hex>                      the node's machine public key
    X-Relaymesh-Auth:    base64(nonce[24] || box[16+n])  NaCl crypto_box, machine priv -> server pub

where the boxed plaintext (n bytes) is the UTF-8 JSON ``{"ts": <unix float>, "method": "GET",
"path": "/api/v1/map"}``. Opening the box proves possession of the machine private key; the method
and path bind it to one endpoint and ``ts`` bounds replay to the skew window.

Everything here is pure: callers pass ``now`` and get values or :class:`AuthError` back. Reading
and writing the key files is the one exception, kept in small helpers at the bottom.

API keys (``rmapi-<48 hex>``) are random 192-bit secrets; only their SHA-256 is stored, which is
enough because a full-entropy secret cannot be brute-forced from its hash.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
from collections import OrderedDict
from pathlib import Path

import nacl.exceptions
import nacl.public

from relaymesh.control.config import AUTH_MAX_SKEW_S, write_private
from relaymesh.keys import KeyError_, MachineKey, PrivateKey

__all__ = [
    "API_KEY_PREFIX",
    "HEADER_AUTH",
    "HEADER_MACHINE",
    "NONCE_LEN",
    "ApiKeys",
    "AuthError",
    "MachineVerifier",
    "auth_headers",
    "load_or_create_private_key",
]

HEADER_MACHINE = "X-Relaymesh-Machine"
HEADER_AUTH = "X-Relaymesh-Auth"
NONCE_LEN = 24  # crypto_box (XSalsa20-Poly1305) nonce size
MAX_AUTH_HEADER = 1024  # the boxed JSON is ~80 bytes; anything much larger is garbage
API_KEY_PREFIX = "rmapi-"  # recognisable in logs and secret scanners
API_KEY_BYTES = 24
# Precomputed crypto_box shared keys kept per machine key: saves one X25519 per request.
BOX_CACHE_SIZE = 16384


class AuthError(Exception):
    """Authentication failed; the message is safe to return to the client in a 401."""


def auth_headers(
    machine: PrivateKey, server: MachineKey, method: str, path: str, now: float
) -> dict[str, str]:
    """The two headers a node sends with a request (client side; also used by tests)."""
    box = nacl.public.Box(nacl.public.PrivateKey(machine.raw), nacl.public.PublicKey(server.raw))
    plain = json.dumps({"ts": now, "method": method.upper(), "path": path}).encode()
    sealed = bytes(box.encrypt(plain))  # nonce || ciphertext
    return {
        HEADER_MACHINE: machine.machine_public().to_text(),
        HEADER_AUTH: base64.b64encode(sealed).decode(),
    }


class MachineVerifier:
    """Server side: checks the auth headers against the server key and the clock."""

    def __init__(self, server_key: PrivateKey, max_skew: float = AUTH_MAX_SKEW_S) -> None:
        self._priv = nacl.public.PrivateKey(server_key.raw)
        self.public = server_key.machine_public()
        self.max_skew = max_skew
        self._boxes: OrderedDict[bytes, nacl.public.Box] = OrderedDict()

    def _box(self, machine: MachineKey) -> nacl.public.Box:
        box = self._boxes.get(machine.raw)
        if box is None:
            box = nacl.public.Box(self._priv, nacl.public.PublicKey(machine.raw))
            self._boxes[machine.raw] = box
            if len(self._boxes) > BOX_CACHE_SIZE:
                self._boxes.popitem(last=False)
        else:
            self._boxes.move_to_end(machine.raw)
        return box

    def verify(
        self, machine_header: str | None, auth_header: str | None, method: str, path: str,
        now: float,
    ) -> MachineKey:
        """Return the authenticated machine key or raise :class:`AuthError` saying why."""
        if not machine_header or not auth_header:
            raise AuthError(f"missing {HEADER_MACHINE} or {HEADER_AUTH} header")
        try:
            machine = MachineKey.parse(machine_header)
        except KeyError_ as e:
            raise AuthError(f"bad {HEADER_MACHINE} header: {e}") from None
        if len(auth_header) > MAX_AUTH_HEADER:
            raise AuthError(f"{HEADER_AUTH} header too long")
        try:
            sealed = base64.b64decode(auth_header, validate=True)
        except (binascii.Error, ValueError):
            raise AuthError(f"{HEADER_AUTH} header is not base64") from None
        if len(sealed) <= NONCE_LEN + 16:
            raise AuthError(f"{HEADER_AUTH} header too short")
        try:
            plain = self._box(machine).decrypt(sealed[NONCE_LEN:], sealed[:NONCE_LEN])
        except nacl.exceptions.CryptoError:
            raise AuthError("auth box does not open with this machine key") from None
        try:
            claim = json.loads(plain)
            ts = float(claim["ts"])
            c_method = str(claim["method"])
            c_path = str(claim["path"])
        except (ValueError, KeyError, TypeError):
            raise AuthError("auth box content is malformed") from None
        if c_method.upper() != method.upper() or c_path != path:
            raise AuthError("auth box was made for another request")
        if not abs(ts - now) <= self.max_skew:  # also refuses NaN
            raise AuthError(f"auth timestamp off by more than {self.max_skew:g} s")
        return machine


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeys:
    """Hashed admin API keys in a JSON file of the state dir (0600)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._hashes: dict[str, float] = {}
        if path.exists():
            data = json.loads(path.read_text() or "{}")
            self._hashes = {str(h): float(t) for h, t in data.get("keys", {}).items()}

    def create(self, now: float) -> str:
        key = API_KEY_PREFIX + secrets.token_hex(API_KEY_BYTES)
        self._hashes[_hash(key)] = now
        write_private(self.path, json.dumps({"keys": self._hashes}).encode())
        return key

    def check(self, key: str) -> bool:
        digest = _hash(key)
        # Compare against every stored hash in constant time per entry: no early exit on a hit.
        return any([hmac.compare_digest(digest, h) for h in self._hashes])

    def __len__(self) -> int:
        return len(self._hashes)


def load_or_create_private_key(path: Path) -> PrivateKey:
    """Read a ``privkey:<hex>`` file, or create one with mode 0600 when it does not exist."""
    if path.exists():
        return PrivateKey.parse(path.read_text().strip())
    key = PrivateKey.generate()
    write_private(path, (f"privkey:{key.raw.hex()}\n").encode())
    return key
