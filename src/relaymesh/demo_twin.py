"""The `make demo` story on the in-memory twin: same cast, same NATs, paths only, no root.

Runs without root (and in CI) on :class:`relaymesh.lab.twin.TwinNetwork`, a simulated network
with simulated NATs and a simulated clock, built from the very topology the lab demo uses
(:func:`relaymesh.demo.topology`). Each node runs the real sans-IO pieces of the daemon:

- :class:`~relaymesh.node.disco.DiscoManager`: ping/pong/call-me-maybe, path choice, and the peer
  relay client (allocate over DERP, call-me-maybe-via, bind, disco through the relay);
- on ``r``, :class:`~relaymesh.relay.session.RelayServer`: session table, bind handshake and
  forwarding, on its own UDP port (``RELAY_PORT``), with the policy check of the grant
  ``tag:client -> tag:relay`` (both ends must be clients, or r itself).

What the twin stands in for: DERP is a forwarder by node key with a fixed delay (immune to UDP
filtering, like the TCP it models); the network map is handed over directly (every node sees every
other, a, b and c may use r); data is a tagged datagram sent where the DiscoManager routes it (to
the relay with its header, direct, or over DERP; both while a path is suspect), as the datapath
does, so the story can tell which path carried each packet. No WireGuard and no throughput: the
clock is simulated. Killing r drops its sockets and its DERP connection; restarting it brings a
fresh relay server (new secret, no sessions) and a fresh disco state with the same keys, as a
daemon restarted on its state directory has.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from ipaddress import ip_address

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from relaymesh.disco import is_disco
from relaymesh.keys import DiscoKey, NodeKey, PrivateKey
from relaymesh.lab.twin import Addr, SimSocket, TwinNetwork
from relaymesh.node.disco import DiscoManager, RelayInfo, Send
from relaymesh.node.netmap import MapNode
from relaymesh.paths import Path
from relaymesh.relay.header import HEADER_LEN, PROTO_DISCO, HeaderError, decode_header
from relaymesh.relay.session import RelayServer

RELAY = "r"
CLIENTS = ("a", "b", "c")
RELAY_PORT = 40000
WG_PORT = 41641
REGION = 1
DERP_DELAY = 0.01  # s: one way through the simulated DERP server
TICK = 0.2  # s: the daemon's DISCO_TICK
DATA_INTERVAL = 0.1  # s between data packets of a pair while traffic runs
SETTLE_TIMEOUT = 30.0  # simulated s for the three paths
KILL_AFTER = 3.0  # s of a -> b traffic on the relay before r dies
DERP_WATCH = 10.0  # s of a -> b traffic after r died
RETURN_TIMEOUT = 90.0  # simulated s for a-b to return to the relay after r restarts
EXPECTED: dict[tuple[str, str], Path] = {
    ("a", "c"): Path.DIRECT, ("c", "a"): Path.DIRECT,
    ("b", "c"): Path.DIRECT, ("c", "b"): Path.DIRECT,
    ("a", "b"): Path.PEER_RELAY, ("b", "a"): Path.PEER_RELAY,
}


class SimDerp:
    """A DERP server: forwards by node key after DERP_DELAY; drops for unknown keys."""

    def __init__(self, net: TwinNetwork) -> None:
        self.net = net
        self.nodes: dict[NodeKey, TwinNode] = {}

    def send(self, src: NodeKey, dst: NodeKey, data: bytes) -> None:
        node = self.nodes.get(dst)
        if node is not None:
            self.net.loop.call_later(DERP_DELAY, lambda: node.on_derp(src, data))


@dataclasses.dataclass
class Received:
    path: str  # "direct", "peer_relay" or "derp": how the packet reached us
    sender: int  # the sender's node id
    seq: int
    at: float


class TwinNode:
    """One node: the daemon's sans-IO disco layer on a twin socket (+ the relay server on r)."""

    def __init__(self, net: TwinNetwork, derp: SimDerp, host: str, node_id: int,
                 rng: random.Random, *, relay_port: int | None = None) -> None:
        self.net, self.derp, self.host, self.id, self.rng = net, derp, host, node_id, rng
        self.node_priv = PrivateKey.generate()
        self.disco_priv = PrivateKey.generate()
        self.key = self.node_priv.node_public()
        self.disco_key = self.disco_priv.disco_public()
        self.relay_port = relay_port
        self.peers: dict[str, TwinNode] = {}
        self.got: list[Received] = []
        self.alive = False
        self._generation = 0  # ends the tick chain of a killed incarnation
        obs = net.nat_check(host, local_port=WG_PORT)  # STUN through our NAT, like netcheck
        self.sock = net.socket(host, WG_PORT)
        self.endpoints: list[Addr] = [self.sock.local_addr]
        if obs.mapped1 is not None and obs.mapped1 not in self.endpoints:
            self.endpoints.insert(0, obs.mapped1)
        self.relay_sock: SimSocket | None = (
            net.socket(host, relay_port) if relay_port is not None else None)
        self.relay: RelayServer | None = None
        self.disco = self._new_disco()

    # -- lifecycle ------------------------------------------------------------------------------
    def _new_disco(self) -> DiscoManager:
        d = DiscoManager(self.disco_priv, self.key, self.rng.randbytes, home_region=REGION)
        d.set_endpoints(self.endpoints)
        return d

    def start(self, may_allocate: Callable[[DiscoKey, DiscoKey], bool] | None = None) -> None:
        """Come up (again): sockets and DERP connected, relay server fresh, ticking."""
        self.alive = True
        self.sock.set_receiver(self.on_udp)
        self.derp.nodes[self.key] = self
        if self.relay_sock is not None and self.relay_port is not None:
            self.relay = RelayServer(
                self.disco_priv, self.now, rng=self.rng.randbytes,
                candidates=[(ip_address(self.net.public_address(self.host)), self.relay_port)])
            self.relay_sock.set_receiver(self.on_relay_udp)
            allowed = may_allocate or (lambda _a, _b: True)

            def on_allocate(packet: bytes) -> tuple[DiscoKey, bytes] | None:
                assert self.relay is not None
                return self.relay.handle_allocate_packet(packet, self.now, allowed)

            self.disco.on_allocate = on_allocate
        self._generation += 1
        self._tick(self._generation)

    def kill(self) -> None:
        """The process dies: nothing is received or sent any more, the DERP connection drops."""
        self.alive = False
        self._generation += 1
        self.sock.set_receiver(lambda _d, _s: None)
        if self.relay_sock is not None:
            self.relay_sock.set_receiver(lambda _d, _s: None)
        self.derp.nodes.pop(self.key, None)
        self.relay = None

    def restart(self, may_allocate: Callable[[DiscoKey, DiscoKey], bool] | None,
                peers: list[TwinNode]) -> None:
        """Same keys (the state directory), fresh memory: new disco state and relay server."""
        self.disco = self._new_disco()
        self.start(may_allocate)
        self.meet(peers)

    # -- network map ----------------------------------------------------------------------------
    def map_node(self) -> MapNode:
        return MapNode(id=self.id, name=self.host, addresses=[], node_key=self.key,
                       disco_key=self.disco_key, endpoints=list(self.endpoints),
                       home_derp=REGION)

    def meet(self, peers: list[TwinNode]) -> None:
        self.peers = {p.host: p for p in peers if p is not self}
        self.send(self.disco.set_peers([p.map_node() for p in self.peers.values()], self.now))

    def use_relay(self, relay: TwinNode) -> None:
        self.disco.set_relays([RelayInfo(relay.host, relay.disco_key, relay.key, REGION)], {})

    @property
    def now(self) -> float:
        return self.net.now

    # -- packets --------------------------------------------------------------------------------
    def send(self, sends: list[Send]) -> None:
        if not self.alive:
            return
        for s in sends:
            if s.derp is not None:
                self.derp.send(self.key, s.derp, s.data)
            else:
                self.sock.sendto(s.data, s.addr)

    def on_udp(self, data: bytes, src: Addr) -> None:
        if data[:1] == b"\x00" and len(data) >= HEADER_LEN:  # relay-framed (header byte 0)
            try:
                hdr = decode_header(data)
            except HeaderError:
                return
            if hdr.control or hdr.protocol == PROTO_DISCO:
                sends, _ = self.disco.handle(data, src, self.now)
                self.send(sends)
            else:
                self._data("peer_relay", data[HEADER_LEN:])
        elif is_disco(data):
            sends, _ = self.disco.handle(data, src, self.now)
            self.send(sends)
        else:
            self._data("direct", data)

    def on_derp(self, src: NodeKey, data: bytes) -> None:
        if not self.alive:
            return
        if is_disco(data):
            sends, _ = self.disco.handle(data, ("derp", REGION), self.now, via_derp=REGION)
            self.send(sends)
        else:
            self._data("derp", data)

    def on_relay_udp(self, data: bytes, src: Addr) -> None:
        if self.relay is None or self.relay_sock is None:
            return
        for out, dst in self.relay.handle_datagram(data, src, self.now):
            self.relay_sock.sendto(out, dst)

    def _data(self, path: str, data: bytes) -> None:
        if data.startswith(b"DATA") and len(data) >= 9:
            self.got.append(Received(path, data[4], int.from_bytes(data[5:9], "big"), self.now))

    def send_data(self, peer: TwinNode, seq: int) -> None:
        """One data packet where the disco layer routes it (both paths while mirroring)."""
        if not self.alive:
            return
        self.send(self.disco.note_activity(peer.id, self.now))
        payload = b"DATA" + bytes([self.id]) + seq.to_bytes(4, "big")
        relay = self.disco.relay_route(peer.id, self.now)
        direct, region = self.disco.route(peer.id, self.now)
        if relay is not None:
            self.sock.sendto(relay[1] + payload, relay[0])
        elif direct is not None:
            self.sock.sendto(payload, direct)
        if region:
            self.derp.send(self.key, peer.key, payload)

    def path(self, peer: str) -> Path:
        return self.disco.path(self.peers[peer].id, self.now)

    def via(self, peer: str) -> str:
        return self.disco.describe(self.peers[peer].id, self.now) or "-"

    def _tick(self, generation: int) -> None:
        if generation != self._generation:
            return
        self.send(self.disco.tick(self.now))
        if self.relay is not None:
            self.relay.expire(self.now)
        self.net.loop.call_later(TICK, lambda: self._tick(generation))


