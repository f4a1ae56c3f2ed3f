"""Noise IKpsk2 primitives and handshake, checked against independent implementations."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from relaymesh.wireguard import messages as m
from relaymesh.wireguard import noise

# boringtun's noise/handshake.rs hard-codes these (whitepaper §5.4: Ci = HASH(CONSTRUCTION),
# Hi = HASH(Ci || IDENTIFIER)); matching them pins the construction and identifier strings.
BORINGTUN_INITIAL_CHAIN_KEY = bytes([
    96, 226, 109, 174, 243, 39, 239, 192, 46, 195, 53, 226, 160, 37, 210, 208,
    22, 235, 66, 6, 248, 114, 119, 245, 45, 56, 209, 152, 139, 120, 205, 54,
])
BORINGTUN_INITIAL_CHAIN_HASH = bytes([
    34, 17, 179, 97, 8, 26, 197, 102, 105, 18, 67, 219, 69, 138, 213, 50,
    45, 156, 108, 102, 34, 147, 232, 183, 14, 225, 156, 101, 186, 7, 158, 243,
])


def test_initial_chaining_key_and_hash_known_answer() -> None:
    assert noise.INITIAL_CHAIN_KEY == BORINGTUN_INITIAL_CHAIN_KEY
    assert noise.INITIAL_HASH == BORINGTUN_INITIAL_CHAIN_HASH


def rfc2104_hmac_blake2s(key: bytes, data: bytes) -> bytes:
    """HMAC written out from RFC 2104 (block size 64), independent of the hmac module."""
    key = key.ljust(64, b"\0") if len(key) <= 64 else hashlib.blake2s(key).digest().ljust(64, b"\0")
    inner = hashlib.blake2s(bytes(k ^ 0x36 for k in key) + data).digest()
    return hashlib.blake2s(bytes(k ^ 0x5C for k in key) + inner).digest()


@pytest.mark.parametrize("key_len", [0, 16, 32, 64, 65])
def test_hmac_blake2s_matches_rfc2104(key_len: int) -> None:
    key, data = bytes(range(key_len)), b"wireguard kdf input"
    assert noise.hmac_(key, data) == rfc2104_hmac_blake2s(key, data)


def test_kdf_chain_is_hkdf_over_hmac_blake2s() -> None:
    ck, data = b"c" * 32, b"input key material"
    t0 = rfc2104_hmac_blake2s(ck, data)
    t1 = rfc2104_hmac_blake2s(t0, b"\x01")
    t2 = rfc2104_hmac_blake2s(t0, t1 + b"\x02")
    t3 = rfc2104_hmac_blake2s(t0, t2 + b"\x03")
    assert noise.kdf1(ck, data) == t1
    assert noise.kdf2(ck, data) == (t1, t2)
    assert noise.kdf3(ck, data) == (t1, t2, t3)


def test_aead_nonce_layout() -> None:
    assert noise.nonce(1) == bytes(4) + (1).to_bytes(8, "little")
    assert noise.nonce(2**64 - 1) == bytes(4) + b"\xff" * 8


def ident() -> noise.StaticIdentity:
    return noise.StaticIdentity.from_raw(X25519PrivateKey.generate().private_bytes_raw())


def run_handshake(psk_i: bytes | None = None, psk_r: bytes | None = None):  # type: ignore[no-untyped-def]
    i, r = ident(), ident()
    hs_i = noise.new_handshake(i, r.public, psk_i)
    hs_r = noise.new_handshake(r, i.public, psk_r)
    init = noise.create_initiation(i, hs_i, 11, bytes(11) + b"\x01")
    wire = m.MessageInitiation.decode(init.encode())
    got = noise.consume_initiation(r, wire, lambda s: hs_r if s == i.public else None, 100.0)
    assert got is hs_r and hs_r.remote_index == 11
    resp = m.MessageResponse.decode(noise.create_response(hs_r, 22).encode())
    assert resp.receiver == 11
    noise.consume_response(i, hs_i, resp)
    assert hs_i.hash == hs_r.hash  # both transcripts agree
    return noise.derive_transport_keys(hs_i), noise.derive_transport_keys(hs_r)


def test_handshake_derives_mirrored_transport_keys() -> None:
    (i_send, i_recv, i_init), (r_send, r_recv, r_init) = run_handshake(b"k" * 32, b"k" * 32)
    assert i_init and not r_init
    assert i_send == r_recv and i_recv == r_send and i_send != i_recv


def test_psk_mismatch_fails_response() -> None:
    with pytest.raises(noise.HandshakeError) as e:
        run_handshake(b"x" * 32, None)
    assert e.value.reason == "bad_response"


def test_initiation_from_unknown_static_rejected() -> None:
    i, r = ident(), ident()
    init = noise.create_initiation(i, noise.new_handshake(i, r.public, None), 1, bytes(12))
    with pytest.raises(noise.HandshakeError) as e:
        noise.consume_initiation(r, init, lambda s: None, 0.0)
    assert e.value.reason == "unknown_peer"


def test_initiation_for_another_responder_rejected() -> None:
    i, r, other = ident(), ident(), ident()
    init = noise.create_initiation(i, noise.new_handshake(i, other.public, None), 1, bytes(12))
    hs = noise.new_handshake(r, i.public, None)
    with pytest.raises(noise.HandshakeError) as e:
        noise.consume_initiation(r, init, lambda s: hs, 0.0)
    assert e.value.reason == "bad_initiation"


def test_timestamp_must_increase_and_flood_is_limited() -> None:
    i, r = ident(), ident()
    hs_i = noise.new_handshake(i, r.public, None)
    hs_r = noise.new_handshake(r, i.public, None)
    ts1, ts2 = bytes(11) + b"\x01", bytes(11) + b"\x02"
    first = noise.create_initiation(i, hs_i, 1, ts2)
    noise.consume_initiation(r, first, lambda s: hs_r, 10.0)
    older = noise.create_initiation(i, hs_i, 2, ts1)
    with pytest.raises(noise.HandshakeError, match="replayed_initiation"):
        noise.consume_initiation(r, older, lambda s: hs_r, 20.0)
    newer_but_fast = noise.create_initiation(i, hs_i, 3, bytes(11) + b"\x03")
    with pytest.raises(noise.HandshakeError, match="initiation_flood"):
        noise.consume_initiation(r, newer_but_fast, lambda s: hs_r, 10.0 + 0.001)
    noise.consume_initiation(r, newer_but_fast, lambda s: hs_r, 10.5)


def test_low_order_ephemeral_rejected() -> None:
    i, r = ident(), ident()
    init = noise.create_initiation(i, noise.new_handshake(i, r.public, None), 1, bytes(12))
    init.ephemeral = bytes(32)  # the all-zero point: DH result is zero
    with pytest.raises(noise.HandshakeError, match="bad_public_key"):
        noise.consume_initiation(r, init, lambda s: None, 0.0)
