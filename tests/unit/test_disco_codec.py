"""Disco codec: round trips, sealing, and fuzzing (only DiscoError may escape)."""

from __future__ import annotations

import contextlib
import os
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relaymesh import disco
from relaymesh.disco import codec
from relaymesh.keys import DiscoKey, NodeKey, PrivateKey

FUZZ = int(os.environ.get("RELAYMESH_FUZZ_EXAMPLES", "300"))

ips = st.one_of(
    st.integers(0, 2**32 - 1).map(IPv4Address),
    st.integers(0, 2**128 - 1)
    .map(IPv6Address)
    .filter(lambda a: a.ipv4_mapped is None),  # v4-mapped decodes as IPv4 by design
)
addrs = st.tuples(ips, st.integers(0, 65535))
addr_lists = st.lists(addrs, max_size=8).map(tuple)
disco_keys = st.binary(min_size=32, max_size=32).map(DiscoKey)
node_keys = st.binary(min_size=32, max_size=32).map(NodeKey)
u32 = st.integers(0, 2**32 - 1)
vnis = st.integers(0, 2**24 - 1)
tx_ids = st.binary(min_size=12, max_size=12)
macs = st.binary(min_size=32, max_size=32)
endpoints = st.builds(
    disco.RelayEndpoint,
    server_disco=disco_keys,
    client_discos=st.tuples(disco_keys, disco_keys),
    allocation_id=st.integers(0, 2**64 - 1),
    session_id=vnis,
    bind_lifetime_ms=u32,
    idle_lifetime_ms=u32,
    candidates=st.lists(addrs, min_size=1, max_size=8).map(tuple),
)
messages = st.one_of(
    st.builds(disco.Ping, tx_ids, node_keys),
    st.builds(disco.Pong, tx_ids, addrs),
    st.builds(disco.CallMeMaybe, addr_lists),
    st.builds(disco.AllocateRequest, disco_keys, disco_keys, u32),
    st.builds(disco.AllocateResponse, u32, endpoints, st.integers(0, 1000)),
    st.builds(disco.CallMeMaybeVia, endpoints),
    st.builds(disco.Bind, vnis, u32, disco_keys),
    st.builds(disco.Challenge, vnis, u32, macs),
    st.builds(disco.Answer, vnis, u32, disco_keys, macs),
)

ALICE = PrivateKey.generate()
BOB = PrivateKey.generate()


@given(messages)
def test_message_round_trip(msg: disco.Message) -> None:
    assert disco.decode_message(disco.encode_message(msg)) == msg


@given(messages)
@settings(max_examples=50)
def test_seal_open_round_trip(msg: disco.Message) -> None:
    pkt = disco.seal(msg, ALICE, BOB.disco_public())
    assert disco.is_disco(pkt)
    assert disco.sender_of(pkt) == ALICE.disco_public()
    sender, got = disco.open_sealed(pkt, BOB)
    assert sender == ALICE.disco_public()
    assert got == msg
    assert codec.open is disco.open_sealed


def test_layout_of_a_ping_is_as_documented() -> None:
    nonce = bytes(range(24))
    msg = disco.Ping(b"t" * 12, NodeKey(b"n" * 32))
    pkt = disco.seal(msg, ALICE, BOB.disco_public(), nonce=nonce)
    assert pkt[:6] == b"RM\xf0\x9f\x92\xac"
    assert pkt[6:38] == ALICE.public_raw()
    assert pkt[38:62] == nonce
    assert len(pkt) == 62 + 16 + 2 + 12 + 32
    assert disco.encode_message(msg) == b"\x01\x00" + b"t" * 12 + b"n" * 32


def test_addr_encoding_v4_is_mapped_and_v6_is_raw() -> None:
    assert disco.encode_addr((IPv4Address("1.2.3.4"), 0x0102)) == (
        b"\x00" * 10 + b"\xff\xff\x01\x02\x03\x04\x01\x02"
    )
    v6 = IPv6Address("2001:db8::1")
    assert disco.encode_addr((v6, 443)) == v6.packed + b"\x01\xbb"


def test_wrong_receiver_cannot_open() -> None:
    pkt = disco.seal(disco.CallMeMaybe(()), ALICE, BOB.disco_public())
    with pytest.raises(disco.DiscoError):
        disco.open_sealed(pkt, PrivateKey.generate())


def test_forged_sender_key_fails_authentication() -> None:
    pkt = bytearray(disco.seal(disco.CallMeMaybe(()), ALICE, BOB.disco_public()))
    pkt[6:38] = PrivateKey.generate().public_raw()
    with pytest.raises(disco.DiscoError):
        disco.open_sealed(bytes(pkt), BOB)


