"""Inbound packet filter with connection tracking (sans-IO: packets and ``now`` in, verdicts out).

The policy's :class:`~relaymesh.control.policy.Filter` says which *new* flows may reach this node.
Replies to flows this node started must pass too, or a node that may talk to a peer could never
hear back from it: like Tailscale's filter, every outbound packet records its 5-tuple in a small
bounded table, and an inbound packet whose reversed 5-tuple is in the table passes whatever the
policy says.

Header fields read (everything else in the packet is ignored)::

    IPv4: byte 0 high nibble = 4, IHL = low nibble * 4; byte 6-7 flags/fragment offset;
          byte 9 protocol; bytes 12-15 source; bytes 16-19 destination
    IPv6: byte 0 high nibble = 6; byte 6 next header; bytes 8-23 source; bytes 24-39 destination;
          extension headers hop-by-hop (0), routing (43), destination options (60) are skipped
          (length byte * 8 + 8); a fragment header (44) gives its offset and next header
    TCP/UDP/SCTP at the transport offset: bytes 0-1 source port, 2-3 destination port
    ICMPv4/ICMPv6: byte 0 type; echo request/reply bytes 4-5 identifier (used as the "port")

A non-first fragment carries no ports and passes, as in Tailscale's filter: its first fragment
(which has the ports) was judged, and without it the receiver cannot reassemble the packet.
Malformed packets are dropped and counted in :attr:`InboundFilter.drops`.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

from relaymesh.control.policy import PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP
from relaymesh.control.policy import Filter as PolicyFilter

CONNTRACK_MAX = 4096  # flows; bounded so a port scan from inside cannot grow memory without end
CONNTRACK_TTL = 300.0  # s idle; replies after 5 min of silence count as new flows (Tailscale-like)
PORT_PROTOS = frozenset({PROTO_TCP, PROTO_UDP, PROTO_SCTP})
ICMP4_ECHO_REQUEST, ICMP4_ECHO_REPLY = 8, 0  # RFC 792
ICMP6_ECHO_REQUEST, ICMP6_ECHO_REPLY = 128, 129  # RFC 4443
IPV6_SKIPPABLE = frozenset({0, 43, 60})  # hop-by-hop, routing, destination options
IPV6_FRAGMENT = 44
MAX_EXT_HEADERS = 8  # bound the extension header walk
REFRESH_GRANULARITY = 1.0  # s: a flow's timestamp/LRU position is rewritten at most this often


@dataclass(frozen=True, slots=True)
class Flow:
    """The parsed 5-tuple of one packet. ``dport`` is the ICMP echo id for echo packets."""

    version: int
    src: bytes
    dst: bytes
    proto: int
    sport: int | None
    dport: int | None
    icmp_type: int | None = None
    fragment: bool = False  # a non-first fragment: no transport header

    @property
    def is_echo_request(self) -> bool:
        return self.icmp_type in (ICMP4_ECHO_REQUEST, ICMP6_ECHO_REQUEST)

    @property
    def is_echo_reply(self) -> bool:
        return self.icmp_type in (ICMP4_ECHO_REPLY, ICMP6_ECHO_REPLY)


def parse_flow(p: bytes | memoryview) -> Flow | None:
    """The 5-tuple of an IP packet, or None when the header is malformed."""
    n = len(p)
    if n < 1:
        return None
    version = p[0] >> 4
    if version == 4:
        ihl = (p[0] & 0x0F) * 4
        if n < 20 or ihl < 20 or n < ihl:
            return None
        proto = p[9]
        src, dst = bytes(p[12:16]), bytes(p[16:20])
        first_fragment = (int.from_bytes(p[6:8], "big") & 0x1FFF) == 0
        off = ihl
    elif version == 6:
        if n < 40:
            return None
        proto = p[6]
        src, dst = bytes(p[8:24]), bytes(p[24:40])
        off = 40
        first_fragment = True
        for _ in range(MAX_EXT_HEADERS):
            if proto in IPV6_SKIPPABLE:
                if n < off + 2:
                    return None
                proto, off = p[off], off + p[off + 1] * 8 + 8
            elif proto == IPV6_FRAGMENT:
                if n < off + 8:
                    return None
                first_fragment = (int.from_bytes(p[off + 2 : off + 4], "big") >> 3) == 0
                proto, off = p[off], off + 8
            else:
                break
        else:
            return None
    else:
        return None
    if not first_fragment:
        return Flow(version, src, dst, proto, None, None, fragment=True)
    if proto in PORT_PROTOS:
        if n < off + 4:
            return None
        sport = int.from_bytes(p[off : off + 2], "big")
        dport = int.from_bytes(p[off + 2 : off + 4], "big")
        return Flow(version, src, dst, proto, sport, dport)
    if proto in (PROTO_ICMP, PROTO_ICMPV6):
        if n < off + 8:
            return None
        itype = p[off]
        if itype in (ICMP4_ECHO_REQUEST, ICMP4_ECHO_REPLY, ICMP6_ECHO_REQUEST, ICMP6_ECHO_REPLY):
            ident = int.from_bytes(p[off + 4 : off + 6], "big")
            return Flow(version, src, dst, proto, ident, ident, itype)
        return Flow(version, src, dst, proto, None, None, itype)
    return Flow(version, src, dst, proto, None, None)


def _key(proto: int, local: bytes, remote: bytes, lport: int, rport: int) -> bytes:
    """Conntrack key: proto (1) + local ip + remote ip + local port (2) + remote port (2).

    For IPv4 TCP/UDP with a 20-byte header, the outbound key is exactly ``packet[9:10] +
    packet[12:24]``, which is what makes the per-packet fast path one slice.
    """
    return bytes((proto,)) + local + remote + lport.to_bytes(2, "big") + rport.to_bytes(2, "big")


def _v4_simple(p: bytes) -> bool:
    """IPv4, 20-byte header, TCP or UDP, not a non-first fragment: the common data packet."""
    return (
        len(p) >= 24
        and p[0] == 0x45
        and (p[9] == 6 or p[9] == 17)
        and not (p[6] & 0x1F or p[7])  # fragment offset (13 bits) is zero
    )


class ConnTrack:
    """Outbound flows this node started, least recently used first, bounded and expiring.

    A flow's timestamp and LRU position are refreshed at most every ``REFRESH_GRANULARITY`` s, so
    the per-packet cost is one dict lookup (recency is accurate to that granularity).
    """

    def __init__(self, max_flows: int = CONNTRACK_MAX, ttl: float = CONNTRACK_TTL) -> None:
        self.max_flows = max_flows
        self.ttl = ttl
        self._flows: collections.OrderedDict[bytes, float] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._flows)

    def touch(self, key: bytes, now: float) -> None:
        """Record (or refresh) an outbound flow."""
        flows = self._flows
        seen = flows.get(key)
        if seen is None:
            if len(flows) >= self.max_flows:
                flows.popitem(last=False)
            flows[key] = now
        elif now - seen > REFRESH_GRANULARITY:
            flows[key] = now
            flows.move_to_end(key)

    def check(self, reply_key: bytes, now: float) -> bool:
        """Whether an inbound packet with this (reversed) key answers a live flow."""
        flows = self._flows
        seen = flows.get(reply_key)
        if seen is None:
            return False
        age = now - seen
        if age > self.ttl:
            del flows[reply_key]
            return False
        if age > REFRESH_GRANULARITY:
            flows[reply_key] = now
            flows.move_to_end(reply_key)
        return True

    def note_outbound(self, f: Flow, now: float) -> None:
        if f.sport is None or f.dport is None:
            return  # portless protocols and non-first fragments are not tracked
        if f.icmp_type is not None and not f.is_echo_request:
            return  # only echo requests start an ICMP "flow"
        self.touch(_key(f.proto, f.src, f.dst, f.sport, f.dport), now)

    def is_reply(self, f: Flow, now: float) -> bool:
        """Whether inbound ``f`` answers a live outbound flow (refreshing it if so)."""
        if f.sport is None or f.dport is None:
            return False
        if f.icmp_type is not None and not f.is_echo_reply:
            return False
        return self.check(_key(f.proto, f.dst, f.src, f.dport, f.sport), now)


class InboundFilter:
    """Policy filter + conntrack. The datapath calls :meth:`allow` and :meth:`note_outbound`
    under its device lock, so the two never run at the same time.

    Both have a fast path for the common packet (IPv4, TCP/UDP, no options, not a fragment):
    the conntrack key is sliced straight from the header, with no parsing into objects.
    """

    def __init__(self, policy: PolicyFilter | None = None, conntrack: ConnTrack | None = None):
        self.policy = policy if policy is not None else PolicyFilter()  # no map yet: deny new
        self.conntrack = conntrack if conntrack is not None else ConnTrack()
        self.drops: collections.Counter[str] = collections.Counter()

    def set_policy(self, policy: PolicyFilter) -> None:
        self.policy = policy  # one reference swap: safe against the datapath thread

    def note_outbound(self, packet: bytes | memoryview, now: float) -> None:
        p = packet if isinstance(packet, bytes) else bytes(packet)
        if _v4_simple(p):
            self.conntrack.touch(p[9:10] + p[12:24], now)
            return
        f = parse_flow(p)
        if f is not None:
            self.conntrack.note_outbound(f, now)

    def allow(self, packet: bytes | memoryview, now: float) -> bool:
        p = packet if isinstance(packet, bytes) else bytes(packet)
        if _v4_simple(p) and self.conntrack.check(
            p[9:10] + p[16:20] + p[12:16] + p[22:24] + p[20:22], now
        ):
            return True
        f = parse_flow(p)
        if f is None:
            self.drops["malformed"] += 1
            return False
        if f.fragment or self.conntrack.is_reply(f, now):
            return True
        port = f.dport if f.proto in PORT_PROTOS else None
        if self.policy.allows(f.src, f.dst, f.proto, port):
            return True
        self.drops["policy"] += 1
        return False