@dataclasses.dataclass
class TwinResult:
    """What the twin story saw; times are simulated seconds."""

    paths: dict[str, str] = dataclasses.field(default_factory=dict)  # "a->b" -> path
    via: dict[str, str] = dataclasses.field(default_factory=dict)
    settled_after: float | None = None
    derp_copy_after: float | None = None  # r died -> first a->b packet reaches b over DERP
    derp_after: float | None = None  # r died -> a's path to b is derp
    lost_after_mirror: int = -1  # a->b packets lost from the first DERP copy on
    return_after: float | None = None  # r restarted -> a-b on the peer relay again
    return_via: str = ""


class Story:
    """The cast on the twin (see the module docstring)."""

    def __init__(self, seed: int = 1, *, grant: bool = True) -> None:
        """``grant=False``: the policy has no relay grant, so r refuses every allocation."""
        from relaymesh.demo import topology  # the lab demo's own topology

        self.grant = grant
        self.net = TwinNetwork(topology(), seed=seed)
        self.derp = SimDerp(self.net)
        rng = random.Random(seed)
        self.nodes: dict[str, TwinNode] = {}
        for i, host in enumerate((RELAY, *CLIENTS), start=1):
            self.nodes[host] = TwinNode(self.net, self.derp, host, i, rng,
                                        relay_port=RELAY_PORT if host == RELAY else None)
        r = self.nodes[RELAY]
        for n in self.nodes.values():
            n.start(self.may_allocate if n is r else None)
        for n in self.nodes.values():
            n.meet(list(self.nodes.values()))
            if n is not r:
                n.use_relay(r)
        self._seq = 0

    def may_allocate(self, requester: DiscoKey, other: DiscoKey) -> bool:
        """The grant tag:client -> tag:relay: both ends are clients (or r itself)."""
        ok = {self.nodes[h].disco_key for h in (*CLIENTS, RELAY)}
        return self.grant and requester in ok and other in ok

    def traffic(self, pairs: list[tuple[str, str]], seconds: float,
                stop: Callable[[], bool] | None = None) -> bool:
        """Both ends of each pair send a packet every DATA_INTERVAL for up to ``seconds``;
        True when ``stop`` became true (checked every interval)."""
        end = self.net.now + seconds
        done = False

        def step() -> None:
            nonlocal done
            if done or self.net.now >= end:
                return
            for s, d in pairs:
                self._seq += 1
                self.nodes[s].send_data(self.nodes[d], self._seq)
                self._seq += 1
                self.nodes[d].send_data(self.nodes[s], self._seq)
            if stop is not None and stop():
                done = True
                return
            self.net.loop.call_later(DATA_INTERVAL, step)

        step()
        self.net.run_until(lambda: done, seconds)
        return done

    def paths_now(self) -> dict[tuple[str, str], Path]:
        return {(s, d): self.nodes[s].path(d) for s in CLIENTS for d in CLIENTS if s != d}


