"""The node's one UDP socket: classify datagrams, hand disco to asyncio, send disco, endpoints.

WireGuard and disco share one UDP port (so a peer that can reach us for one reaches us for the
other, and NAT mappings are shared). The threaded datapath owns the receive side; it calls
:meth:`MagicSock.divert` for every datagram whose first byte is not a WireGuard message type.
Classification by the first bytes (the formats make them disjoint)::

    WireGuard   byte 0 in 1..4, bytes 1-3 zero (whitepaper 5.4)
    disco       bytes 0-5 == disco.MAGIC ("RM" + U+1F4AC in UTF-8)
    STUN        bytes 4-7 == 0x2112A442 (RFC 5389 magic cookie), byte 0 < 4: never reaches
                divert (netcheck, next issue)
    relay       byte 0 == 0 and the relay header checks (relay.looks_like_relay): control packets
                (bind challenges) and disco through a relay go to the event loop with the
                header; relay-framed WireGuard stays on the datapath (node.engine unwraps it)
    other       dropped and counted

A disco datagram is copied and posted to the event loop with ``call_soon_threadsafe`` (the
datapath thread must never run disco crypto while holding the device lock longer than needed).

:func:`local_endpoints` lists this host's usable addresses with the socket's port: the direct
candidates the node reports to the control server.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import socket
from collections.abc import Callable, Iterable

from relaymesh.disco import is_disco
from relaymesh.relay.header import PROTO_WIREGUARD, looks_like_relay

log = logging.getLogger(__name__)

V4_MAPPED = "::ffff:"  # IPv4-mapped IPv6 prefix on a dual-stack socket (RFC 4291 2.5.5.2)
TAILNET_NETS = (  # our own tunnel addresses are never underlay endpoints
    ipaddress.ip_network("100.64.0.0/10"),
    ipaddress.ip_network("fd7a:115c:a1e0::/48"),
)
MAX_ENDPOINTS = 16  # reported to the control server; real hosts have a handful


def usable_endpoint_ip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether a local address can be a direct candidate for peers on other hosts."""
    if ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified:
        return False
    return not any(ip in n for n in TAILNET_NETS)


def local_endpoints(port: int, exclude_ifnames: Iterable[str] = ()) -> list[str]:
    """``ip:port`` for every usable address of this network namespace (IPv4 first)."""
    from pyroute2 import IPRoute  # netlink only where a real host is inspected

    excluded = set(exclude_ifnames)
    found: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    with IPRoute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        for a in ipr.get_addr():
            if names.get(a["index"]) in excluded:
                continue
            text = a.get_attr("IFA_ADDRESS")
            if not text:
                continue
            try:
                ip = ipaddress.ip_address(text)
            except ValueError:
                continue
            if usable_endpoint_ip(ip) and ip not in found:
                found.append(ip)
    found.sort(key=lambda ip: ip.version)
    return [f"{ip}:{port}" if ip.version == 4 else f"[{ip}]:{port}" for ip in found][
        :MAX_ENDPOINTS
    ]


class MagicSock:
    """Owns the shared UDP socket; disco goes to ``on_disco(data, src)`` on the event loop."""

    def __init__(
        self,
        sock: socket.socket,
        loop: asyncio.AbstractEventLoop,
        on_disco: Callable[..., None],
    ) -> None:
        """``on_disco(data, src)`` for the main socket, ``on_disco(data, src, sid)`` for spray
        socket ``sid`` (:meth:`divert_for`)."""
        self.sock = sock
        self.loop = loop
        self.on_disco = on_disco
        self._v6 = sock.family == socket.AF_INET6
        self.counters: collections.Counter[str] = collections.Counter()

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def divert(self, data: bytes, src: tuple[str, int]) -> bool:
        """Datapath hook (inbound thread): take disco, leave everything else to WireGuard."""
        if not is_disco(data):
            if data[:1] == b"\x00" and looks_like_relay(data):
                if not data[1] and int.from_bytes(data[2:4], "big") == PROTO_WIREGUARD:
                    return False  # relay-framed WireGuard: the device wrapper unwraps it
                self.counters["relay_disco_rx"] += 1
                try:
                    self.loop.call_soon_threadsafe(self.on_disco, data, src)
                except RuntimeError:
                    self.counters["disco_rx_dropped"] += 1
                return True
            self.counters["not_disco"] += 1
            return False
        self.counters["disco_rx"] += 1
        try:
            self.loop.call_soon_threadsafe(self.on_disco, data, src)
        except RuntimeError:  # loop closed during shutdown
            self.counters["disco_rx_dropped"] += 1
        return True

    def divert_for(self, sid: int) -> Callable[[bytes, tuple[str, int]], bool]:
        """The datapath hook for spray socket ``sid``: disco goes to the event loop with the
        socket id (so the pong leaves from the same socket); everything else (WireGuard) stays
        on the datapath; relay framing is not expected there and is dropped (counted)."""

        def divert(data: bytes, src: tuple[str, int]) -> bool:
            if not is_disco(data):
                self.counters["spray_not_disco"] += 1
                return data[:1] == b"\x00"  # relay-framed: not on a spray socket
            self.counters["spray_disco_rx"] += 1
            try:
                self.loop.call_soon_threadsafe(self.on_disco, data, src, sid)
            except RuntimeError:
                self.counters["disco_rx_dropped"] += 1
            return True

        return divert

    def send(self, data: bytes, addr: tuple[str, int],
             sock: socket.socket | None = None) -> None:
        """Send one datagram (disco) to ``addr`` from the main socket (or spray socket
        ``sock``, same address family); errors are counted, never raised."""
        ip, port = addr
        if self._v6 and ":" not in ip:
            ip = V4_MAPPED + ip
        try:
            (sock or self.sock).sendto(data, (ip, port))
        except OSError as e:
            self.counters["send_error"] += 1
            log.debug("disco send to %s:%d failed: %s", addr[0], port, e)
            return
        self.counters["disco_tx"] += 1
