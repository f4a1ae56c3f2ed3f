"""Address allocation: ranges, skipping rules, v4/v6 pairing, no reuse of in-use addresses."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relaymesh.control.addresses import (
    DEFAULT_V4_PREFIX,
    DEFAULT_V6_PREFIX,
    AddressPool,
    AddressPoolExhausted,
)


def test_first_allocation_is_first_usable_address() -> None:
    v4, v6 = AddressPool().allocate([])
    assert v4 == IPv4Address("100.64.0.1")
    assert v6 == IPv6Address("fd7a:115c:a1e0::6440:1")


def test_v6_embeds_v4_in_low_bits() -> None:
    pool = AddressPool()
    v4 = IPv4Address("100.100.7.9")
    v6 = pool.v6_for(v4)
    assert v6 in DEFAULT_V6_PREFIX
    assert int(v6) & 0xFFFFFFFF == int(v4)


def test_allocation_is_sequential_after_highest_in_use() -> None:
    pool = AddressPool()
    used = [IPv4Address("100.64.0.1"), IPv4Address("100.64.0.7")]
    v4, _ = pool.allocate(used)
    # .2 .. .6 are free but sit below the highest address in use: not handed out yet.
    assert v4 == IPv4Address("100.64.0.8")


def test_allocation_is_deterministic() -> None:
    pool = AddressPool()
    used = ["100.64.0.1", "100.64.3.200"]
    assert pool.allocate(used) == pool.allocate(list(reversed(used)))


def test_skips_dot_255_and_dot_0() -> None:
    pool = AddressPool()
    v4, _ = pool.allocate([IPv4Address("100.64.0.254")])
    assert v4 == IPv4Address("100.64.1.1")


def test_skips_reserved_quad100_block() -> None:
    pool = AddressPool()
    v4, _ = pool.allocate([IPv4Address("100.100.99.254")])
    assert v4 == IPv4Address("100.100.101.1")


def test_v6_in_use_blocks_the_pair() -> None:
    pool = AddressPool()
    taken_v6 = pool.v6_for(IPv4Address("100.64.0.1"))
    v4, v6 = pool.allocate([], [taken_v6])
    assert v4 == IPv4Address("100.64.0.2")
    assert v6 == pool.v6_for(v4)


def test_wraps_around_to_free_low_addresses_when_top_is_used() -> None:
    pool = AddressPool(v4_prefix=IPv4Network("10.9.0.0/29"), v6_prefix=IPv6Network("fd00::/96"))
    # Usable: .1 .. .7 (the /29 has no .255, .0 skipped). Highest (.7) in use, .2 free.
    used = [IPv4Address(f"10.9.0.{i}") for i in (1, 3, 4, 5, 6, 7)]
    v4, v6 = pool.allocate(used)
    assert v4 == IPv4Address("10.9.0.2")
    assert v6 == IPv6Address("fd00::a09:2")


def test_exhausted_pool_raises() -> None:
    pool = AddressPool(v4_prefix=IPv4Network("10.9.0.0/30"), v6_prefix=IPv6Network("fd00::/96"))
    used = [IPv4Address("10.9.0.1"), IPv4Address("10.9.0.2"), IPv4Address("10.9.0.3")]
    with pytest.raises(AddressPoolExhausted):
        pool.allocate(used)


def test_v6_prefix_too_long_is_rejected() -> None:
    with pytest.raises(ValueError):
        AddressPool(v6_prefix=IPv6Network("fd00::/112"))


def test_usable_and_contains() -> None:
    pool = AddressPool()
    assert pool.usable(IPv4Address("100.64.5.5"))
    assert not pool.usable(IPv4Address("100.64.5.0"))
    assert not pool.usable(IPv4Address("100.115.92.10"))
    assert not pool.usable(IPv4Address("10.0.0.1"))
    assert pool.contains(IPv6Address("fd7a:115c:a1e0::1"))
    assert not pool.contains(IPv4Address("192.168.1.1"))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=3000), max_size=40))
def test_never_returns_an_address_in_use(offsets: list[int]) -> None:
    pool = AddressPool()
    used = [IPv4Address(int(DEFAULT_V4_PREFIX.network_address) + o) for o in offsets]
    v4, v6 = pool.allocate(used, [pool.v6_for(a) for a in used])
    assert v4 not in used
    assert pool.usable(v4)
    assert v6 == pool.v6_for(v4)


def test_many_sequential_allocations_are_unique() -> None:
    pool = AddressPool()
    v4s: list[IPv4Address] = []
    v6s: list[IPv6Address] = []
    for _ in range(600):
        v4, v6 = pool.allocate(v4s, v6s)
        v4s.append(v4)
        v6s.append(v6)
    assert len(set(v4s)) == 600 and len(set(v6s)) == 600
    assert all(pool.usable(a) for a in v4s)
