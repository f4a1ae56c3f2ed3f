"""The node's data plane: WireGuard Device + threaded Datapath + TUN + interface config.

Built when the node comes up, torn down by ``down``; the UDP socket is the daemon's and outlives
it (the port, and so the endpoints peers know, never change). Outbound packets pass through
:class:`TrackingDevice`, which records each flow in the connection tracker before encryption;
inbound packets are judged by the :class:`~relaymesh.node.filter.InboundFilter` through the
datapath's ``inbound_filter`` hook; disco datagrams leave through its ``divert`` hook.

MTU 1280: the IPv6 minimum, so the tunnel always carries IPv6, and 1280 + 80 bytes of worst-case
WireGuard-over-IPv6 overhead (+ 8 for the peer-relay header of the next issue) fits any underlay
path of 1400 bytes or more (PPPoE, cloud overlays, nested tunnels) without fragmentation or PMTU
discovery, which a userspace tunnel does not do. Tailscale makes the same choice. 1420 would be
faster for bulk transfers on a clean 1500-byte path but blackholes large packets elsewhere.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from relaymesh.keys import NodeKey, PrivateKey
from relaymesh.node.filter import InboundFilter
from relaymesh.wireguard.datapath import Datapath
from relaymesh.wireguard.device import Device, Received, Transmit
from relaymesh.wireguard.tun import TunLike

log = logging.getLogger(__name__)

TUN_MTU = 1280  # see the module docstring
TAILNET_ROUTES = ("100.64.0.0/10", "fd7a:115c:a1e0::/48")  # CGNAT range and Tailscale's ULA


class NetConfLike(Protocol):
    def apply(self, *, mtu: int, addresses: Iterable[Any], routes: Iterable[Any]) -> None: ...

    def add_address(self, address: Any) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class PeerStats:
    endpoint: tuple[str, int] | None
    tx_bytes: int
    rx_bytes: int
    last_handshake: float | None  # unix time


class TrackingDevice:
    """Device wrapper: notes each outbound packet's flow (for replies) before encrypting it."""

    def __init__(self, inner: Device, flt: InboundFilter, clock: Callable[[], float]) -> None:
        self.inner = inner
        self.flt = flt
        self.clock = clock

    def send_packet(self, ip_packet: bytes, now: float) -> list[Transmit]:
        self.flt.note_outbound(ip_packet, now)
        return self.inner.send_packet(ip_packet, now)

    def receive(self, datagram: memoryview, source: Any, now: float) -> Received:
        return self.inner.receive(datagram, source, now)

    def tick(self, now: float) -> list[Transmit]:
        return self.inner.tick(now)

    def next_deadline(self) -> float | None:
        return self.inner.next_deadline()

    @property
    def drops(self) -> Any:
        return self.inner.drops


class Engine:
    """Owns TUN, interface config, device and datapath for one ``up`` session."""

    def __init__(
        self,
        private_key: PrivateKey,
        sock: socket.socket,
        tun: TunLike,
        netconf: NetConfLike | None,
        flt: InboundFilter,
        divert: Callable[[bytes, tuple[str, int]], bool],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tun = tun
        self.netconf = netconf
        self.flt = flt
        self.clock = clock
        self._wall_offset = time.time() - time.monotonic()
        holder: list[Datapath] = []
        self.device = Device(
            private_key,
            under_load=lambda: bool(holder) and holder[0].under_load(),
            wall_clock_offset=self._wall_offset,
            mtu=TUN_MTU,
        )
        self.datapath = Datapath(
            TrackingDevice(self.device, flt, clock),
            tun,
            sock,
            clock=clock,
            divert=divert,
            inbound_filter=lambda packet, peer: flt.allow(packet, clock()),
        )
        holder.append(self.datapath)
        self._addresses: set[str] = set()
        self._endpoints: dict[bytes, tuple[str, int] | None] = {}

    def start(self, addresses: Sequence[str]) -> None:
        if self.netconf is not None:
            self.netconf.apply(
                mtu=TUN_MTU,
                addresses=[ipaddress.ip_interface(a) for a in addresses],
                routes=[ipaddress.ip_network(r) for r in TAILNET_ROUTES],
            )
        self._addresses = set(addresses)
        self.datapath.start()

    def set_addresses(self, addresses: Sequence[str]) -> None:
        """Add addresses the map gave us that the interface lacks (they are stable per node)."""
        for a in addresses:
            if a not in self._addresses:
                if self.netconf is not None:
                    self.netconf.add_address(ipaddress.ip_interface(a))
                self._addresses.add(a)

    def has_addresses(self, addresses: Sequence[str]) -> bool:
        return set(addresses) <= self._addresses

    def set_peers(
        self,
        peers: Iterable[tuple[NodeKey, list[str], tuple[str, int] | None]],
        *,
        initiate_new: bool = False,
    ) -> None:
        """Make the device's peers exactly these (node key, allowed IPs, endpoint).

        ``initiate_new`` starts a handshake with each added peer at once. A freshly started
        engine does this: a peer that still holds a session from our previous run would keep
        sending on it (we drop it: unknown index) until its own rekey timer fires (15 s);
        our initiation replaces that session right away.
        """
        wanted = {k.raw: (ips, ep) for k, ips, ep in peers}

        def apply(dev: Device, now: float) -> list[Transmit]:
            out: list[Transmit] = []
            for raw in [raw for raw in dev.peers if raw not in wanted]:
                dev.remove_peer(raw)
                self._endpoints.pop(raw, None)
            for raw, (ips, ep) in wanted.items():
                new = raw not in dev.peers
                dev.set_peer(raw, allowed_ips=ips, endpoint=ep)
                if ep is not None:
                    self._endpoints[raw] = ep
                if new and initiate_new and ep is not None:
                    out += dev.initiate_handshake(raw, now)
            return out

        transmits = self.datapath.call(lambda d, now: apply(self.device, now))
        if transmits:
            self.datapath.transmit(transmits)

    def set_endpoint(self, key: NodeKey, ep: tuple[str, int]) -> None:
        if self._endpoints.get(key.raw) == ep:
            return
        self._endpoints[key.raw] = ep

        def apply(dev: Any, now: float) -> None:
            p = self.device.peer(key.raw)
            if p is not None:
                p.endpoint = ep

        self.datapath.call(apply)

    def peer_stats(self) -> dict[bytes, PeerStats]:
        off = self._wall_offset

        def snap(dev: Any, now: float) -> dict[bytes, PeerStats]:
            return {
                raw: PeerStats(
                    p.endpoint if isinstance(p.endpoint, tuple) else None,
                    p.tx_bytes,
                    p.rx_bytes,
                    None if p.last_handshake is None else p.last_handshake + off,
                )
                for raw, p in self.device.peers.items()
            }

        return self.datapath.call(snap)

    def stats(self) -> dict[str, int]:
        d = self.datapath.stats()
        d.update({f"filter_drop_{k}": v for k, v in self.flt.drops.items()})
        return d

    def stop(self) -> None:
        self.datapath.stop()
        if self.netconf is not None:
            try:
                self.netconf.close()
            except Exception as e:  # cleanup goes on
                log.warning("interface cleanup failed: %s", e)
        self.tun.close()
