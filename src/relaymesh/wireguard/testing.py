"""Test doubles for the sans-IO core: IP packet builders and an in-memory network of Devices.

Shipped in the package (not under tests/) so the shell's tests, benchmarks and the lab reuse them.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Hashable
from dataclasses import dataclass, field

from relaymesh.keys import PrivateKey

from .device import Device, Received, Timers, Transmit


def checksum(data: bytes) -> int:
    """RFC 1071 Internet checksum."""
    if len(data) % 2:
        data += b"\0"
    s = sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ipv4_packet(src: str, dst: str, payload: bytes = b"", proto: int = 17) -> bytes:
    """An IPv4 packet (20-byte header, valid header checksum) carrying ``payload``."""
    total = 20 + len(payload)
    hdr = bytearray(
        bytes([0x45, 0]) + total.to_bytes(2, "big") + bytes([0, 0, 0, 0, 64, proto, 0, 0])
        + ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed
    )
    hdr[10:12] = checksum(bytes(hdr)).to_bytes(2, "big")
    return bytes(hdr) + payload


def ipv6_packet(src: str, dst: str, payload: bytes = b"", next_header: int = 17) -> bytes:
    """An IPv6 packet (40-byte fixed header) carrying ``payload``."""
    return (
        bytes([0x60, 0, 0, 0]) + len(payload).to_bytes(2, "big") + bytes([next_header, 64])
        + ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed + payload
    )


def icmp_echo(src: str, dst: str, seq: int = 1, payload: bytes = b"relaymesh") -> bytes:
    """An IPv4 ICMP echo request, checksums valid, that a real kernel answers."""
    icmp = bytearray(bytes([8, 0, 0, 0]) + (0x1234).to_bytes(2, "big") + seq.to_bytes(2, "big"))
    icmp += payload
    icmp[2:4] = checksum(bytes(icmp)).to_bytes(2, "big")
    return ipv4_packet(src, dst, bytes(icmp), proto=1)


def icmp6_echo(src: str, dst: str, seq: int = 1, payload: bytes = b"relaymesh") -> bytes:
    """An ICMPv6 echo request with a valid checksum (over the RFC 8200 pseudo-header)."""
    s, d = ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed
    icmp = bytearray(bytes([128, 0, 0, 0]) + (0x1234).to_bytes(2, "big") + seq.to_bytes(2, "big"))
    icmp += payload
    pseudo = s + d + len(icmp).to_bytes(4, "big") + bytes(3) + bytes([58])
    icmp[2:4] = checksum(pseudo + bytes(icmp)).to_bytes(2, "big")
    return ipv6_packet(src, dst, bytes(icmp), next_header=58)


@dataclass
class Node:
    name: str
    key: PrivateKey
    device: Device
    endpoint: Hashable
    inbox: list[bytes] = field(default_factory=list)  # plaintext IP packets delivered to "TUN"


class MemoryNet:
    """Devices exchanging datagrams through memory under one fake clock.

    ``send``/``tick`` put datagrams in flight; ``deliver`` hands them to their destination (and the
    replies that causes, until quiet). Tests can inspect, drop, reorder or replay ``in_flight``.
    """

    def __init__(self, timers: Timers | None = None, seed: int = 1) -> None:
        self.now = 1000.0
        self.timers = timers
        self.nodes: dict[Hashable, Node] = {}
        self.in_flight: list[tuple[Hashable, Hashable, bytes]] = []  # (src, dst, data)
        self._rng = random.Random(seed)

    def add(self, name: str, **device_kwargs: object) -> Node:
        key = PrivateKey.generate()
        device_kwargs.setdefault("rng", random.Random(self._rng.getrandbits(64)))
        dev = Device(key, timers=self.timers, **device_kwargs)  # type: ignore[arg-type]
        node = Node(name, key, dev, (name, 51820))
        self.nodes[node.endpoint] = node
        return node

    def link(self, a: Node, b: Node, a_ips: list[str], b_ips: list[str], **kw: object) -> None:
        """Make a and b peers; both know each other's endpoint unless kw says otherwise."""
        pa, pb = a.key.node_public(), b.key.node_public()
        a.device.set_peer(pb, allowed_ips=b_ips, endpoint=b.endpoint, **kw)  # type: ignore[arg-type]
        b.device.set_peer(pa, allowed_ips=a_ips, endpoint=a.endpoint, **kw)  # type: ignore[arg-type]

    def _queue(self, src: Node, transmits: list[Transmit]) -> None:
        for t in transmits:
            self.in_flight.append((src.endpoint, t.endpoint, t.data))

    def send(self, node: Node, packet: bytes) -> list[Transmit]:
        out = node.device.send_packet(packet, self.now)
        self._queue(node, out)
        return out

    def tick(self, node: Node | None = None) -> list[Transmit]:
        out: list[Transmit] = []
        for n in [node] if node is not None else list(self.nodes.values()):
            t = n.device.tick(self.now)
            self._queue(n, t)
            out.extend(t)
        return out

    def receive(self, node: Node, data: bytes, src: Hashable) -> Received:
        r = node.device.receive(data, src, self.now)
        node.inbox.extend(r.packets)
        self._queue(node, r.transmits)
        return r

    def deliver(self, max_rounds: int = 20) -> int:
        """Deliver everything in flight, and what that triggers; returns datagrams delivered."""
        count = 0
        for _ in range(max_rounds):
            if not self.in_flight:
                break
            batch, self.in_flight = self.in_flight, []
            for src, dst, data in batch:
                node = self.nodes.get(dst)
                if node is not None:
                    self.receive(node, data, src)
                    count += 1
        return count

    def advance(self, seconds: float, step: float = 0.1, deliver: bool = True) -> None:
        """Move the clock in steps, ticking every device at each step; with ``deliver`` also
        deliver everything in flight, otherwise it piles up in ``in_flight`` for inspection."""
        end = self.now + seconds
        while self.now < end - 1e-9:
            self.now = min(end, self.now + step)
            self.tick()
            if deliver:
                self.deliver()
