"""Typed keys: parsing, text forms, type separation, and private keys never printed."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from relaymesh.keys import DiscoKey, KeyError_, NodeKey, PrivateKey
from relaymesh.paths import Path


def test_generated_key_is_clamped_like_wg_genkey() -> None:
    raw = PrivateKey.generate().raw
    assert raw[0] & 7 == 0
    assert raw[31] & 128 == 0
    assert raw[31] & 64 == 64


def test_public_matches_cryptography() -> None:
    priv = PrivateKey.generate()
    expected = X25519PrivateKey.from_private_bytes(priv.raw).public_key().public_bytes_raw()
    assert priv.node_public().raw == expected


def test_exchange_is_symmetric() -> None:
    a, b = PrivateKey.generate(), PrivateKey.generate()
    assert a.exchange(b.node_public()) == b.exchange(a.node_public())


@given(st.binary(min_size=32, max_size=32))
def test_text_and_base64_round_trip(raw: bytes) -> None:
    k = NodeKey(raw)
    assert NodeKey.parse(k.to_text()) == k
    assert NodeKey.parse(k.to_base64()) == k
    assert NodeKey.parse(raw.hex()) == k


def test_kinds_do_not_mix() -> None:
    raw = bytes(range(32))
    assert NodeKey(raw) != DiscoKey(raw)
    with pytest.raises(KeyError_, match="expected a nodekey"):
        NodeKey.parse(DiscoKey(raw).to_text())


@pytest.mark.parametrize("bad", ["", "nodekey:zz", "abc", base64.b64encode(b"x" * 31).decode()])
def test_bad_key_text_is_refused(bad: str) -> None:
    with pytest.raises(KeyError_):
        NodeKey.parse(bad)


def test_private_key_never_printed() -> None:
    priv = PrivateKey.generate()
    for text in (repr(priv), str(priv), f"{priv}"):
        assert priv.raw.hex() not in text
        assert priv.to_base64() not in text


def test_short_form_is_prefix_of_base64() -> None:
    k = PrivateKey.generate().node_public()
    assert k.short == f"[{k.to_base64()[:5]}]"


def test_path_preference_order() -> None:
    ranked = sorted(Path, key=lambda p: p.rank)
    assert ranked == [Path.DIRECT, Path.PEER_RELAY, Path.DERP, Path.NONE]
    assert str(Path.PEER_RELAY) == "peer_relay"
