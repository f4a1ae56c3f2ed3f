"""Outbound path per peer in the datapath: direct UDP, peer relay, DERP, or a UDP path and DERP
(mirrored while suspect).

The WireGuard core treats endpoints as opaque hashables. The node gives every peer ONE stable
:class:`PeerEndpoint` object as its endpoint (and turns the core's roaming off, so it stays), and
changes where that object points when the path changes: ``sa`` (the socket address for
``sendto``, or None) and ``derp_region`` (0: not over DERP). The route is therefore cached per
peer and updated on path events (:meth:`MeshDatapath.set_route`), never computed per packet.

Hot path cost: while no peer uses DERP (``derp_routes == 0``) a batch goes straight to the plain
datapath send code; the only extra work per packet is the ``type(endpoint) is PeerEndpoint``
check in :meth:`MeshDatapath._sockaddr`. With DERP routes present each transmit is looked at once:
DERP copies go to a :class:`DerpOutbox` (a bounded hand-off to the asyncio thread that owns the
DERP client: ``call_soon_threadsafe`` once per burst, not per packet; a full box drops and counts).

Peer relay: the endpoint also carries ``relay_hdr`` (the 8-byte relay header of the session, or
None). With it, ``sa`` is the relay's ip:port and every WireGuard datagram to the peer leaves as
``relay_hdr + datagram``: the plain datapath send code does that (``Datapath._send_gso`` joins
the header into the GSO buffer once per run of one endpoint) and counts it (``relay_tx_*``), so a
relayed batch takes the same path as a direct one. Inbound relay-framed
WireGuard is unwrapped by the node's device wrapper (``node.engine.TrackingDevice``), which maps
(relay ip:port, session id) to the peer's ``PeerEndpoint``.

Spray sockets (birthday-paradox port spray, docs/magicsock.md): the endpoint also carries
``sock`` (None: the node's one socket). A peer reached through a spray socket's NAT mapping gets
its WireGuard sent from that socket (plain ``sendto``, no GSO; only batches sent while some peer
uses one, ``spray_routes != 0``, are looked at). The datapath polls the spray sockets too
(:meth:`MeshDatapath.add_spray_socket`); a datagram on spray socket ``i`` from an address the
disco layer knows as a peer's (``spray_in``) gets that peer's ``PeerEndpoint`` as its source, so
handshake responses go back out the same socket.

Inbound from DERP: :meth:`MeshDatapath.inject` runs a WireGuard datagram through the same locked
core path as a UDP datagram (device, inbound filter, TUN write, replies through the route), with
the peer's ``PeerEndpoint`` as the source so cookie replies and handshake responses follow the
peer's route too.
"""

from __future__ import annotations

import asyncio
import collections
import os
import socket
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from relaymesh.wireguard.datapath import Counters, Datapath, TransmitLike

DERP_OUTBOX_MAX = 2048  # packets waiting for the event loop; ~2.6 MB of 1280-byte packets.
#   The DERP client has its own 1 MiB write limit behind this; the box only has to absorb the
#   scheduling delay of the event loop (a few ms at line rate), so a full box means DERP is the
#   bottleneck and dropping (counted) is what TCP inside the tunnel expects.


class PeerEndpoint:
    """A peer's stable endpoint key in the WireGuard device (hashed by identity)."""

    __slots__ = ("data_at", "derp_region", "direct", "node_key", "relay_hdr", "sa", "sock")

    def __init__(self, node_key: bytes) -> None:
        self.node_key = node_key  # raw 32-byte node key: the DERP destination
        self.direct: tuple[str, int] | None = None  # (ip, port) as the disco layer names it
        self.sa: tuple[str, int] | None = None  # the socket address for sendto
        self.derp_region = 0  # != 0: also (or only) send over DERP in this region
        self.relay_hdr: bytes | None = None  # set: ``direct`` is a relay, prepend this header
        self.sock: socket.socket | None = None  # a spray socket to send from (None: the main)
        self.data_at: float | None = None  # when a tunnel packet from TUN last went to the peer
        #   (handshakes and keepalives excluded): the spray is for peers that carry data

    def describe(self) -> str:
        parts = []
        if self.direct:
            via = "relay " if self.relay_hdr else "spray " if self.sock is not None else ""
            parts.append(f"{via}{self.direct[0]}:{self.direct[1]}")
        if self.derp_region:
            parts.append(f"derp({self.derp_region})")
        return "+".join(parts) or "none"

    def __repr__(self) -> str:
        return f"PeerEndpoint({self.node_key[:4].hex()}, {self.describe()})"


