"""Disco manager (sans-IO): ping/pong/call-me-maybe with peers over UDP and DERP, path per peer.

Datagrams and ``now`` in; datagrams to send (:class:`Send`, over UDP to ``addr`` or over DERP to a
node key) and finished CLI pings (:class:`PingResult`) out. The daemon's shell feeds it disco
datagrams that the datapath diverted from the shared UDP socket or that arrived over DERP
(``handle(..., via_derp=region)``), ticks it, and reads :meth:`DiscoManager.route` to point each
WireGuard peer at the path :class:`~relaymesh.magicsock.pathsel.PeerPaths` chose.

A ping names the sender's node key; it is answered only when that node key and the sealing disco
key belong to the same peer of the network map, so a disco key cannot speak for another node.

NAT traversal (issue 5): a new or re-active peer is reached over DERP at once (its home region,
else ours); at the same time we ping every direct candidate and send call-me-maybe over DERP with
our own endpoints, so the peer pings us back from its side while we ping it: both NATs open a
mapping toward each other and the first pong wins. A ping that arrives over UDP from an address we
did not know teaches us that address (peer-reflexive candidate). Without a DERP home (no DERP map)
only direct paths exist and call-me-maybe is skipped (counted in ``skipped``).
Everything malformed is dropped and counted in ``drops``.
"""

from __future__ import annotations

import collections
import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from relaymesh.disco import MAX_ENDPOINTS, CallMeMaybe, DiscoError, Ping, Pong, open_sealed, seal
from relaymesh.keys import DiscoKey, NodeKey, PrivateKey
from relaymesh.magicsock.pathsel import (
    Candidate,
    PathPolicy,
    PathReport,
    PeerPaths,
    SendCallMeMaybe,
    SendPing,
)
from relaymesh.node.netmap import MapNode
from relaymesh.paths import Path

TXID_LEN = 12  # disco ping transaction id (codec TX_ID_LEN)
REPROBE_MIN_INTERVAL = 1.0  # s: bounds extra probing of a peer that has no path yet
CLI_PING_MAX = 256  # outstanding `relaymesh ping` probes kept; older ones are forgotten
DERP_HOST = "derp"  # Send.addr / PingResult.addr host for DERP: ("derp", region id)
UNSPECIFIED = (ipaddress.ip_address("0.0.0.0"), 0)  # a pong over DERP observed no UDP source


@dataclass(frozen=True, slots=True)
class Send:
    """One disco datagram: over UDP to ``addr``, or over DERP to node key ``derp`` (then
    ``addr`` is ``("derp", region)``)."""

    data: bytes
    addr: tuple[str, int]
    derp: NodeKey | None = None


@dataclass(frozen=True, slots=True)
class PingResult:
    """A pong for a CLI ping: which peer, on which path and address, after how long."""

    txid: bytes
    peer_id: int
    path: Path
    addr: tuple[str, int]
    latency: float


@dataclass
class _Peer:
    node: MapNode
    paths: PeerPaths
    last_reprobe: float = float("-inf")


