"""STUN codec: RFC 5769 test vectors, round trips, and malformed input raising only StunError."""

from __future__ import annotations

import ipaddress
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relaymesh import stun

FUZZ_EXAMPLES = int(os.environ.get("RELAYMESH_FUZZ_EXAMPLES", "300"))

# RFC 5769 section 2.2: sample IPv4 response (SOFTWARE, XOR-MAPPED-ADDRESS, MESSAGE-INTEGRITY,
# FINGERPRINT); mapped address 192.0.2.1 port 32853.
RFC5769_V4 = bytes.fromhex(
    "0101003c2112a442b7e7a701bc34d686fa87dfae8022000b7465737420766563746f7220"
    "002000080001a147e112a643000800142b91f599fd9e90c38c7489f92af9ba53f06be7d7"
    "80280004c07d4c96"
)
# RFC 5769 section 2.3: sample IPv6 response; 2001:db8:1234:5678:11:2233:4455:6677 port 32853.
RFC5769_V6 = bytes.fromhex(
    "010100482112a442b7e7a701bc34d686fa87dfae8022000b7465737420766563746f7220"
    "002000140002a1470113a9faa5d3f179bc25f4b5bed2b9d900080014a382954e4be67bf1"
    "1784c97c8292c275bfe3ed4180280004c8fb0b4c"
)
TXID = bytes.fromhex("b7e7a701bc34d686fa87dfae")


def test_rfc5769_ipv4_response() -> None:
    msg = stun.decode(RFC5769_V4)
    assert msg.msg_type == stun.BINDING_SUCCESS
    assert msg.txid == TXID
    assert msg.fingerprint_ok is True
    assert msg.get(stun.ATTR_SOFTWARE) == b"test vector"
    assert msg.mapped_address == ("192.0.2.1", 32853)
    assert stun.parse_binding_response(RFC5769_V4, TXID) == ("192.0.2.1", 32853)


def test_rfc5769_ipv6_response() -> None:
    msg = stun.decode(RFC5769_V6)
    assert msg.fingerprint_ok is True
    assert msg.mapped_address == ("2001:db8:1234:5678:11:2233:4455:6677", 32853)


def test_xor_address_matches_the_rfc_encoding() -> None:
    # Our encoder produces the exact XOR-MAPPED-ADDRESS bytes of the vectors.
    assert stun.encode_address(("192.0.2.1", 32853), TXID, xor=True) == bytes.fromhex(
        "0001a147e112a643")
    v6 = ("2001:db8:1234:5678:11:2233:4455:6677", 32853)
    assert stun.encode_address(v6, TXID, xor=True) == bytes.fromhex(
        "0002a1470113a9faa5d3f179bc25f4b5bed2b9d9")


def test_fingerprint_mismatch_is_rejected() -> None:
    bad = bytearray(RFC5769_V4)
    bad[-1] ^= 1
    with pytest.raises(stun.StunError, match="FINGERPRINT"):
        stun.decode(bytes(bad))


def test_request_with_change_flags_and_fingerprint() -> None:
    txid, data = stun.binding_request(change_ip=True, change_port=True, fingerprint=True)
    assert len(txid) == 12 and stun.is_stun(data)
    msg = stun.decode(data)
    assert msg.msg_type == stun.BINDING_REQUEST
    assert msg.txid == txid
    assert msg.change_request == stun.CHANGE_IP | stun.CHANGE_PORT
    assert msg.fingerprint_ok is True
    _, plain = stun.binding_request()
    assert stun.decode(plain).change_request == 0
    assert len(plain) == stun.HEADER_LEN


def test_response_carries_origin() -> None:
    data = stun.binding_response(TXID, ("198.18.1.2", 40000), origin=("198.19.0.2", 3479))
    msg = stun.decode(data)
    assert msg.mapped_address == ("198.18.1.2", 40000)
    assert msg.response_origin == ("198.19.0.2", 3479)


def test_txid_mismatch_and_wrong_type_are_errors() -> None:
    resp = stun.binding_response(TXID, ("10.0.0.1", 1))
    with pytest.raises(stun.StunError, match="transaction id"):
        stun.parse_binding_response(resp, b"\x00" * 12)
    _, req = stun.binding_request(TXID)
    with pytest.raises(stun.StunError, match="not a binding success"):
        stun.parse_binding_response(req)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "too short"),
        (b"\x00\x01\x00\x00" + b"\x00" * 16, "magic cookie"),
        (b"\xc0\x01\x00\x00" + struct.pack("!I", stun.MAGIC_COOKIE) + b"\x00" * 12, "top two"),
        (b"\x00\x01\x00\x04" + struct.pack("!I", stun.MAGIC_COOKIE) + b"\x00" * 12, "length field"),
        (b"\x00\x01\x00\x03" + struct.pack("!I", stun.MAGIC_COOKIE) + b"\x00" * 15,
         "multiple of 4"),
        (b"\x00\x01\x00\x04" + struct.pack("!I", stun.MAGIC_COOKIE) + b"\x00" * 12
         + b"\x00\x20\x00\x08", "overruns"),
        (b"\x01\x01\x00\x08" + struct.pack("!I", stun.MAGIC_COOKIE) + b"\x00" * 12
         + b"\x00\x20\x00\x04\x00\x03\x00\x01", "address family"),
    ],
)
def test_malformed_inputs_raise_stun_error(data: bytes, why: str) -> None:
    with pytest.raises(stun.StunError, match=why):
        msg = stun.decode(data)
        _ = msg.mapped_address  # some problems only show when the attribute is read


def test_is_stun_rejects_other_traffic() -> None:
    assert not stun.is_stun(b"\x01\x00\x00\x00" + b"\x00" * 28)  # WireGuard initiation type 1
    assert not stun.is_stun(b"short")
    assert stun.is_stun(RFC5769_V4)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_random_bytes_never_raise_anything_but_stun_error(data: bytes) -> None:
    try:
        msg = stun.decode(data)
        _ = msg.mapped_address, msg.change_request, msg.response_origin
    except stun.StunError:
        pass


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(st.binary(min_size=20, max_size=120))
def test_fuzz_with_valid_header_prefix(body: bytes) -> None:
    # Random attributes after a well-formed header exercise the attribute walker.
    data = struct.pack("!HHI", 0x0101, (len(body) - 12) & ~3, stun.MAGIC_COOKIE) + body
    try:
        msg = stun.decode(data)
        _ = msg.mapped_address
    except stun.StunError:
        pass


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(
    st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)),
    st.integers(0, 65535),
    st.binary(min_size=12, max_size=12),
    st.booleans(),
)
def test_roundtrip_any_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int,
                               txid: bytes, fp: bool) -> None:
    data = stun.binding_response(txid, (str(ip), port), fingerprint=fp)
    assert stun.parse_binding_response(data, txid) == (str(ip), port)
    assert stun.decode(data).fingerprint_ok is (True if fp else None)
