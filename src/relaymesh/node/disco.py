"""Disco manager (sans-IO): ping/pong with peers over the node's UDP socket, path choice per peer.

Datagrams and ``now`` in; datagrams to send (:class:`Send`) and finished CLI pings
(:class:`PingResult`) out. The daemon's shell feeds it disco datagrams that the datapath diverted
from the shared UDP socket, ticks it, and reads :meth:`DiscoManager.best_endpoint` to point each
WireGuard peer at the path :class:`~relaymesh.magicsock.pathsel.PeerPaths` chose.

A ping names the sender's node key; it is answered only when that node key and the sealing disco
key belong to the same peer of the network map, so a disco key cannot speak for another node.
Only direct candidates exist until DERP and peer relays land (call-me-maybe and relay allocation
actions are counted in ``skipped``). Everything malformed is dropped and counted in ``drops``.
"""

from __future__ import annotations

import collections
import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from relaymesh.disco import DiscoError, Ping, Pong, open_sealed, seal
from relaymesh.keys import DiscoKey, NodeKey, PrivateKey
from relaymesh.magicsock.pathsel import (
    Candidate,
    PathPolicy,
    PathReport,
    PeerPaths,
    SendPing,
)
from relaymesh.node.netmap import MapNode
from relaymesh.paths import Path

TXID_LEN = 12  # disco ping transaction id (codec TX_ID_LEN)
REPROBE_MIN_INTERVAL = 1.0  # s: bounds extra probing of a peer that has no path yet
CLI_PING_MAX = 256  # outstanding `relaymesh ping` probes kept; older ones are forgotten


@dataclass(frozen=True, slots=True)
class Send:
    data: bytes
    addr: tuple[str, int]


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
        self, disco_private: PrivateKey, node_key: NodeKey, random_bytes: Callable[[int], bytes]
    ) -> None:
        self._priv = disco_private
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
                p.paths.set_direct_candidates(n.endpoints)
                out += self._actions(p, p.paths.on_send(now))  # find a path before data needs it
            else:
                changed = set(n.endpoints) != set(p.node.endpoints)
                p.node = n
                p.paths.set_direct_candidates(n.endpoints)
                if changed:
                    out += self._reprobe(p, now)
        for pid in [pid for pid in self._peers if pid not in seen]:
            del self._peers[pid]
        self._by_disco = {
            p.node.disco_key: pid for pid, p in self._peers.items() if p.node.disco_key
        }
        return out

    def set_path_policy(self, peer_id: int, policy: PathPolicy) -> None:
        p = self._peers.get(peer_id)
        if p is not None:
            p.paths.policy = policy

    def note_activity(self, peer_id: int, now: float) -> list[Send]:
        """Data went to this peer: keeps heartbeats going (and probes after idle)."""
        p = self._peers.get(peer_id)
        return self._actions(p, p.paths.on_send(now)) if p is not None else []

    # -- I/O events -----------------------------------------------------------------------------

    def handle(
        self, data: bytes, src: tuple[str, int], now: float
    ) -> tuple[list[Send], list[PingResult]]:
        """One disco datagram from ``src``. Never raises."""
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
            peer.paths.on_ping_received(Candidate(Path.DIRECT, addr=src), now)
            self.pings_answered += 1
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
                return [], [PingResult(msg.tx_id, pid, Path.DIRECT, addr, max(0.0, now - sent))]
            if not peer.paths.on_pong(msg.tx_id, now):
                self.drops["unknown_pong"] += 1
            return [], []
        self.drops[f"unhandled_{type(msg).__name__}"] += 1
        return [], []

    def tick(self, now: float) -> list[Send]:
        out: list[Send] = []
        for p in self._peers.values():
            out += self._actions(p, p.paths.tick(now))
        return out

    def cli_ping(self, peer_id: int, now: float) -> tuple[list[bytes], list[Send]]:
        """Ping the peer on its chosen path, or on every direct candidate if none is chosen yet.

        Returns the transaction ids (one per address pinged) and the datagrams to send.
        """
        p = self._peers.get(peer_id)
        if p is None or p.node.disco_key is None:
            return [], []
        route = [c for c in p.paths.route(now) if c.kind is Path.DIRECT and c.addr]
        cands = route or [c for c in p.paths.candidates() if c.kind is Path.DIRECT and c.addr]
        txids: list[bytes] = []
        out: list[Send] = []
        for c in cands:
            assert c.addr is not None
            txid = self._rand(TXID_LEN)
            if len(self._cli_pings) >= CLI_PING_MAX:
                self._cli_pings.popitem(last=False)
            self._cli_pings[txid] = (peer_id, c.addr, now)
            txids.append(txid)
            out.append(Send(self._seal_ping(txid, p.node.disco_key), c.addr))
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

    def _reprobe(self, p: _Peer, now: float) -> list[Send]:
        """Probe every direct candidate now when the peer has no path yet (its endpoints just
        changed, or it pinged us), instead of waiting for PeerPaths' 5 s re-probe. At most once
        per REPROBE_MIN_INTERVAL. A PeerPaths without a chosen path holds nothing worth keeping
        but its candidates, so a fresh one (same policy and candidates) is probed from scratch."""
        if p.paths.best is not None or now - p.last_reprobe < REPROBE_MIN_INTERVAL:
            return []
        p.last_reprobe = now
        cands = [c.addr for c in p.paths.candidates() if c.kind is Path.DIRECT and c.addr]
        fresh = PeerPaths(random_bytes=self._rand, policy=p.paths.policy)
        fresh.set_direct_candidates(cands)
        p.paths = fresh
        return self._actions(p, fresh.on_send(now))

    def _seal_ping(self, txid: bytes, to: DiscoKey) -> bytes:
        return seal(Ping(txid, self.node_key), self._priv, to)

    def _actions(self, p: _Peer, actions: Iterable[object]) -> list[Send]:
        out: list[Send] = []
        for a in actions:
            if isinstance(a, SendPing) and a.cand.kind is Path.DIRECT and a.cand.addr:
                if p.node.disco_key is not None:
                    out.append(Send(self._seal_ping(a.txid, p.node.disco_key), a.cand.addr))
            else:
                self.skipped[type(a).__name__] += 1  # call-me-maybe, relays: need DERP (later)
        return out
