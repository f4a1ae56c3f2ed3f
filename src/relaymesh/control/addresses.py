"""Tailnet address allocation: one IPv4 from 100.64.0.0/10 and one IPv6 from fd7a:115c:a1e0::/48.

Why these ranges: 100.64.0.0/10 is the RFC 6598 shared (CGNAT) space, which is rarely used on the
LANs our nodes sit on; fd7a:115c:a1e0::/48 is the ULA prefix Tailscale uses, so addresses look
familiar to operators. Both are configurable on :class:`AddressPool`.

Policy of the allocator (pure: the caller passes in the addresses already in use):

* **Deterministic**: the same set of used addresses always yields the same next address, so two
  replicas racing on one database pick the same candidate and the loser retries on the unique
  constraint instead of silently diverging.
* **Sequential, not first-fit**: the next address follows the highest one in use, wrapping to the
  bottom of the range only when the top is exhausted. A freshly deleted node's address is
  therefore not handed out again at once (stale peers may still hold it), yet the pool is never
  exhausted while any address is free.
* **Skips** host octets .0 and .255 (some stacks treat them as network/broadcast even inside a
  /10), 100.100.100.0/24 (the per-node "quad-100" service address lives there) and
  100.115.92.0/23 (used by ChromeOS's ARC container network).
* **IPv6 derived from IPv4**: the node's IPv6 is the prefix with the 32 IPv4 bits in the low 32
  bits (100.64.0.1 -> fd7a:115c:a1e0::6440:1). One allocation therefore yields a consistent
  pair, and a candidate is only taken when both halves are free.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

__all__ = [
    "DEFAULT_V4_PREFIX",
    "DEFAULT_V6_PREFIX",
    "AddressPool",
    "AddressPoolExhausted",
]

DEFAULT_V4_PREFIX = IPv4Network("100.64.0.0/10")  # RFC 6598 shared address space
DEFAULT_V6_PREFIX = IPv6Network("fd7a:115c:a1e0::/48")  # ULA (RFC 4193), as Tailscale uses
DEFAULT_RESERVED_V4: tuple[IPv4Network, ...] = (
    IPv4Network("100.100.100.0/24"),  # quad-100 local service address block
    IPv4Network("100.115.92.0/23"),  # ChromeOS ARC container network
)


class AddressPoolExhausted(RuntimeError):
    """No free address pair is left in the pool."""


@dataclass(frozen=True)
class AddressPool:
    """The tailnet's address ranges and the allocation rule over them."""

    v4_prefix: IPv4Network = DEFAULT_V4_PREFIX
    v6_prefix: IPv6Network = DEFAULT_V6_PREFIX
    reserved_v4: tuple[IPv4Network, ...] = DEFAULT_RESERVED_V4
    _reserved_ranges: tuple[tuple[int, int], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.v6_prefix.prefixlen > 96:
            raise ValueError("the IPv6 prefix must leave 32 bits for the embedded IPv4 address")
        ranges = tuple(
            (int(n.network_address), int(n.broadcast_address)) for n in self.reserved_v4
        )
        object.__setattr__(self, "_reserved_ranges", ranges)

    def v6_for(self, v4: IPv4Address) -> IPv6Address:
        """The IPv6 paired with ``v4``: the pool's v6 prefix with ``v4`` in the low 32 bits."""
        return IPv6Address(int(self.v6_prefix.network_address) | int(v4))

    def contains(self, ip: IPv4Address | IPv6Address) -> bool:
        """True when ``ip`` is inside one of the pool's two prefixes."""
        if isinstance(ip, IPv4Address):
            return ip in self.v4_prefix
        return ip in self.v6_prefix

    def usable(self, v4: IPv4Address) -> bool:
        """True when the allocator may hand out ``v4`` (inside the prefix, not skipped)."""
        if v4 not in self.v4_prefix:
            return False
        value = int(v4)
        if value & 0xFF in (0, 255):
            return False
        return not any(lo <= value <= hi for lo, hi in self._reserved_ranges)

    def allocate(
        self,
        used_v4: Iterable[IPv4Address | str],
        used_v6: Iterable[IPv6Address | str] = (),
    ) -> tuple[IPv4Address, IPv6Address]:
        """Return the next free (IPv4, IPv6) pair given the addresses already in use.

        Raises :class:`AddressPoolExhausted` when every usable pair is taken.
        """
        v4_used = {int(ipaddress.IPv4Address(a)) for a in used_v4}
        v6_used = {int(ipaddress.IPv6Address(a)) for a in used_v6}
        first = int(self.v4_prefix.network_address)
        last = int(self.v4_prefix.broadcast_address)
        in_pool = [a for a in v4_used if first <= a <= last]
        start = max(in_pool) + 1 if in_pool else first
        v6_base = int(self.v6_prefix.network_address)
        size = last - first + 1
        # One full lap of the range at most: bounded even when the pool is full.
        for step in range(size):
            value = first + (start - first + step) % size
            if value in v4_used or (v6_base | value) in v6_used:
                continue
            candidate = IPv4Address(value)
            if self.usable(candidate):
                return candidate, IPv6Address(v6_base | value)
        raise AddressPoolExhausted(f"no free address left in {self.v4_prefix}")
