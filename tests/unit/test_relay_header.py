"""Relay-path header: layout, round trips, and fuzzing (only HeaderError escapes)."""

from __future__ import annotations

import contextlib
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relaymesh import relay

FUZZ = int(os.environ.get("RELAYMESH_FUZZ_EXAMPLES", "300"))


@given(
    st.integers(0, 2**24 - 1),
    st.sampled_from([relay.PROTO_DISCO, relay.PROTO_WIREGUARD]),
    st.booleans(),
    st.binary(max_size=40),
)
def test_header_round_trip(sid: int, proto: int, control: bool, tail: bytes) -> None:
    raw = relay.encode_header(sid, proto, control)
    assert len(raw) == relay.HEADER_LEN
    hdr = relay.decode_header(raw + tail)
    assert (hdr.session_id, hdr.protocol, hdr.control) == (sid, proto, control)
    assert relay.is_control(raw) is control
    assert relay.looks_like_relay(raw + tail)


def test_header_layout_is_as_documented() -> None:
    assert relay.encode_header(0xABCDEF, relay.PROTO_WIREGUARD, control=False) == bytes.fromhex(
        "00005257abcdef00"
    )
    assert relay.encode_header(1, relay.PROTO_DISCO, control=True) == bytes.fromhex(
        "0080524400000100"
    )


def test_other_udp_traffic_is_not_mistaken_for_relay() -> None:
    wg_init = b"\x01\x00\x00\x00" + b"\x00" * 144
    stun = bytes.fromhex("000100002112a442") + b"\x00" * 12
    disco_pkt = "RM💬".encode() + b"\x00" * 100
    for pkt in (wg_init, stun, disco_pkt):
        assert not relay.looks_like_relay(pkt)
        with pytest.raises(relay.HeaderError):
            relay.decode_header(pkt)


@pytest.mark.parametrize(
    "raw",
    [
        "00005244000001",  # short
        "4000524400000100",  # version 1
        "0100524400000100",  # options
        "0040524400000100",  # reserved flag
        "0000524400000101",  # reserved byte
        "0000000000000100",  # unknown protocol
    ],
)
def test_bad_headers_raise(raw: str) -> None:
    with pytest.raises(relay.HeaderError):
        relay.decode_header(bytes.fromhex(raw))


def test_encode_refuses_out_of_range() -> None:
    with pytest.raises(relay.HeaderError):
        relay.encode_header(1 << 24, relay.PROTO_DISCO)
    with pytest.raises(relay.HeaderError):
        relay.encode_header(1, 0x1234)


@given(st.binary(max_size=16))
@settings(max_examples=FUZZ)
def test_fuzz_decode_header(data: bytes) -> None:
    with contextlib.suppress(relay.HeaderError):
        hdr = relay.decode_header(data)
        assert relay.encode_header(hdr.session_id, hdr.protocol, hdr.control) == data[:8]
