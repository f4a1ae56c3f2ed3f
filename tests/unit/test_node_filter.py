"""Inbound filter: policy for new flows, conntrack for replies, bounded table, malformed drops."""

from __future__ import annotations

import ipaddress
import struct

from relaymesh.control.policy import Filter, FilterRule
from relaymesh.node.filter import ConnTrack, InboundFilter, parse_flow

A, B, C = "100.64.0.1", "100.64.0.2", "100.64.0.3"
A6, B6 = "fd7a:115c:a1e0::1", "fd7a:115c:a1e0::2"


def v4(src: str, dst: str, proto: int, payload: bytes, frag_off: int = 0) -> bytes:
    total = 20 + len(payload)
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, frag_off, 64, proto, 0,
                      ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    return hdr + payload


def v6(src: str, dst: str, nh: int, payload: bytes) -> bytes:
    hdr = struct.pack("!IHBB16s16s", 6 << 28, len(payload), nh, 64,
                      ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed)
    return hdr + payload


def tcp(src: str, dst: str, sport: int, dport: int) -> bytes:
    return v4(src, dst, 6, struct.pack("!HHIIHHHH", sport, dport, 0, 0, 0x5002, 0, 0, 0))


def udp(src: str, dst: str, sport: int, dport: int) -> bytes:
    return v4(src, dst, 17, struct.pack("!HHHH", sport, dport, 8, 0))


def echo(src: str, dst: str, itype: int, ident: int) -> bytes:
    return v4(src, dst, 1, struct.pack("!BBHHH", itype, 0, 0, ident, 1))


def rule(src: str, dst: str, ports: tuple[int, int] = (0, 65535),
         protos: list[int] | None = None) -> FilterRule:
    return FilterRule.from_json({"src": [src], "dst": [dst], "ports": [list(ports)],
                                 "protos": protos})


def node_b_filter() -> InboundFilter:
    """B accepts TCP 22 from A only."""
    return InboundFilter(Filter([rule(f"{A}/32", f"{B}/32", (22, 22), [6])]))


def test_parse_flow_reads_tcp_udp_and_echo_fields() -> None:
    f = parse_flow(tcp(A, B, 40000, 22))
    assert f is not None and (f.proto, f.sport, f.dport) == (6, 40000, 22)
    assert f.src == ipaddress.IPv4Address(A).packed
    f = parse_flow(echo(A, B, 8, 77))
    assert f is not None and f.is_echo_request and f.dport == 77
    f = parse_flow(v6(A6, B6, 17, struct.pack("!HHHH", 5, 53, 8, 0)))
    assert f is not None and (f.version, f.proto, f.sport, f.dport) == (6, 17, 5, 53)


def test_parse_flow_skips_ipv6_extension_headers() -> None:
    hop_by_hop = bytes([17, 0, 0, 0, 0, 0, 0, 0])  # next header UDP, length 0 (8 bytes)
    f = parse_flow(v6(A6, B6, 0, hop_by_hop + struct.pack("!HHHH", 5, 53, 8, 0)))
    assert f is not None and (f.proto, f.dport) == (17, 53)


def test_malformed_packets_are_dropped_and_counted() -> None:
    flt = InboundFilter(Filter([rule("0.0.0.0/0", "0.0.0.0/0")]))
    for bad in (b"", b"\x45" + bytes(10), tcp(A, B, 1, 22)[:22], b"\x75" + bytes(40)):
        assert not flt.allow(bad, 0.0)
    assert flt.drops["malformed"] == 4


def test_policy_allows_new_flow_from_permitted_source_only() -> None:
    flt = node_b_filter()
    assert flt.allow(tcp(A, B, 40000, 22), 0.0)
    assert not flt.allow(tcp(C, B, 40000, 22), 0.0)  # other source
    assert not flt.allow(tcp(A, B, 40000, 23), 0.0)  # other port
    assert not flt.allow(udp(A, B, 40000, 22), 0.0)  # other protocol
    assert flt.drops["policy"] == 3