def test_low_order_receiver_key_is_a_disco_error() -> None:
    with pytest.raises(disco.DiscoError):
        disco.seal(disco.CallMeMaybe(()), ALICE, DiscoKey(b"\x00" * 32))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x01",
        b"\x01\x01" + b"\x00" * 44,  # version 1
        b"\x7f\x00",  # unknown type
        b"\x01\x00" + b"\x00" * 43,  # ping one byte short
        b"\x01\x00" + b"\x00" * 45,  # ping one byte long
        b"\x03\x00" + b"\x00" * 17,  # call-me-maybe not a multiple of 18
        b"\x07\x00\x01\x00\x00\x00" + b"\x00" * 36,  # bind with VNI over 24 bits
        b"\x06\x00" + b"\x00" * 116,  # call-me-maybe-via without candidates
    ],
)
def test_bad_messages_raise_disco_error(data: bytes) -> None:
    with pytest.raises(disco.DiscoError):
        disco.decode_message(data)


def test_encode_refuses_out_of_range_fields() -> None:
    with pytest.raises(disco.DiscoError):
        disco.encode_message(disco.Bind(1 << 24, 0, DiscoKey(b"k" * 32)))
    with pytest.raises(disco.DiscoError):
        disco.encode_message(disco.Ping(b"short", NodeKey(b"n" * 32)))
    too_many = tuple((IPv4Address(i), 1) for i in range(disco.MAX_ENDPOINTS + 1))
    with pytest.raises(disco.DiscoError):
        disco.encode_message(disco.CallMeMaybe(too_many))


def test_is_disco_rejects_other_traffic() -> None:
    assert not disco.is_disco(b"\x01\x00\x00\x00" + b"\x00" * 200)  # WireGuard initiation
    assert not disco.is_disco(disco.MAGIC + b"\x00" * 10)  # too short to hold a box
    with pytest.raises(disco.DiscoError):
        disco.sender_of(b"nope")


@given(st.binary(max_size=300))
@settings(max_examples=FUZZ, suppress_health_check=[HealthCheck.too_slow])
def test_fuzz_decode_message_random(data: bytes) -> None:
    with contextlib.suppress(disco.DiscoError):
        disco.decode_message(data)


@given(messages, st.data())
@settings(max_examples=FUZZ, suppress_health_check=[HealthCheck.too_slow])
def test_fuzz_decode_message_mutated(msg: disco.Message, data: st.DataObject) -> None:
    raw = bytearray(disco.encode_message(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "add"]))
        if op == "flip" and raw:
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] ^= data.draw(st.integers(1, 255))
        elif op == "cut" and raw:
            del raw[data.draw(st.integers(0, len(raw) - 1)) :]
        else:
            raw += data.draw(st.binary(min_size=1, max_size=20))
    with contextlib.suppress(disco.DiscoError):
        disco.decode_message(bytes(raw))


@given(st.binary(max_size=200), st.booleans())
@settings(max_examples=FUZZ, suppress_health_check=[HealthCheck.too_slow])
def test_fuzz_open_random_packets(tail: bytes, with_magic: bool) -> None:
    pkt = (disco.MAGIC if with_magic else b"") + tail
    with contextlib.suppress(disco.DiscoError):
        disco.open_sealed(pkt, BOB)


def test_fuzz_open_mutated_sealed_packets() -> None:
    """Flipping any byte of a sealed packet must fail authentication, never decode garbage."""
    pkt = disco.seal(disco.Bind(5, 1, ALICE.disco_public()), ALICE, BOB.disco_public())
    for i in range(len(pkt)):
        mutated = bytearray(pkt)
        mutated[i] ^= 0x40
        with pytest.raises(disco.DiscoError):
            disco.open_sealed(bytes(mutated), BOB)


def test_allocate_response_load_is_permille_and_out_of_range_is_refused() -> None:
    ep = disco.RelayEndpoint(ALICE.disco_public(), (ALICE.disco_public(), BOB.disco_public()),
                             1, 42, 30_000, 300_000, ((IPv4Address("198.18.7.2"), 40000),))
    wire = disco.encode_message(disco.AllocateResponse(7, ep, 250))
    assert disco.decode_message(wire) == disco.AllocateResponse(7, ep, 250)
    with pytest.raises(disco.DiscoError):
        disco.encode_message(disco.AllocateResponse(7, ep, 1001))
    body_at = wire.index(b"\x00\x00\x00\x07") + 4  # the load follows the generation
    assert wire[body_at:body_at + 2] == (250).to_bytes(2, "big")
    bad = wire[:body_at] + (1001).to_bytes(2, "big") + wire[body_at + 2:]
    with pytest.raises(disco.DiscoError, match="load"):
        disco.decode_message(bad)