class DiscoManager:
    def __init__(
        self,
        disco_private: PrivateKey,
        node_key: NodeKey,
        random_bytes: Callable[[int], bytes],
        *,
        home_region: int = 0,
    ) -> None:
        self._priv = disco_private
        self.home_region = home_region  # our home DERP region (0: none known)
        self.endpoints: list[tuple[str, int]] = []  # ours, sent in call-me-maybe
        self.disco_key = disco_private.disco_public()
        self.node_key = node_key
        self._rand = random_bytes
        self._peers: dict[int, _Peer] = {}
        self._by_disco: dict[DiscoKey, int] = {}
        self._cli_pings: collections.OrderedDict[bytes, tuple[int, tuple[str, int], float]] = (
            collections.OrderedDict()
        )
        self.drops: collections.Counter[str] = collections.Counter()
        self.skipped: collections.Counter[str] = collections.Counter()
        self.pings_answered = 0
        self.call_me_maybe_received = 0

    # -- peers ----------------------------------------------------------------------------------

    def set_peers(self, nodes: Iterable[MapNode], now: float) -> list[Send]:
        """Follow the network map: add, update and remove peers; probe new ones right away."""
        out: list[Send] = []
        seen: set[int] = set()
        for n in nodes:
            if n.disco_key is None:
                continue
            seen.add(n.id)
            p = self._peers.get(n.id)
            if p is None:
                p = _Peer(n, PeerPaths(random_bytes=self._rand))
                self._peers[n.id] = p
                p.paths.derp_region = self._region_for(n)
                p.paths.set_direct_candidates(n.endpoints)
                out += self._actions(p, p.paths.on_send(now))  # find a path before data needs it
            else:
                changed = set(n.endpoints) != set(p.node.endpoints)
                p.node = n
                p.paths.derp_region = self._region_for(n)
                p.paths.set_direct_candidates(n.endpoints)
                if changed:
                    out += self._reprobe(p, now)
        for pid in [pid for pid in self._peers if pid not in seen]:
            del self._peers[pid]
        self._by_disco = {
            p.node.disco_key: pid for pid, p in self._peers.items() if p.node.disco_key
        }
        return out

    def set_home_region(self, region: int) -> None:
        """Our home DERP region (from netcheck): peers whose home is unknown are reached there."""
        self.home_region = region
        for p in self._peers.values():
            p.paths.derp_region = self._region_for(p.node)

    def set_endpoints(self, endpoints: Iterable[tuple[str, int]]) -> None:
        """Our own direct endpoints (local addresses and the STUN mapping) for call-me-maybe."""
        self.endpoints = list(endpoints)[:MAX_ENDPOINTS]

    def set_path_policy(self, peer_id: int, policy: PathPolicy, now: float = 0.0) -> list[Send]:
        """Apply a per-peer path policy; a changed policy re-probes the peer at once."""
        p = self._peers.get(peer_id)
        if p is None:
            return []
        return self._actions(p, p.paths.set_policy(policy, now))

    def note_activity(self, peer_id: int, now: float) -> list[Send]:
        """Data went to this peer: keeps heartbeats going (and probes after idle)."""
        p = self._peers.get(peer_id)
        return self._actions(p, p.paths.on_send(now)) if p is not None else []

    # -- I/O events -----------------------------------------------------------------------------

    def handle(
        self, data: bytes, src: tuple[str, int], now: float, *, via_derp: int = 0
    ) -> tuple[list[Send], list[PingResult]]:
        """One disco datagram from UDP ``src``, or over DERP (``via_derp`` = the region it came
        through; ``src`` is then ignored). Never raises."""
        try:
            sender, msg = open_sealed(data, self._priv)
        except DiscoError:
            self.drops["bad_disco"] += 1
            return [], []
        pid = self._by_disco.get(sender)
        if pid is None:
            self.drops["unknown_sender"] += 1
            return [], []
        peer = self._peers[pid]
        if isinstance(msg, Ping):
            if msg.node_key != peer.node.node_key:
                self.drops["ping_node_key_mismatch"] += 1
                return [], []
            self.pings_answered += 1
            if via_derp:
                pong = Pong(msg.tx_id, UNSPECIFIED)
                reply = Send(seal(pong, self._priv, sender), (DERP_HOST, via_derp),
                             derp=peer.node.node_key)
                return [reply, *self._reprobe(peer, now)], []
            peer.paths.on_ping_received(Candidate(Path.DIRECT, addr=src), now)
            pong = Pong(msg.tx_id, (ipaddress.ip_address(src[0]), src[1]))
            # the peer is looking for us: if we have no path to it yet, look for it too
            return [Send(seal(pong, self._priv, sender), src), *self._reprobe(peer, now)], []
        if isinstance(msg, Pong):
            cli = self._cli_pings.pop(msg.tx_id, None)
            if cli is not None:
                cpid, addr, sent = cli
                if cpid != pid:
                    self.drops["pong_wrong_peer"] += 1
                    return [], []
                path = Path.DERP if addr[0] == DERP_HOST else Path.DIRECT
                return [], [PingResult(msg.tx_id, pid, path, addr, max(0.0, now - sent))]
            if not peer.paths.on_pong(msg.tx_id, now):
                self.drops["unknown_pong"] += 1
            return [], []
        if isinstance(msg, CallMeMaybe):
            # the peer is pinging these endpoints of ours right now: ping it back on each of its
            # endpoints so both NATs open toward each other at the same time
            for ip, port in msg.endpoints:
                if not ip.is_unspecified and port:
                    peer.paths.add_direct_candidate((str(ip), port))
            self.call_me_maybe_received += 1
            return self._reprobe(peer, now, force=True), []
        self.drops[f"unhandled_{type(msg).__name__}"] += 1
        return [], []

    def tick(self, now: float) -> list[Send]:
        out: list[Send] = []
        for p in self._peers.values():
            out += self._actions(p, p.paths.tick(now))
        return out

    def cli_ping(self, peer_id: int, now: float) -> tuple[list[bytes], list[Send]]:
        """Ping the peer on its chosen path (direct or DERP), or on every direct candidate if
        nothing is chosen yet. Returns the transaction ids (one per probe) and the datagrams."""
        p = self._peers.get(peer_id)
        if p is None or p.node.disco_key is None:
            return [], []
        route = p.paths.route(now)
        dests: list[tuple[str, int]] = []
        if route and route[0].kind is Path.DIRECT and route[0].addr:
            dests = [route[0].addr]
        elif route and route[0].kind is Path.DERP:
            dests = [(DERP_HOST, route[0].region)]
        else:
            dests = [c.addr for c in p.paths.candidates() if c.kind is Path.DIRECT and c.addr]
        txids: list[bytes] = []
        out: list[Send] = []
        for addr in dests:
            txid = self._rand(TXID_LEN)
            if len(self._cli_pings) >= CLI_PING_MAX:
                self._cli_pings.popitem(last=False)
            self._cli_pings[txid] = (peer_id, addr, now)
            txids.append(txid)
            data = self._seal_ping(txid, p.node.disco_key)
            derp = p.node.node_key if addr[0] == DERP_HOST else None
            out.append(Send(data, addr, derp=derp))
        return txids, out

    def forget_pings(self, txids: Iterable[bytes]) -> None:
        for t in txids:
            self._cli_pings.pop(t, None)

    # -- queries --------------------------------------------------------------------------------

    def best_endpoint(self, peer_id: int, now: float) -> tuple[str, int] | None:
        p = self._peers.get(peer_id)
        if p is None:
            return None
        for c in p.paths.route(now):
            if c.kind is Path.DIRECT and c.addr is not None:
                return c.addr
        return None

    def route(self, peer_id: int, now: float) -> tuple[tuple[str, int] | None, int]:
        """Where WireGuard packets to the peer go now: (direct address or None, DERP region or
        0). Both are set while a direct path is suspect (mirrored); neither when nothing is
        known (the caller then falls back to an advertised endpoint)."""
        p = self._peers.get(peer_id)
        if p is None:
            return None, 0
        direct: tuple[str, int] | None = None
        region = 0
        for c in p.paths.route(now):
            if c.kind is Path.DIRECT and c.addr is not None:
                direct = c.addr
            elif c.kind is Path.DERP:
                region = c.region
        return direct, region

    def describe(self, peer_id: int, now: float) -> str | None:
        """``direct ip:port`` or ``derp(region)`` for status; None when there is no path."""
        p = self._peers.get(peer_id)
        if p is None:
            return None
        r = p.paths.route(now)
        return r[0].describe() if r else None

    def path(self, peer_id: int, now: float) -> Path:
        p = self._peers.get(peer_id)
        return p.paths.current_path(now) if p is not None else Path.NONE

    def report(self, peer_id: int, now: float) -> list[PathReport]:
        p = self._peers.get(peer_id)
        return p.paths.report(now) if p is not None else []

    def next_deadline(self) -> float | None:
        ds = [d for p in self._peers.values() if (d := p.paths.next_deadline()) is not None]
        return min(ds) if ds else None

    # -- internals ------------------------------------------------------------------------------

    def _region_for(self, n: MapNode) -> int | None:
        return n.home_derp or self.home_region or None

    def _reprobe(self, p: _Peer, now: float, *, force: bool = False) -> list[Send]:
        """Probe every candidate now when the peer has no path yet (its endpoints just changed,
        or it pinged us) or when it asked us to (call-me-maybe, ``force``), instead of waiting
        for PeerPaths' 5 s re-probe. At most once per REPROBE_MIN_INTERVAL per peer."""
        if (p.paths.best is not None and not force) or now - p.last_reprobe < REPROBE_MIN_INTERVAL:
            return []
        p.last_reprobe = now
        return self._actions(p, p.paths.reprobe_now(now))

    def _seal_ping(self, txid: bytes, to: DiscoKey) -> bytes:
        return seal(Ping(txid, self.node_key), self._priv, to)

    def _actions(self, p: _Peer, actions: Iterable[object]) -> list[Send]:
        out: list[Send] = []
        disco = p.node.disco_key
        for a in actions:
            if isinstance(a, SendPing) and a.cand.kind is Path.DIRECT and a.cand.addr:
                if disco is not None:
                    out.append(Send(self._seal_ping(a.txid, disco), a.cand.addr))
            elif isinstance(a, SendCallMeMaybe) and p.paths.derp_region and disco is not None:
                eps = tuple((ipaddress.ip_address(ip), port) for ip, port in self.endpoints)
                data = seal(CallMeMaybe(eps), self._priv, disco)
                out.append(Send(data, (DERP_HOST, p.paths.derp_region), derp=p.node.node_key))
            else:
                self.skipped[type(a).__name__] += 1  # no DERP for call-me-maybe; relays: later
        return out
