"""Allowed-IPs longest-prefix routing, IPv4 and IPv6, against a brute-force model (hypothesis)."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from relaymesh.wireguard.allowedips import AllowedIPs, format_prefix, parse_prefix


def test_longest_prefix_wins_v4_and_v6() -> None:
    t: AllowedIPs[str] = AllowedIPs()
    t.insert("0.0.0.0/0", "default4")
    t.insert("10.0.0.0/8", "ten")
    t.insert("10.1.0.0/16", "ten-one")
    t.insert("10.1.2.3/32", "host")
    t.insert("::/0", "default6")
    t.insert("fd00::/8", "ula")
    t.insert("fd00:1::/32", "ula1")
    assert t.lookup_str("10.1.2.3") == "host"
    assert t.lookup_str("10.1.2.4") == "ten-one"
    assert t.lookup_str("10.2.0.1") == "ten"
    assert t.lookup_str("192.0.2.1") == "default4"
    assert t.lookup_str("fd00:1::5") == "ula1"
    assert t.lookup_str("fd00:2::5") == "ula"
    assert t.lookup_str("2001:db8::1") == "default6"
    assert t.lookup(b"\x01\x02\x03") is None


def test_host_bits_masked_and_prefix_moves_between_owners() -> None:
    t: AllowedIPs[str] = AllowedIPs()
    assert t.insert("10.0.0.77/24", "a") is None
    assert t.prefixes("a") == ["10.0.0.0/24"]
    assert t.insert("10.0.0.0/24", "b") == "a"
    assert t.lookup_str("10.0.0.1") == "b" and t.prefixes("a") == []
    t.remove_value("b")
    assert t.lookup_str("10.0.0.1") is None


prefix_v4 = st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 32))
prefix_v6 = st.tuples(st.integers(0, 2**128 - 1), st.integers(0, 128))


def model_lookup(entries: dict[ipaddress.IPv4Network | ipaddress.IPv6Network, int],
                 addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> int | None:
    best = None
    for net, v in entries.items():
        if net.version != addr.version or addr not in net:
            continue
        if best is None or net.prefixlen > best[0]:
            best = (net.prefixlen, v)
    return None if best is None else best[1]


@given(st.lists(st.tuples(st.one_of(prefix_v4, prefix_v6), st.integers(0, 5)), max_size=30),
       st.lists(st.one_of(st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address),
                          st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)), max_size=30))
def test_lookup_matches_brute_force(entries: list, addrs: list) -> None:  # type: ignore[type-arg]
    table: AllowedIPs[int] = AllowedIPs()
    model: dict[ipaddress.IPv4Network | ipaddress.IPv6Network, int] = {}
    for (addr, plen), value in entries:
        v6 = addr >= 2**32 or plen > 32
        net = ipaddress.ip_network(
            (ipaddress.IPv6Address(addr) if v6 else ipaddress.IPv4Address(addr), plen), strict=False
        )
        table.insert(str(net), value)
        model[net] = value
    # probe the inserted networks themselves and random addresses
    probes = [n.network_address for n in model] + addrs
    for a in probes:
        assert table.lookup(a.packed) == model_lookup(model, a)


@given(st.one_of(prefix_v4.map(lambda p: f"{ipaddress.IPv4Address(p[0])}/{p[1]}"),
                 prefix_v6.map(lambda p: f"{ipaddress.IPv6Address(p[0])}/{p[1]}")))
def test_prefix_codec_round_trip(text: str) -> None:
    version, addr, plen = parse_prefix(text)
    canon = format_prefix(version, addr, plen)
    assert parse_prefix(canon) == (version, addr, plen)  # canonical form is a fixed point
    net = ipaddress.ip_network(text, strict=False)
    assert canon == str(net) and addr == int(net.network_address)
