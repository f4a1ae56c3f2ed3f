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
import struct
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from relaymesh.keys import NodeKey, PrivateKey
from relaymesh.magicsock.route import DerpOutbox, MeshDatapath, PeerEndpoint
from relaymesh.node.filter import InboundFilter
from relaymesh.relay.header import HEADER_LEN as RELAY_HEADER_LEN
from relaymesh.relay.header import PROTOCOLS as RELAY_PROTOCOLS
from relaymesh.relay.header import WIREGUARD_PREFIX as RELAY_WIREGUARD_PREFIX
from relaymesh.stun import is_stun
from relaymesh.wireguard.datapath import same_heads
from relaymesh.wireguard.device import Device, Received, Transmit
from relaymesh.wireguard.tun import TunLike

log = logging.getLogger(__name__)

TUN_MTU = 1280  # see the module docstring
TAILNET_ROUTES = ("100.64.0.0/10", "fd7a:115c:a1e0::/48")  # CGNAT range and Tailscale's ULA
_RELAY_WORDS = struct.Struct(">II")  # relay header (relay/header.py) as two 32-bit words
_RELAY_WG = int.from_bytes(RELAY_WIREGUARD_PREFIX, "big")  # word 0 of relayed WireGuard


def _relay_drop_reason(w0: int, w1: int) -> str:
    """Why a datagram starting with byte 0 is not relayed WireGuard of a known session."""
    if w0 >> 24 or w1 & 0xFF or w0 & 0xFFFF not in RELAY_PROTOCOLS:
        return "not_relay"
    if w0 != _RELAY_WG:
        return "relay_not_wireguard"  # control or disco: the divert hook's, not ours
    return "relay_unknown_session"


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
    data_at: float | None = None  # engine clock: a TUN packet last went to this peer