DerpSend = Callable[[bytes, int, bytes], Any]  # (node key raw, region, packet)


class DerpOutbox:
    """Datapath threads -> event loop hand-off for DERP sends, bounded, drops counted."""

    def __init__(self, loop: asyncio.AbstractEventLoop, send: DerpSend,
                 maxlen: int = DERP_OUTBOX_MAX) -> None:
        self.loop = loop
        self.send = send
        self.maxlen = maxlen
        self._q: collections.deque[tuple[bytes, int, bytes]] = collections.deque()
        self._scheduled = False
        self.queued = 0
        self.dropped = 0

    def put(self, node_key: bytes, region: int, data: bytes) -> bool:
        """Any thread. deque append/popleft are atomic under the GIL; a flush that is already
        draining picks the packet up, otherwise one more flush is scheduled (harmless)."""
        if len(self._q) >= self.maxlen:
            self.dropped += 1
            return False
        self._q.append((node_key, region, data))
        self.queued += 1
        if not self._scheduled:
            self._scheduled = True
            try:
                self.loop.call_soon_threadsafe(self._flush)
            except RuntimeError:  # loop closed (shutdown)
                self._scheduled = False
                self._q.clear()
                self.dropped += 1
                return False
        return True

    def _flush(self) -> None:
        self._scheduled = False
        q = self._q
        while q:
            key, region, data = q.popleft()
            self.send(key, region, data)