def test_replies_to_our_own_flows_pass_without_a_rule() -> None:
    # Node A has an empty policy (accepts no new flows) but starts a connection to B.
    flt = InboundFilter(Filter())
    assert not flt.allow(tcp(B, A, 22, 40000), 0.0)  # unsolicited: dropped
    flt.note_outbound(tcp(A, B, 40000, 22), 1.0)
    assert flt.allow(tcp(B, A, 22, 40000), 2.0)  # the reply
    assert not flt.allow(tcp(B, A, 22, 40001), 2.0)  # another port is not a reply
    assert not flt.allow(tcp(C, A, 22, 40000), 2.0)  # another host is not a reply


def test_echo_reply_passes_only_for_our_echo_request() -> None:
    flt = InboundFilter(Filter())
    assert not flt.allow(echo(B, A, 0, 9), 0.0)
    flt.note_outbound(echo(A, B, 8, 9), 0.0)
    assert flt.allow(echo(B, A, 0, 9), 0.1)
    assert not flt.allow(echo(B, A, 8, 9), 0.1)  # a request from B is a new flow: policy says no


def test_conntrack_entries_expire_after_ttl() -> None:
    flt = InboundFilter(Filter(), ConnTrack(ttl=10.0))
    flt.note_outbound(udp(A, B, 5000, 53), 0.0)
    assert flt.allow(udp(B, A, 53, 5000), 5.0)  # refreshes
    assert flt.allow(udp(B, A, 53, 5000), 14.0)
    assert not flt.allow(udp(B, A, 53, 5000), 30.0)


def test_conntrack_is_bounded_and_evicts_least_recently_used() -> None:
    ct = ConnTrack(max_flows=3)
    flt = InboundFilter(Filter(), ct)
    for port in (1, 2, 3):
        flt.note_outbound(udp(A, B, port, 53), 0.0)
    flt.note_outbound(udp(A, B, 1, 53), 5.0)  # port 1 becomes most recent
    flt.note_outbound(udp(A, B, 4, 53), 6.0)  # evicts port 2
    assert len(ct) == 3
    assert flt.allow(udp(B, A, 53, 1), 7.0)
    assert not flt.allow(udp(B, A, 53, 2), 7.0)
    assert flt.allow(udp(B, A, 53, 4), 7.0)


def test_set_policy_replaces_the_rules() -> None:
    flt = InboundFilter(Filter())
    assert not flt.allow(tcp(A, B, 1, 22), 0.0)
    flt.set_policy(Filter([rule(f"{A}/32", f"{B}/32")]))
    assert flt.allow(tcp(A, B, 1, 22), 0.0)


def test_non_first_fragment_passes_because_its_first_fragment_was_judged() -> None:
    frag = v4(C, B, 6, b"x" * 16, frag_off=0x0010)  # offset 16 bytes, no TCP header
    first = v4(C, B, 6, tcp(C, B, 1, 22)[20:], frag_off=0x2000)  # MF set, offset 0
    flt = node_b_filter()
    assert not flt.allow(first, 0.0)  # the first fragment carries ports: C may not connect
    assert flt.allow(frag, 0.0)


def test_fast_and_general_paths_share_conntrack_keys() -> None:
    flt = InboundFilter(Filter())
    flt.note_outbound(udp(A, B, 5000, 53), 0.0)  # fast path (plain IPv4 UDP)
    reply = udp(B, A, 53, 5000)
    with_options = bytes([0x46]) + reply[1:20] + b"\x01\x01\x01\x00" + reply[20:]  # IHL 6, NOPs
    assert parse_flow(with_options) is not None
    assert flt.allow(with_options, 1.0)  # general path finds the fast path's entry
    flt.note_outbound(bytes([0x46]) + udp(A, C, 6000, 53)[1:20] + b"\x01" * 4
                      + udp(A, C, 6000, 53)[20:], 0.0)  # general path
    assert flt.allow(udp(C, A, 53, 6000), 1.0)  # fast path finds the general path's entry