class TrackingDevice:
    """Device wrapper: notes each outbound packet's flow (for replies) before encrypting it, and
    takes STUN answers off the inbound path (a binding response starts with 0x01 like a
    WireGuard initiation, so the datapath's divert hook never sees it; WireGuard's bytes 1-3
    are zero, STUN's byte 1 is not, so one byte test per datagram tells them apart).

    Peer relay: a relay-framed WireGuard datagram (the datapath's ``framed`` prefix sends it
    here without the divert hook) is unwrapped here: (relay ip:port, session id) must be a
    relay session the disco layer bound for a peer (:meth:`set_relay_sessions`), the peer's
    stable ``PeerEndpoint`` becomes the source, and the decrypted sender must be that same
    peer; anything else is dropped and counted."""

    def __init__(self, inner: Device, flt: InboundFilter, clock: Callable[[], float],
                 on_stun: Callable[[bytes, Any], None] | None = None) -> None:
        self.inner = inner
        self.flt = flt
        self.clock = clock
        self.on_stun = on_stun
        # (relay (ip, port), session id << 8) -> the peer's endpoint (set_relay_sessions)
        self._relay_in: dict[tuple[tuple[str, int], int], PeerEndpoint] = {}
        self.relay_rx_packets = 0
        self.relay_rx_bytes = 0
        self.relay_drops: dict[str, int] = {}

    def send_packet(self, ip_packet: bytes, now: float) -> list[Transmit]:
        self.flt.note_outbound(ip_packet, now)
        out = self.inner.send_packet(ip_packet, now)
        if out:  # a TUN packet: the peer carries data (not only handshakes), for the spray
            ep = out[-1].endpoint
            if type(ep) is PeerEndpoint:
                ep.data_at = now
        return out

    def set_relay_sessions(self, table: Mapping[tuple[tuple[str, int], int], PeerEndpoint]
                           ) -> None:
        """(relay (ip, port), session id) -> the peer's endpoint, for the sessions the disco
        layer bound. Keyed internally by the header's last 32 bits (session id << 8, reserved
        byte 0), so a packet needs one unpack and one lookup; replaced whole (atomic swap)."""
        self._relay_in = {(relay, sid << 8): pe for (relay, sid), pe in table.items()}

    def receive(self, datagram: memoryview, source: Any, now: float) -> Received:
        if datagram[0] == 0:
            # hot path of every packet that comes through a peer relay, inline: one unpack of
            # the header as two words (version/control/protocol; session id/reserved) and one
            # lookup; the drop reasons are worked out only when dropping
            if len(datagram) <= RELAY_HEADER_LEN:
                return self._drop("not_relay")
            w0, w1 = _RELAY_WORDS.unpack_from(datagram)
            pe = self._relay_in.get((source, w1)) if w0 == _RELAY_WG else None
            if pe is None:
                return self._drop(_relay_drop_reason(w0, w1))
            r = self.inner.receive(datagram[RELAY_HEADER_LEN:], pe, now)
            peer = r.peer
            if peer is not None and peer.public_key != pe.node_key:
                return self._drop("relay_wrong_peer")  # the session belongs to another peer
            self.relay_rx_packets += 1
            self.relay_rx_bytes += len(datagram)
            return r
        if datagram[1] and self.on_stun is not None:
            data = bytes(datagram)
            if is_stun(data):
                self.on_stun(data, source)
                return Received([], [], None)
        return self.inner.receive(datagram, source, now)

    def receive_run(self, view: memoryview, total: int, seg: int, source: Any,
                    now: float) -> list[Received] | None:
        """A GRO receive of relayed WireGuard (the datapath's ``framed`` run): when every
        segment carries the same whole header (one session, the bulk flow through a relay), one
        header check and one lookup serve all of them and each segment goes straight to the
        device, ~0.4 us less per packet than :meth:`receive` each. None (nothing consumed) when
        the headers differ, the session is unknown or a segment is header only: the caller then
        hands the segments to :meth:`receive` one by one, which counts each drop by reason."""
        n = same_heads(view, total, seg, RELAY_HEADER_LEN)
        if not n or total - (n - 1) * seg <= RELAY_HEADER_LEN:
            return None
        w0, w1 = _RELAY_WORDS.unpack_from(view)
        pe = self._relay_in.get((source, w1)) if w0 == _RELAY_WG else None
        if pe is None:
            return None
        recv, key, out, wrong = self.inner.receive, pe.node_key, [], 0
        step = seg - RELAY_HEADER_LEN
        for off in range(RELAY_HEADER_LEN, total, seg):
            end = off + step  # the view is the whole receive buffer: never read past total
            r = recv(view[off : end if end < total else total], pe, now)
            peer = r.peer
            if peer is not None and peer.public_key != key:
                self._drop("relay_wrong_peer")  # the session belongs to another peer
                wrong += min(seg, total - off + RELAY_HEADER_LEN)
                continue
            out.append(r)
        self.relay_rx_packets += len(out)
        self.relay_rx_bytes += total - wrong
        return out

    def _drop(self, reason: str) -> Received:
        self.relay_drops[reason] = self.relay_drops.get(reason, 0) + 1
        return Received([], [], None)

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
        on_stun: Callable[[bytes, Any], None] | None = None,
    ) -> None:
        self.tun = tun
        self.netconf = netconf
        self.flt = flt
        self.clock = clock
        self._wall_offset = time.time() - time.monotonic()
        holder: list[MeshDatapath] = []
        # roaming off: each peer's endpoint is its stable PeerEndpoint, whose route the disco
        # layer sets; a packet from a new source (or over DERP) must not replace it
        self.device = Device(
            private_key,
            under_load=lambda: bool(holder) and holder[0].under_load(),
            wall_clock_offset=self._wall_offset,
            mtu=TUN_MTU,
            roaming=False,
        )
        self.tracking = TrackingDevice(self.device, flt, clock, on_stun)
        self.datapath = MeshDatapath(
            self.tracking,
            tun,
            sock,
            clock=clock,
            divert=divert,
            inbound_filter=lambda packet, peer: flt.allow(packet, clock()),
            framed=RELAY_WIREGUARD_PREFIX,  # relayed WireGuard: straight to the tracking device
        )
        holder.append(self.datapath)
        self._addresses: set[str] = set()
        self._eps: dict[bytes, PeerEndpoint] = {}  # node key raw -> the peer's stable endpoint

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
        routes: Mapping[bytes, tuple[tuple[str, int] | None, int]] | None = None,
    ) -> None:
        """Make the device's peers exactly these (node key, allowed IPs, endpoint).

        ``routes`` (node key raw -> (direct, DERP region)) sets each peer's route before any
        handshake is started; without one a peer with no route yet goes to ``endpoint``.

        ``initiate_new`` starts a handshake with each added peer at once. A freshly started
        engine does this: a peer that still holds a session from our previous run would keep
        sending on it (we drop it: unknown index) until its own rekey timer fires (15 s);
        our initiation replaces that session right away.
        """
        wanted = {k.raw: (ips, ep) for k, ips, ep in peers}
        dp = self.datapath

        def apply(dev: Device, now: float) -> list[Transmit]:
            out: list[Transmit] = []
            for raw in [raw for raw in dev.peers if raw not in wanted]:
                dev.remove_peer(raw)
                gone = self._eps.pop(raw, None)
                if gone is not None:
                    dp._derp_eps.discard(gone)
                    dp.derp_routes = len(dp._derp_eps)
                    dp._spray_eps.discard(gone)
                    dp.spray_routes = len(dp._spray_eps)
            for raw, (ips, _) in wanted.items():
                new = raw not in dev.peers
                pe = self._eps.get(raw)
                if pe is None:
                    pe = self._eps[raw] = PeerEndpoint(raw)
                dev.set_peer(raw, allowed_ips=ips, endpoint=pe)
                if new and initiate_new and (pe.sa is not None or pe.derp_region):
                    out += dev.initiate_handshake(raw, now)
            return out

        # routes first (outside the lock: set_route takes it), so a new peer's first handshake
        # already goes where the disco layer says (DERP for a peer not reached directly yet)
        for raw, (_, ep) in wanted.items():
            pe = self._eps.get(raw)
            if pe is None:
                pe = self._eps[raw] = PeerEndpoint(raw)
            route = routes.get(raw) if routes is not None else None
            if route is not None and (route[0] is not None or route[1]):
                # a spray socket stays with its address (the route names only ip:port here)
                dp.set_route(pe, route[0], route[1], None,
                             pe.sock if route[0] == pe.direct else None)
            elif ep is not None and pe.direct is None and not pe.derp_region:
                dp.set_route(pe, ep, 0)
        transmits = self.datapath.call(lambda d, now: apply(self.device, now))
        if transmits:
            self.datapath.transmit(transmits)

    def set_endpoint(self, key: NodeKey, ep: tuple[str, int]) -> None:
        """Send to the peer directly at ``ep`` only (no DERP)."""
        self.set_route(key, ep, 0)

    def set_route(self, key: NodeKey, direct: tuple[str, int] | None, derp_region: int,
                  relay_hdr: bytes | None = None, sock: socket.socket | None = None) -> bool:
        """Where packets to the peer go: ``direct`` (ip, port; a peer relay when ``relay_hdr``
        is given; sent from spray socket ``sock`` when given) and/or DERP ``derp_region`` (both
        while mirroring). True if it changed."""
        pe = self._eps.get(key.raw)
        if pe is None:
            return False
        return self.datapath.set_route(pe, direct, derp_region, relay_hdr, sock)

    def add_spray_socket(self, sid: int, sock: socket.socket,
                         divert: Callable[[bytes, tuple[str, int]], bool]) -> None:
        """Receive WireGuard and disco on spray socket ``sid`` too (docs/magicsock.md)."""
        self.datapath.add_spray_socket(sid, sock, divert)

    def remove_spray_socket(self, sock: socket.socket) -> None:
        """Before closing a spray socket: no peer sends from it, the datapath stops polling it."""
        self.datapath.drop_sock_routes(sock)
        self.datapath.remove_socket(sock)

    def set_spray_inbound(self, table: Mapping[tuple[int, tuple[str, int]], bytes]) -> None:
        """(spray socket id, peer ip:port) -> peer node key: inbound WireGuard on a spray
        socket from that address is attributed to that peer's endpoint (replies follow it)."""
        self.datapath.spray_in = {k: pe for k, raw in table.items()
                                  if (pe := self._eps.get(raw)) is not None}

    def set_relay_inbound(self, sessions: Mapping[tuple[tuple[str, int], int], bytes]) -> None:
        """Relay sessions bound for peers: (relay (ip, port), session id) -> peer node key.
        Inbound relay-framed WireGuard from anything else is dropped (counted)."""
        self.tracking.set_relay_sessions(
            {k: pe for k, raw in sessions.items() if (pe := self._eps.get(raw)) is not None})

    def path_stats(self) -> dict[str, int]:
        """Packets/bytes in and out per path (direct, peer_relay, derp) for metrics. Direct is
        the UDP socket total minus relay traffic (it includes disco and STUN)."""
        d = self.datapath.stats()
        t = self.tracking
        rtx_p, rtx_b = d.get("relay_tx_packets", 0), d.get("relay_tx_bytes", 0)
        return {
            "direct_tx_packets": max(0, d.get("udp_tx_packets", 0) - rtx_p),
            "direct_tx_bytes": max(0, d.get("udp_tx_bytes", 0) - rtx_b),
            "direct_rx_packets": max(0, d.get("udp_rx_packets", 0) - t.relay_rx_packets),
            "direct_rx_bytes": max(0, d.get("udp_rx_bytes", 0) - t.relay_rx_bytes),
            "peer_relay_tx_packets": rtx_p,
            "peer_relay_tx_bytes": rtx_b,
            "peer_relay_rx_packets": t.relay_rx_packets,
            "peer_relay_rx_bytes": t.relay_rx_bytes,
            "derp_tx_packets": d.get("derp_tx_packets", 0),
            "derp_tx_bytes": d.get("derp_tx_bytes", 0),
            "derp_rx_packets": d.get("derp_rx_packets", 0),
            "derp_rx_bytes": d.get("derp_rx_bytes", 0),
        }

    def peer_endpoint(self, raw: bytes) -> PeerEndpoint | None:
        """The stable endpoint object of a peer (the source of its DERP-injected datagrams)."""
        return self._eps.get(raw)

    def set_derp_outbox(self, outbox: DerpOutbox | None) -> None:
        self.datapath.set_outbox(outbox)

    def inject(self, node_key_raw: bytes, data: bytes) -> bool:
        """A WireGuard datagram from the peer with this node key, received over DERP."""
        pe = self._eps.get(node_key_raw)
        if pe is None:
            return False
        self.datapath.inject(data, pe)
        return True

    def peer_stats(self) -> dict[bytes, PeerStats]:
        off = self._wall_offset

        def snap(dev: Any, now: float) -> dict[bytes, PeerStats]:
            return {
                raw: PeerStats(
                    p.endpoint.direct if isinstance(p.endpoint, PeerEndpoint)
                    else p.endpoint if isinstance(p.endpoint, tuple) else None,
                    p.tx_bytes,
                    p.rx_bytes,
                    None if p.last_handshake is None else p.last_handshake + off,
                    p.endpoint.data_at if isinstance(p.endpoint, PeerEndpoint) else None,
                )
                for raw, p in self.device.peers.items()
            }

        return self.datapath.call(snap)

    def stats(self) -> dict[str, int]:
        d = self.datapath.stats()
        d.update({f"filter_drop_{k}": v for k, v in self.flt.drops.items()})
        d.update({f"relay_drop_{k}": v for k, v in self.tracking.relay_drops.items()})
        return d

    def stop(self) -> None:
        self.datapath.stop()
        if self.netconf is not None:
            try:
                self.netconf.close()
            except Exception as e:  # cleanup goes on
                log.warning("interface cleanup failed: %s", e)
        self.tun.close()