class MeshDatapath(Datapath):
    """The WireGuard datapath with per-peer routes (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.outbox: DerpOutbox | None = None
        self.derp_routes = 0  # peers whose route includes DERP; 0 keeps the plain fast path
        self.spray_routes = 0  # peers sent to from a spray socket; 0 keeps the plain fast path
        self._derp_eps: set[PeerEndpoint] = set()
        self._spray_eps: set[PeerEndpoint] = set()
        # (spray socket id, (ip, port)) -> the peer's endpoint; replaced whole (atomic swap)
        self.spray_in: dict[tuple[int, tuple[str, int]], PeerEndpoint] = {}
        self.spray_counters: collections.Counter[str] = collections.Counter()
        self.derp_counters: collections.Counter[str] = collections.Counter()

    def set_outbox(self, outbox: DerpOutbox | None) -> None:
        self.outbox = outbox

    def set_route(self, ep: PeerEndpoint, direct: tuple[str, int] | None, region: int,
                  relay_hdr: bytes | None = None, sock: socket.socket | None = None) -> bool:
        """Point a peer's endpoint at ``direct`` (a relay when ``relay_hdr`` is given; sent from
        spray socket ``sock`` when given) and/or DERP ``region``; True if it changed."""
        if direct is None or relay_hdr is not None:
            sock = None
        if (ep.direct == direct and ep.derp_region == region and ep.relay_hdr == relay_hdr
                and ep.sock is sock):
            return False
        sa = Datapath._sockaddr(self, direct) if direct is not None else None
        with self.lock:
            ep.direct, ep.sa, ep.derp_region = direct, sa, region
            ep.relay_hdr = relay_hdr if direct is not None else None
            ep.sock = sock
            if sock is not None:
                self._spray_eps.add(ep)
            else:
                self._spray_eps.discard(ep)
            self.spray_routes = len(self._spray_eps)
            if region:
                self._derp_eps.add(ep)
            else:
                self._derp_eps.discard(ep)
            self.derp_routes = len(self._derp_eps)
        return True

    def forget(self, ep: PeerEndpoint) -> None:
        with self.lock:
            self._derp_eps.discard(ep)
            self._spray_eps.discard(ep)
            self.derp_routes = len(self._derp_eps)
            self.spray_routes = len(self._spray_eps)

    def add_spray_socket(self, sid: int, sock: socket.socket,
                         divert: Callable[[bytes, tuple[str, int]], bool] | None) -> None:
        """Receive from spray socket ``sid`` too: a known peer address (``spray_in``) becomes
        that peer's endpoint, anything else the plain ``(ip, port)``."""
        table = self

        def source(ep: tuple[str, int]) -> Any:
            return table.spray_in.get((sid, ep), ep)

        self.add_socket(sock, source, divert)

    def drop_sock_routes(self, sock: socket.socket) -> None:
        """A spray socket is closing: no peer sends from it any more (its direct goes too)."""
        for ep in [ep for ep in self._spray_eps if ep.sock is sock]:
            self.set_route(ep, None, ep.derp_region)

    def _sockaddr(self, endpoint: Hashable) -> Any:
        if type(endpoint) is PeerEndpoint:
            sa = endpoint.sa
            if sa is None:
                raise ValueError("peer has no direct path")
            return sa
        return super()._sockaddr(endpoint)

    def _send_all(self, transmits: Sequence[TransmitLike], c: Counters) -> None:
        # relay routes need nothing here: the plain send code puts an endpoint's relay_hdr in
        # front (once per GSO run) and counts it
        if not self.derp_routes and not self.spray_routes:
            super()._send_all(transmits, c)
            return
        udp: list[TransmitLike] = []
        outbox = self.outbox
        dc = self.derp_counters
        for tx in transmits:
            ep = tx.endpoint
            if type(ep) is PeerEndpoint:
                if ep.derp_region:
                    if outbox is not None and outbox.put(ep.node_key, ep.derp_region, tx.data):
                        dc["tx_packets"] += 1
                        dc["tx_bytes"] += len(tx.data)
                    else:
                        dc["tx_dropped"] += 1
                    if ep.sa is None:
                        continue
                ssock = ep.sock
                if ssock is not None and ep.sa is not None:
                    try:
                        n = ssock.sendto(tx.data, ep.sa)
                    except OSError as e:
                        self._count_error("spray_send_error", e)
                        continue
                    c.udp_tx_packets += 1
                    c.udp_tx_bytes += n
                    self.spray_counters["tx_packets"] += 1
                    continue
            udp.append(tx)
        if udp:
            super()._send_all(udp, c)

    def inject(self, data: bytes, source: PeerEndpoint) -> None:
        """A WireGuard datagram that arrived over DERP (event loop thread): decrypt under the
        device lock as if it came from the UDP socket, write packets to TUN, send replies."""
        c = self.counters
        flt = self.inbound_filter
        to_tun: list[bytes] = []
        with self.lock:
            now = self.clock()
            try:
                r = self.device.receive(memoryview(data), source, now)
            except Exception as e:
                self._count_error("core_receive_error", e)
                return
            peer = getattr(r, "peer", None)
            for p in r.packets:
                try:
                    ok = True if flt is None else flt(p, peer)
                except Exception as e:
                    self._count_error("filter_error", e)
                    ok = False
                if ok:
                    to_tun.append(p)
                else:
                    c.drops["filtered"] += 1
            transmits = list(r.transmits)
        self.derp_counters["rx_packets"] += 1
        self.derp_counters["rx_bytes"] += len(data)
        fd = self.tun.fileno()
        for p in to_tun:
            try:
                os.write(fd, p)
            except BlockingIOError:
                c.drops["tun_full"] += 1
            except OSError as e:
                self._count_error("tun_write_error", e)
        if transmits:
            self._send_all(transmits, c)

    def stats(self) -> dict[str, int]:
        d = super().stats()
        d.update({f"derp_{k}": v for k, v in self.derp_counters.items()})
        d.update({f"spray_{k}": v for k, v in self.spray_counters.items()})
        if self.outbox is not None:
            d["derp_outbox_dropped"] = self.outbox.dropped
        return d
