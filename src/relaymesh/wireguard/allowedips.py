"""Allowed-IPs: the cryptokey routing table (whitepaper §2), longest-prefix match for IPv4 and IPv6.

One dict per prefix length in use, keyed by the address shifted right to the prefix; a lookup probes
the lengths in use from longest to shortest. Real configurations use a handful of distinct lengths
(/32, /128, /24, /0...), so a lookup is a few dict probes: cheaper in Python than a bit trie.

A prefix belongs to at most one value (peer): inserting it for another value moves it (as wg(8)).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from typing import Generic, TypeVar

V = TypeVar("V")


def parse_prefix(text: str) -> tuple[int, int, int]:
    """(ip version, network address as int, prefix length); host bits are masked off."""
    net = ipaddress.ip_network(text.strip(), strict=False)
    return net.version, int(net.network_address), net.prefixlen


def format_prefix(version: int, addr: int, plen: int) -> str:
    if version == 4:
        return f"{ipaddress.IPv4Address(addr)}/{plen}"
    return f"{ipaddress.IPv6Address(addr)}/{plen}"


class _Family(Generic[V]):
    __slots__ = ("bits", "lengths", "tables")

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.tables: dict[int, dict[int, V]] = {}
        self.lengths: list[int] = []  # in use, longest first

    def insert(self, addr: int, plen: int, value: V) -> V | None:
        table = self.tables.get(plen)
        if table is None:
            table = self.tables[plen] = {}
            self.lengths = sorted(self.tables, reverse=True)
        key = addr >> (self.bits - plen)
        old = table.get(key)
        table[key] = value
        return old

    def remove(self, addr: int, plen: int) -> V | None:
        table = self.tables.get(plen)
        if table is None:
            return None
        old = table.pop(addr >> (self.bits - plen), None)
        if not table:
            del self.tables[plen]
            self.lengths = sorted(self.tables, reverse=True)
        return old

    def lookup(self, addr: int) -> V | None:
        tables, bits = self.tables, self.bits
        for plen in self.lengths:
            v = tables[plen].get(addr >> (bits - plen))
            if v is not None:
                return v
        return None

    def items(self) -> Iterator[tuple[int, int, V]]:
        for plen, table in self.tables.items():
            for key, v in table.items():
                yield key << (self.bits - plen), plen, v


class AllowedIPs(Generic[V]):
    """Prefix -> value table with longest-prefix lookups by raw address bytes."""

    __slots__ = ("v4", "v6")

    def __init__(self) -> None:
        self.v4: _Family[V] = _Family(32)
        self.v6: _Family[V] = _Family(128)

    def insert(self, prefix: str, value: V) -> V | None:
        """Map ``prefix`` to ``value``; returns the previous owner of exactly this prefix."""
        version, addr, plen = parse_prefix(prefix)
        fam = self.v4 if version == 4 else self.v6
        return fam.insert(addr, plen, value)

    def remove(self, prefix: str) -> V | None:
        version, addr, plen = parse_prefix(prefix)
        fam = self.v4 if version == 4 else self.v6
        return fam.remove(addr, plen)

    def remove_value(self, value: V) -> None:
        for fam in (self.v4, self.v6):
            for addr, plen, v in list(fam.items()):
                if v is value:
                    fam.remove(addr, plen)

    def lookup(self, address: bytes | memoryview) -> V | None:
        """Longest-prefix match of a 4- or 16-byte address."""
        n = len(address)
        if n == 4:
            return self.v4.lookup(int.from_bytes(address, "big"))
        if n == 16:
            return self.v6.lookup(int.from_bytes(address, "big"))
        return None

    def lookup_str(self, address: str) -> V | None:
        return self.lookup(ipaddress.ip_address(address).packed)

    def prefixes(self, value: V) -> list[str]:
        out = []
        for version, fam in ((4, self.v4), (6, self.v6)):
            for addr, plen, v in fam.items():
                if v is value:
                    out.append(format_prefix(version, addr, plen))
        return out
