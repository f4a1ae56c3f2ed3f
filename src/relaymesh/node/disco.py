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

Peer relays (issue 6, client side). ``set_relays`` names the relays this node may use (peers in
the map's ``relay.may_use`` that announce a relay port; the daemon computes it) and, for
``debug path``, the announcing relays it may not use and why. When PeerPaths asks for relays
(``AllocateRelays``: the best path is not a trusted direct one) we send an allocate request to
every candidate relay at once over DERP (our own relay server, if we run one, allocates
in-process through ``local_relay``). An allocate response (or a call-me-maybe-via from the peer)
gives a relay endpoint: we tell the peer (call-me-maybe-via over DERP), bind to every relay
address from our one UDP socket (bind -> challenge -> answer, :class:`~relaymesh.relay.BindClient`),
and once answered add the path to PeerPaths as a PEER_RELAY candidate and disco-ping the peer
through it (relay header + disco). The first pong makes it usable. A call-me-maybe-via naming a
relay that is not ours to use is refused and shown by ``debug path`` with the reason. Disco
through a relay is accepted only on a (relay address, session id) we bound for that peer.

Relay server side: an allocate request that arrives over DERP goes to ``on_allocate`` (the
daemon's RelayService, which checks the policy for both clients); its sealed answer goes back
over DERP.

Birthday-paradox port spray (docs/magicsock.md, :mod:`relaymesh.magicsock.spray`): with our
own netcheck result (:meth:`DiscoManager.set_nat`) a hard-NAT node that has had no direct path to
an active peer for ``SPRAY_DELAY`` opens spray sockets (ids it names; the shell opens them,
:meth:`DiscoManager.take_socket_changes`), pings the peer from each and sends a spray-request
over DERP; an EIM node answers a spray-request by pinging random ports of the sender's public ip
from its one socket. Every datagram names its local socket (``Send.sock``, ``handle(sock=)``):
a ping that lands on spray socket i is answered from socket i, and the peer's candidate on it
carries ``sock=i`` so WireGuard follows (:meth:`DiscoManager.route_socket`).
"""

from __future__ import annotations

import collections
import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from relaymesh.disco import (
    MAX_ENDPOINTS,
    AllocateRequest,
    AllocateResponse,
    CallMeMaybe,
    CallMeMaybeVia,
    DiscoError,
    Ping,
    Pong,
    RelayEndpoint,
    open_sealed,
    seal,
)
from relaymesh.disco.codec import LOAD_PERMILLE_MAX, SprayRequest
from relaymesh.keys import DiscoKey, NodeKey, PrivateKey
from relaymesh.magicsock.pathsel import (
    SESSION_ACTIVE_TIMEOUT,
    AllocateRelays,
    Candidate,
    PathPolicy,
    PathReport,
    PeerPaths,
    SendCallMeMaybe,
    SendPing,
)
from relaymesh.magicsock.sock import usable_endpoint_ip
from relaymesh.magicsock.spray import Sprayer, SprayStart, is_public_endpoint, role_for
from relaymesh.node.netmap import MapNode
from relaymesh.paths import Path
from relaymesh.relay.header import (
    HEADER_LEN,
    PROTO_DISCO,
    PROTO_WIREGUARD,
    HeaderError,
    decode_header,
    encode_header,
)
from relaymesh.relay.session import BindClient, BindError

TXID_LEN = 12  # disco ping transaction id (codec TX_ID_LEN)
REPROBE_MIN_INTERVAL = 1.0  # s: bounds extra probing of a peer that has no path yet
CLI_PING_MAX = 256  # outstanding `relaymesh ping` probes kept; older ones are forgotten
DERP_HOST = "derp"  # Send.addr / PingResult.addr host for DERP: ("derp", region id)
UNSPECIFIED = (ipaddress.ip_address("0.0.0.0"), 0)  # a pong over DERP observed no UDP source
MAX_BINDS = 1024  # outstanding relay binds kept; a flood of endpoints cannot grow memory
BIND_RETRY = 2.0  # s: a bind in flight (or just answered) is not restarted before this: both
#   peers allocate and send call-me-maybe-via at once, and a second bind with a new generation
#   would orphan the first one's challenge
NOT_AUTHORIZED = "not authorized: the policy grants this node no use of this relay (relay.may_use)"

Addr = tuple[str, int]
RelayKey = tuple[Addr, int]  # (relay ip:port, session id)


@dataclass(frozen=True, slots=True)
class Send:
    """One disco datagram: over UDP to ``addr``, or over DERP to node key ``derp`` (then
    ``addr`` is ``("derp", region)``)."""

    data: bytes
    addr: tuple[str, int]
    derp: NodeKey | None = None
    sock: int = 0  # local socket to send from: 0 the node's one socket, else a spray socket


@dataclass(frozen=True, slots=True)
class PingResult:
    """A pong for a CLI ping: which peer, on which path and address, after how long."""

    txid: bytes
    peer_id: int
    path: Path
    addr: tuple[str, int]
    latency: float
    relay: str = ""  # peer relay name (path peer_relay)
    session: int = 0  # peer relay session id


@dataclass(frozen=True, slots=True)
class RelayInfo:
    """A relay this node may use: reached over DERP by ``node_key`` in ``region``."""

    name: str
    disco_key: DiscoKey
    node_key: NodeKey
    region: int


@dataclass
class _Bind:
    client: BindClient
    peer_id: int
    cand: Candidate
    idle_lifetime: float
    sent_at: float


@dataclass
class _Peer:
    node: MapNode
    paths: PeerPaths
    last_reprobe: float = float("-inf")
    data_at: float | None = None  # last tunnel data to the peer (note_data)


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
        # peer relays (client side)
        self.self_name = ""
        self.relays: dict[DiscoKey, RelayInfo] = {}
        self.unauthorized_relays: dict[str, str] = {}  # relay name -> why we may not use it
        self.local_relay: Callable[[DiscoKey], RelayEndpoint | None] | None = None
        self.on_allocate: Callable[[bytes], tuple[DiscoKey, bytes] | None] | None = None
        self._alloc_gen = 0
        self._bind_gen = 0
        self._pending_alloc: dict[tuple[DiscoKey, DiscoKey], int] = {}  # (relay, peer) -> gen
        self._relay_load: dict[str, float] = {}  # relay name -> load 0..1 of its last answer
        self._binds: collections.OrderedDict[RelayKey, _Bind] = collections.OrderedDict()
        self._relay_paths: dict[RelayKey, tuple[int, Candidate]] = {}
        self._bound_at: dict[RelayKey, float] = {}
        self._cli_cands: dict[bytes, Candidate] = {}
        self.relay_counters: collections.Counter[str] = collections.Counter()
        # birthday-paradox spray (magicsock.spray)
        self.spray = Sprayer(random_bytes)
        self._spray_txids: dict[bytes, tuple[int, float]] = {}  # EIM side: txid -> (peer, t)
        self._socks_to_open: list[int] = []
        self._socks_to_close: list[int] = []
        self._probe_payload: dict[int, bytes] = {}  # EIM side: peer -> the sealed probe ping

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
                # find a path before data needs it
                out += self._actions(p, p.paths.on_send(now), now)
            else:
                changed = set(n.endpoints) != set(p.node.endpoints)
                p.node = n
                p.paths.derp_region = self._region_for(n)
                p.paths.set_direct_candidates(n.endpoints)
                if changed:
                    out += self._reprobe(p, now)
        for pid in [pid for pid in self._peers if pid not in seen]:
            del self._peers[pid]
            self.spray.forget_peer(pid)
            self._socks_to_close += self.spray.take_closed()
        for k in [k for k, (pid, _) in self._relay_paths.items() if pid not in self._peers]:
            del self._relay_paths[k]
        self._bound_at = {k: t for k, t in self._bound_at.items() if k in self._relay_paths}
        for k in [k for k, b in self._binds.items() if b.peer_id not in self._peers]:
            del self._binds[k]
        self._apply_relay_availability()
        self._by_disco = {
            p.node.disco_key: pid for pid, p in self._peers.items() if p.node.disco_key
        }
        return out

    def set_relays(self, relays: Iterable[RelayInfo], unauthorized: dict[str, str]) -> None:
        """The relays we may use, and (for ``debug path``) those announced that we may not.
        A relay no longer usable loses its paths at once."""
        new = {r.disco_key: r for r in relays}
        gone = {r.name for k, r in self.relays.items() if k not in new}
        self.relays = new
        self.unauthorized_relays = dict(unauthorized)
        for name in gone:
            self._drop_relay(name)
        self._apply_relay_availability()

    def set_local_relay(self, alloc: Callable[[DiscoKey], RelayEndpoint | None] | None) -> None:
        """Our own relay server (in-process allocation), or None when it is off."""
        had = self.local_relay is not None
        self.local_relay = alloc
        if had and alloc is None:
            self._drop_relay(self.self_name)
        self._apply_relay_availability()

    def _drop_relay(self, name: str) -> None:
        for k in [k for k, (_, c) in self._relay_paths.items() if c.relay == name]:
            del self._relay_paths[k]
        for k in [k for k, b in self._binds.items() if b.cand.relay == name]:
            del self._binds[k]
        for p in self._peers.values():
            p.paths.remove_relay(name)
        self._relay_load.pop(name, None)

    def _apply_relay_availability(self) -> None:
        avail = bool(self.relays) or self.local_relay is not None
        usable = {r.name for r in self.relays.values()}
        for p in self._peers.values():
            p.paths.relays_available = avail
            for name in usable:
                p.paths.unexclude(f"peer-relay {name}")
            for name, why in self.unauthorized_relays.items():
                p.paths.exclude(f"peer-relay {name}", why)

    def set_home_region(self, region: int) -> None:
        """Our home DERP region (from netcheck): peers whose home is unknown are reached there."""
        self.home_region = region
        for p in self._peers.values():
            p.paths.derp_region = self._region_for(p.node)

    def set_nat(self, udp: bool, mapping_varies: bool | None, public_ip: str = "") -> None:
        """Our own netcheck result: whether we spray (hard), probe (EIM) or neither."""
        self.spray.role = role_for(udp, mapping_varies)
        self.spray.public_ip = public_ip if udp else ""

    def close_spray_sockets(self) -> None:
        """Close every spray socket (the engine stops); their candidates go too."""
        closed = self.spray.close_all()
        for s in closed:
            for p in self._peers.values():
                p.paths.remove_sock(s)
        self._socks_to_close += closed

    def take_socket_changes(self) -> tuple[list[int], list[int]]:
        """Spray socket ids the shell must open (before sending this call's datagrams) and
        close. Datagrams for a socket id that is not open are dropped by the shell."""
        o, c = self._socks_to_open, self._socks_to_close
        self._socks_to_open, self._socks_to_close = [], []
        return o, c

    def set_endpoints(self, endpoints: Iterable[tuple[str, int]]) -> None:
        """Our own direct endpoints (local addresses and the STUN mapping) for call-me-maybe."""
        self.endpoints = list(endpoints)[:MAX_ENDPOINTS]

    def set_path_policy(self, peer_id: int, policy: PathPolicy, now: float = 0.0) -> list[Send]:
        """Apply a per-peer path policy; a changed policy re-probes the peer at once."""
        p = self._peers.get(peer_id)
        if p is None:
            return []
        return self._actions(p, p.paths.set_policy(policy, now), now)

    def note_data(self, peer_id: int, at: float) -> None:
        """A tunnel packet (not a handshake or keepalive) went to this peer at ``at``: only
        such peers are worth a spray."""
        p = self._peers.get(peer_id)
        if p is not None and (p.data_at is None or at > p.data_at):
            p.data_at = at

    def note_activity(self, peer_id: int, now: float) -> list[Send]:
        """Data went to this peer: keeps heartbeats going (and probes after idle)."""
        p = self._peers.get(peer_id)
        return self._actions(p, p.paths.on_send(now), now) if p is not None else []

    # -- I/O events -----------------------------------------------------------------------------

    def handle(
        self, data: bytes, src: tuple[str, int], now: float, *, via_derp: int = 0, sock: int = 0
    ) -> tuple[list[Send], list[PingResult]]:
        """One disco datagram from UDP ``src`` on local socket ``sock`` (0: the node's one
        socket, else a spray socket), or over DERP (``via_derp`` = the region it came through;
        ``src`` is then ignored). Never raises."""
        if sock and via_derp:
            sock = 0
        if data[:1] == b"\x00" and not via_derp:
            if sock:
                self.drops["spray_not_disco"] += 1
                return [], []
            return self._handle_relayed(data, src, now)
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
        if sock:
            return self._handle_on_spray_sock(peer, pid, msg, src, sock, now)
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
            if msg.tx_id in self._spray_txids:
                return self._on_spray_pong(peer, pid, msg, src, now)
            return self._on_pong(peer, pid, msg, now)
        if isinstance(msg, SprayRequest) and via_derp:
            return self._on_spray_request(peer, pid, msg, now), []
        if isinstance(msg, CallMeMaybe):
            # the peer is pinging these endpoints of ours right now: ping it back on each of its
            # endpoints so both NATs open toward each other at the same time
            for ip, port in msg.endpoints:
                if not ip.is_unspecified and port:
                    peer.paths.add_direct_candidate((str(ip), port))
            self.call_me_maybe_received += 1
            return self._reprobe(peer, now, force=True), []
        if isinstance(msg, AllocateRequest) and via_derp:
            return self._serve_allocate(data, peer, via_derp), []
        if isinstance(msg, AllocateResponse) and via_derp:
            return self._on_allocate_response(sender, msg, now), []
        if isinstance(msg, CallMeMaybeVia) and via_derp:
            return self._on_call_me_maybe_via(peer, sender, msg.endpoint, now), []
        self.drops[f"unhandled_{type(msg).__name__}"] += 1
        return [], []

    # -- birthday-paradox spray ---------------------------------------------------------------

    def _handle_on_spray_sock(self, peer: _Peer, pid: int, msg: object, src: Addr, sock: int,
                              now: float) -> tuple[list[Send], list[PingResult]]:
        """Disco from the peer on spray socket ``sock``: the first hit wins the spray; a ping
        is answered from the same socket, and the peer's address on it becomes a candidate
        that we probe at once (from that socket)."""
        if not self.spray.claim(sock, pid):
            self.drops["spray_socket_not_winner"] += 1
            return [], []
        out: list[Send] = []
        disco = peer.node.disco_key
        if isinstance(msg, Ping):
            if msg.node_key != peer.node.node_key or disco is None:
                self.drops["ping_node_key_mismatch"] += 1
                return [], []
            self.pings_answered += 1
            pong = Pong(msg.tx_id, (ipaddress.ip_address(src[0]), src[1]))
            out.append(Send(seal(pong, self._priv, disco), src, sock=sock))
        elif isinstance(msg, Pong):
            if msg.tx_id in self._cli_pings:
                return self._on_pong(peer, pid, msg, now)
            if peer.paths.on_pong(msg.tx_id, now):
                return [], []
            # a pong to one of the spray pings themselves (the peer's NAT let it in)
        else:
            self.drops[f"spray_unhandled_{type(msg).__name__}"] += 1
            return [], []
        cand = peer.paths.add_direct_candidate(src, sock)
        if not peer.paths.is_trusted(cand, now):
            out += self._actions(peer, peer.paths.probe(cand, now), now)
        return out, []

    def _on_spray_pong(self, peer: _Peer, pid: int, msg: Pong, src: Addr,
                       now: float) -> tuple[list[Send], list[PingResult]]:
        """EIM side: one of our random-port probes landed on the peer's spray socket."""
        owner, _ = self._spray_txids[msg.tx_id]
        if owner != pid:
            self.drops["pong_wrong_peer"] += 1
            return [], []
        self.spray.stop_round(pid)
        self.spray.counters["probe_hits"] = self.spray.counters.get("probe_hits", 0) + 1
        cand = peer.paths.add_direct_candidate(src)
        if peer.paths.is_trusted(cand, now):
            return [], []
        return self._actions(peer, peer.paths.probe(cand, now), now), []

    def _on_spray_request(self, peer: _Peer, pid: int, msg: SprayRequest,
                          now: float) -> list[Send]:
        """EIM side: probe random ports of the peer's public ip (only an ip it reported)."""
        ip = str(msg.ip)
        known = {a[0] for a in peer.node.endpoints} | {
            c.addr[0] for c in peer.paths.candidates()
            if c.kind is Path.DIRECT and c.addr is not None and not c.sock}
        why = self.spray.accept_request(
            pid, ip, now, ip_known=ip in known,
            direct_allowed=peer.paths.policy is not PathPolicy.NO_DIRECT)
        if why is not None:
            self.drops[f"spray_{why}"] += 1
            return []
        rnd = self.spray.round_of(pid)
        disco = peer.node.disco_key
        if rnd is None or disco is None:
            return []
        txid = self._rand(TXID_LEN)
        self._probe_payload[pid] = self._seal_ping(txid, disco)  # one ping for every probe
        self._spray_txids[txid] = (pid, now)
        return self._due_probes(now)

    def _due_probes(self, now: float) -> list[Send]:
        out: list[Send] = []
        for pid, ip, ports in self.spray.due_probes(now):
            payload = self._probe_payload.get(pid)
            if payload is not None and pid in self._peers:
                out += [Send(payload, (ip, port)) for port in ports]
        return out

    def _start_spray(self, p: _Peer, st: SprayStart, targets: list[Addr]) -> list[Send]:
        """Hard side: ping the peer's endpoints from every new spray socket, then ask the peer
        (over DERP) to probe our public ip."""
        disco = p.node.disco_key
        region = p.paths.derp_region
        if disco is None or not region:
            return []
        self._socks_to_open += st.socks
        ping = self._seal_ping(self._rand(TXID_LEN), disco)
        out = [Send(ping, t, sock=s) for s in st.socks for t in targets]
        req = SprayRequest(ipaddress.ip_address(self.spray.public_ip), len(st.socks),
                           st.generation)
        out.append(Send(seal(req, self._priv, disco), (DERP_HOST, region),
                        derp=p.node.node_key))
        return out

    def _spray_targets(self, p: _Peer) -> list[Addr]:
        seen: list[Addr] = []
        for a in [*p.node.endpoints, *(c.addr for c in p.paths.candidates()
                                       if c.kind is Path.DIRECT and c.addr and not c.sock)]:
            if a is not None and a not in seen and is_public_endpoint(a[0]):
                seen.append(a)
        return seen[: self.spray.config.max_targets]

    def _spray_tick(self, now: float) -> list[Send]:
        out: list[Send] = []
        for pid, p in self._peers.items():
            targets = self._spray_targets(p)
            st = self.spray.consider(
                pid, now, last_send=p.data_at,
                active=p.data_at is not None and now - p.data_at < SESSION_ACTIVE_TIMEOUT,
                direct=p.paths.has_trusted_direct(now),
                can_spray=bool(targets) and bool(p.paths.derp_region)
                and p.node.disco_key is not None
                and p.paths.policy is not PathPolicy.NO_DIRECT)
            if st is not None:
                out += self._start_spray(p, st, targets)
        closed = self.spray.tick(now, lambda pid, sock: self._spray_sock_in_use(pid, sock, now))
        for s in closed:
            for p in self._peers.values():
                p.paths.remove_sock(s)
        self._socks_to_close += closed
        out += self._due_probes(now)
        for t in [t for t, (_, at) in self._spray_txids.items()
                  if now - at > self.spray.config.window]:
            del self._spray_txids[t]
        self._probe_payload = {pid: v for pid, v in self._probe_payload.items()
                               if self.spray.round_of(pid) is not None}
        return out

    def _spray_sock_in_use(self, pid: int, sock: int, now: float) -> bool:
        p = self._peers.get(pid)
        if p is None:
            return False
        return any(c.kind is Path.DIRECT and c.sock == sock for c in p.paths.route(now))

    def route_socket(self, peer_id: int, now: float) -> int:
        """The local socket of the peer's direct route: 0 (the node's one socket) or a spray
        socket id."""
        p = self._peers.get(peer_id)
        if p is None:
            return 0
        for c in p.paths.route(now):
            if c.kind is Path.DIRECT:
                return c.sock
        return 0

    def spray_inbound(self) -> dict[tuple[int, Addr], bytes]:
        """(spray socket id, peer address) -> the peer's raw node key, for every candidate on a
        spray socket: inbound WireGuard on that socket from that address is that peer's."""
        out: dict[tuple[int, Addr], bytes] = {}
        for p in self._peers.values():
            for c in p.paths.candidates():
                if c.sock and c.addr is not None:
                    out[(c.sock, c.addr)] = p.node.node_key.raw
        return out

    def _on_pong(self, peer: _Peer, pid: int, msg: Pong,
                 now: float) -> tuple[list[Send], list[PingResult]]:
        cli = self._cli_pings.pop(msg.tx_id, None)
        if cli is not None:
            cpid, addr, sent = cli
            cand = self._cli_cands.pop(msg.tx_id, None)
            if cpid != pid:
                self.drops["pong_wrong_peer"] += 1
                return [], []
            if cand is not None and cand.kind is Path.PEER_RELAY:
                return [], [PingResult(msg.tx_id, pid, Path.PEER_RELAY, addr,
                                       max(0.0, now - sent), cand.relay, cand.session)]
            path = Path.DERP if addr[0] == DERP_HOST else Path.DIRECT
            return [], [PingResult(msg.tx_id, pid, path, addr, max(0.0, now - sent))]
        if not peer.paths.on_pong(msg.tx_id, now):
            self.drops["unknown_pong"] += 1
        return [], []

    # -- peer relays ------------------------------------------------------------------------------

    def _serve_allocate(self, data: bytes, peer: _Peer, region: int) -> list[Send]:
        """We run a relay: a peer asks for a session (the relay service checks the policy)."""
        if self.on_allocate is None:
            self.relay_counters["allocate_no_relay_server"] += 1
            return []
        res = self.on_allocate(data)
        if res is None:
            self.relay_counters["allocate_refused"] += 1
            return []
        requester, sealed = res
        if requester != peer.node.disco_key:
            self.relay_counters["allocate_wrong_requester"] += 1
            return []
        self.relay_counters["allocate_answered"] += 1
        return [Send(sealed, (DERP_HOST, region), derp=peer.node.node_key)]

    def _allocate(self, p: _Peer, now: float) -> list[Send]:
        """Ask every relay we may use, at once, for a session with this peer."""
        disco = p.node.disco_key
        if disco is None:
            return []
        out: list[Send] = []
        for r in self.relays.values():
            region = r.region or self.home_region
            if not region:
                self.relay_counters["allocate_no_derp"] += 1
                continue
            self._alloc_gen += 1
            self._pending_alloc[(r.disco_key, disco)] = self._alloc_gen
            req = AllocateRequest(self.disco_key, disco, self._alloc_gen)
            out.append(Send(seal(req, self._priv, r.disco_key), (DERP_HOST, region),
                            derp=r.node_key))
            self.relay_counters["allocate_sent"] += 1
        if self.local_relay is not None:
            ep = self.local_relay(disco)
            if ep is not None:
                self.relay_counters["allocate_local"] += 1
                out += self._use_endpoint(p, ep, self.self_name, now, tell_peer=True)
        return out

    def _on_allocate_response(self, sender: DiscoKey, msg: AllocateResponse,
                              now: float) -> list[Send]:
        ep = msg.endpoint
        relay = self.relays.get(sender)
        if relay is None or ep.server_disco != sender:
            self.relay_counters["allocate_response_unknown_relay"] += 1
            return []
        c0, c1 = ep.client_discos
        if self.disco_key not in (c0, c1):
            self.relay_counters["allocate_response_not_ours"] += 1
            return []
        other = c1 if c0 == self.disco_key else c0
        if self._pending_alloc.get((sender, other)) != msg.generation:
            self.relay_counters["allocate_response_stale"] += 1
            return []
        pid = self._by_disco.get(other)
        if pid is None:
            self.relay_counters["allocate_response_unknown_peer"] += 1
            return []
        self.relay_counters["allocate_response"] += 1
        load = msg.load_permille / LOAD_PERMILLE_MAX
        self._relay_load[relay.name] = load
        p = self._peers[pid]
        for c in p.paths.candidates():  # a bound path on this relay ranks by its new load
            if c.kind is Path.PEER_RELAY and c.relay == relay.name:
                p.paths.set_relay_candidate(c, idle_lifetime=ep.idle_lifetime_ms / 1000.0,
                                            load=load)
        return self._use_endpoint(p, ep, relay.name, now, tell_peer=True)

    def _on_call_me_maybe_via(self, peer: _Peer, sender: DiscoKey, ep: RelayEndpoint,
                              now: float) -> list[Send]:
        """The peer allocated a relay session for us both: use it if the relay is ours to use."""
        if sender not in ep.client_discos or self.disco_key not in ep.client_discos:
            self.relay_counters["cmmv_not_party"] += 1
            return []
        relay = self.relays.get(ep.server_disco)
        if relay is not None:
            name = relay.name
        elif ep.server_disco == self.disco_key and self.local_relay is not None:
            name = self.self_name  # the peer uses our own relay server: we are one of its ends
        else:
            rid = self._by_disco.get(ep.server_disco)
            name = self._peers[rid].node.name if rid is not None else ep.server_disco.short
            self.relay_counters["cmmv_relay_not_authorized"] += 1
            why = f"call-me-maybe-via from {peer.node.name} refused: {NOT_AUTHORIZED}"
            peer.paths.exclude(f"peer-relay {name}", why)
            return []
        self.relay_counters["cmmv_received"] += 1
        return self._use_endpoint(peer, ep, name, now, tell_peer=False)

    def _use_endpoint(self, p: _Peer, ep: RelayEndpoint, name: str, now: float, *,
                      tell_peer: bool) -> list[Send]:
        """Tell the peer (call-me-maybe-via), bind to every relay address not working yet."""
        out: list[Send] = []
        disco = p.node.disco_key
        if disco is None:
            return out
        if tell_peer and p.paths.derp_region:
            out.append(Send(seal(CallMeMaybeVia(ep), self._priv, disco),
                            (DERP_HOST, p.paths.derp_region), derp=p.node.node_key))
        sid = ep.session_id
        for c in p.paths.candidates():  # an older session on this relay is gone (relay restart)
            if c.kind is Path.PEER_RELAY and c.relay == name and c.session != sid:
                p.paths.remove_candidate(c)
                if c.addr is not None:
                    self._relay_paths.pop((c.addr, c.session), None)
        idle = ep.idle_lifetime_ms / 1000.0
        for ip, port in ep.candidates:
            if not port or not usable_endpoint_ip(ip):
                continue  # never a tailnet address: that would relay through the tunnel itself
            addr = (str(ip), port)
            cand = Candidate(Path.PEER_RELAY, addr=addr, relay=name, session=sid)
            key = (addr, sid)
            if p.paths.is_trusted(cand, now):
                continue  # working already: nothing to re-bind
            pending = self._binds.get(key)
            if pending is not None and now - pending.sent_at < BIND_RETRY:
                continue  # a bind is in flight
            if key in self._relay_paths and now - self._bound_at.get(key, -1e9) < BIND_RETRY:
                continue  # just bound: the pings through it are on their way
            self._bind_gen += 1
            try:
                client = BindClient(self._priv, ep, self._bind_gen)
            except BindError:
                self.relay_counters["bind_not_party"] += 1
                return out
            if len(self._binds) >= MAX_BINDS:
                self._binds.popitem(last=False)
            self._binds[key] = _Bind(client, p.node.id, cand, idle, now)
            out.append(Send(client.bind_packet(), addr))
            self.relay_counters["bind_sent"] += 1
        return out

    def _handle_relayed(self, data: bytes, src: Addr,
                        now: float) -> tuple[list[Send], list[PingResult]]:
        """A relay-framed datagram from UDP: a bind challenge, or disco from the peer."""
        try:
            hdr = decode_header(data)
        except HeaderError:
            self.drops["relay_bad_header"] += 1
            return [], []
        key = (src, hdr.session_id)
        if hdr.control:
            bind = self._binds.get(key)
            if bind is None:
                self.drops["relay_unexpected_control"] += 1
                return [], []
            try:
                answer = bind.client.handle_packet(data)
            except BindError:
                self.drops["relay_bad_challenge"] += 1  # e.g. an older generation's challenge
                return [], []
            del self._binds[key]
            self._bound_at[key] = now
            p = self._peers.get(bind.peer_id)
            if p is None:
                return [], []
            self._relay_paths[key] = (bind.peer_id, bind.cand)
            p.paths.set_relay_candidate(bind.cand, idle_lifetime=bind.idle_lifetime,
                                        load=self._relay_load.get(bind.cand.relay, 0.0))
            self.relay_counters["bound"] += 1
            # the answer binds us; the ping behind it finds the peer once it is bound too
            return [Send(answer, src), *self._actions(p, p.paths.probe(bind.cand, now), now)], []
        if hdr.protocol != PROTO_DISCO:
            self.drops["relay_not_disco"] += 1
            return [], []
        known = self._relay_paths.get(key)
        if known is None:
            self.drops["relay_unknown_session"] += 1
            return [], []
        pid, cand = known
        p = self._peers.get(pid)
        if p is None:
            self.drops["relay_unknown_session"] += 1
            return [], []
        try:
            sender, msg = open_sealed(data[HEADER_LEN:], self._priv)
        except DiscoError:
            self.drops["bad_disco"] += 1
            return [], []
        if sender != p.node.disco_key:
            self.drops["relay_wrong_sender"] += 1
            return [], []
        if isinstance(msg, Ping):
            if msg.node_key != p.node.node_key:
                self.drops["ping_node_key_mismatch"] += 1
                return [], []
            self.pings_answered += 1
            pong = Pong(msg.tx_id, (ipaddress.ip_address(src[0]), src[1]))
            out = [Send(self._relay_hdr(hdr.session_id) + seal(pong, self._priv, sender), src)]
            if not p.paths.is_trusted(cand, now):
                out += self._actions(p, p.paths.probe(cand, now), now)
            return out, []
        if isinstance(msg, Pong):
            return self._on_pong(p, pid, msg, now)
        self.drops[f"relay_unhandled_{type(msg).__name__}"] += 1
        return [], []

    @staticmethod
    def _relay_hdr(session: int) -> bytes:
        return encode_header(session, PROTO_DISCO)

    def relay_route(self, peer_id: int, now: float) -> tuple[Addr, bytes] | None:
        """When the peer's chosen path is a peer relay: (relay ip:port, the WireGuard relay
        header to prepend)."""
        p = self._peers.get(peer_id)
        if p is None:
            return None
        for c in p.paths.route(now):
            if c.kind is Path.PEER_RELAY and c.addr is not None:
                return c.addr, encode_header(c.session, PROTO_WIREGUARD)
        return None

    def relay_inbound(self) -> dict[RelayKey, bytes]:
        """Bound relay sessions -> the peer's raw node key (what inbound WireGuard may use)."""
        return {k: self._peers[pid].node.node_key.raw for k, (pid, _) in self._relay_paths.items()
                if pid in self._peers}

    def tick(self, now: float) -> list[Send]:
        out: list[Send] = []
        for p in self._peers.values():
            out += self._actions(p, p.paths.tick(now), now)
        out += self._spray_tick(now)
        return out

    def cli_ping(self, peer_id: int, now: float) -> tuple[list[bytes], list[Send]]:
        """Ping the peer on its chosen path (direct or DERP), or on every direct candidate if
        nothing is chosen yet. Returns the transaction ids (one per probe) and the datagrams."""
        p = self._peers.get(peer_id)
        if p is None or p.node.disco_key is None:
            return [], []
        route = p.paths.route(now)
        dests: list[tuple[tuple[str, int], Candidate | None]] = []
        if route and route[0].kind in (Path.DIRECT, Path.PEER_RELAY) and route[0].addr:
            dests = [(route[0].addr, route[0])]
        elif route and route[0].kind is Path.DERP:
            dests = [((DERP_HOST, route[0].region), None)]
        else:
            dests = [(c.addr, c) for c in p.paths.candidates()
                     if c.kind is Path.DIRECT and c.addr]
        txids: list[bytes] = []
        out: list[Send] = []
        for addr, cand in dests:
            txid = self._rand(TXID_LEN)
            if len(self._cli_pings) >= CLI_PING_MAX:
                old, _ = self._cli_pings.popitem(last=False)
                self._cli_cands.pop(old, None)
            self._cli_pings[txid] = (peer_id, addr, now)
            txids.append(txid)
            data = self._seal_ping(txid, p.node.disco_key)
            if cand is not None and cand.kind is Path.PEER_RELAY:
                self._cli_cands[txid] = cand
                data = self._relay_hdr(cand.session) + data
            derp = p.node.node_key if addr[0] == DERP_HOST else None
            out.append(Send(data, addr, derp=derp, sock=cand.sock if cand is not None else 0))
        return txids, out

    def forget_pings(self, txids: Iterable[bytes]) -> None:
        for t in txids:
            self._cli_pings.pop(t, None)
            self._cli_cands.pop(t, None)

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

    def route_descriptions(self, peer_id: int, now: float) -> list[str]:
        """Every path data goes to now: one, or the suspect UDP path and DERP (mirrored)."""
        p = self._peers.get(peer_id)
        return [c.describe() for c in p.paths.route(now)] if p is not None else []

    def path(self, peer_id: int, now: float) -> Path:
        p = self._peers.get(peer_id)
        return p.paths.current_path(now) if p is not None else Path.NONE

    def report(self, peer_id: int, now: float) -> list[PathReport]:
        p = self._peers.get(peer_id)
        return p.paths.report(now) if p is not None else []

    def next_deadline(self) -> float | None:
        ds = [d for p in self._peers.values() if (d := p.paths.next_deadline()) is not None]
        sd = self.spray.next_deadline()
        if sd is not None:
            ds.append(sd)
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
        return self._actions(p, p.paths.reprobe_now(now), now)

    def _seal_ping(self, txid: bytes, to: DiscoKey) -> bytes:
        return seal(Ping(txid, self.node_key), self._priv, to)

    def _actions(self, p: _Peer, actions: Iterable[object], now: float) -> list[Send]:
        out: list[Send] = []
        disco = p.node.disco_key
        for a in actions:
            if isinstance(a, SendPing) and a.cand.kind is Path.DIRECT and a.cand.addr:
                if disco is not None:
                    out.append(Send(self._seal_ping(a.txid, disco), a.cand.addr,
                                    sock=a.cand.sock))
            elif isinstance(a, SendPing) and a.cand.kind is Path.PEER_RELAY and a.cand.addr:
                if disco is not None:
                    data = self._relay_hdr(a.cand.session) + self._seal_ping(a.txid, disco)
                    out.append(Send(data, a.cand.addr))
            elif isinstance(a, AllocateRelays):
                out += self._allocate(p, now)
            elif isinstance(a, SendCallMeMaybe) and p.paths.derp_region and disco is not None:
                eps = tuple((ipaddress.ip_address(ip), port) for ip, port in self.endpoints)
                data = seal(CallMeMaybe(eps), self._priv, disco)
                out.append(Send(data, (DERP_HOST, p.paths.derp_region), derp=p.node.node_key))
            else:
                self.skipped[type(a).__name__] += 1  # no DERP for call-me-maybe
        return out