def run(console: Console, seed: int = 1) -> TwinResult:
    """The story; prints as it goes and returns what it saw."""
    res = TwinResult()
    st = Story(seed)
    a, b = st.nodes["a"], st.nodes["b"]
    pairs = [("a", "c"), ("b", "c"), ("a", "b")]
    t0 = st.net.now
    if st.traffic(pairs, SETTLE_TIMEOUT, lambda: st.paths_now() == EXPECTED):
        res.settled_after = st.net.now - t0
    for (s, d), p in st.paths_now().items():
        res.paths[f"{s}->{d}"] = str(p)
        res.via[f"{s}->{d}"] = st.nodes[s].via(d)
    table = Table(title="1. paths on the twin (what `status` would say)")
    for col in ("from", "to", "path", "via"):
        table.add_column(col)
    for key, path in res.paths.items():
        s, d = key.split("->")
        table.add_row(s, d, escape(path), escape(res.via[key]))
    console.print(table)
    console.print("[dim]settled after "
                  + (f"{res.settled_after:.2f} s" if res.settled_after is not None else
                     f"-- not within {SETTLE_TIMEOUT:.0f} s") + " (simulated)[/]")
    console.print("2. throughput: [dim]not on the twin (simulated clock); `sudo make demo`[/]")

    # 3. failover: r dies while a and b talk, then comes back
    st.traffic([("a", "b")], KILL_AFTER)
    st.nodes[RELAY].kill()
    t_kill = st.net.now
    mark = len(b.got)
    st.traffic([("a", "b")], DERP_WATCH, lambda: a.path("b") is Path.DERP)
    if a.path("b") is Path.DERP:
        res.derp_after = st.net.now - t_kill
    st.traffic([("a", "b")], 2.0)  # a little more on DERP, to see it carry the traffic
    from_a = [g for g in b.got[mark:] if g.sender == a.id]
    derp = [g for g in from_a if g.path == "derp"]
    if derp:
        res.derp_copy_after = derp[0].at - t_kill
        seqs = {g.seq for g in from_a if g.seq >= derp[0].seq}
        res.lost_after_mirror = len(set(range(derp[0].seq, from_a[-1].seq + 1, 2)) - seqs)
    console.print("3. r killed: a's packets to b reach b over DERP after "
                  + (f"{res.derp_copy_after:.1f} s" if res.derp_copy_after is not None else "--")
                  + ", a's path to b is derp after "
                  + (f"{res.derp_after:.1f} s" if res.derp_after is not None else
                     f"-- (not within {DERP_WATCH:.0f} s)")
                  + f"; packets lost from the first DERP copy on: {res.lost_after_mirror}")
    r = st.nodes[RELAY]
    r.restart(st.may_allocate, list(st.nodes.values()))
    t_up = st.net.now
    if st.traffic([("a", "b")], RETURN_TIMEOUT,
                  lambda: a.path("b") is Path.PEER_RELAY and b.path("a") is Path.PEER_RELAY):
        res.return_after = st.net.now - t_up
    res.return_via = a.via("b")
    console.print("   r restarted: a-b back on the peer relay after "
                  + (f"{res.return_after:.1f} s" if res.return_after is not None else
                     f"-- not within {RETURN_TIMEOUT:.0f} s")
                  + f" ({escape(res.return_via)})")
    return res


def main() -> int:
    """The twin story with its own console; 0 when every step happened as in the lab demo."""
    console = Console(highlight=False)
    console.rule("[bold]relaymesh demo on the in-memory twin (paths only)")
    res = run(console)
    ok = (res.settled_after is not None and res.derp_after is not None
          and res.lost_after_mirror == 0 and res.return_after is not None)
    console.rule("[bold green]done" if ok else "[bold yellow]done, with the gaps shown above")
    return 0 if ok else 1
