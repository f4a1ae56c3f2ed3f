"""Issue 5 acceptance 5: the NAT matrix on the in-memory twin, no root, simulated clock.

Two nodes A and B run the real sans-IO pieces: :class:`DiscoManager` (which drives
:class:`PeerPaths`), disco sealing (NaCl box), ping/pong/call-me-maybe, over twin UDP sockets
behind simulated NATs, plus a simulated DERP forwarder (node key -> node, a fixed delay, immune to
UDP filtering like the TCP it stands for). Endpoints come from a STUN check through the node's own
NAT (the twin's natcheck), like the daemon's netcheck. Data is a tagged datagram sent where
``DiscoManager.route`` says, as the datapath does, so the tests see which path carried it.

Expectations are :func:`relaymesh.lab.grid.expected_path`, the same as the lab matrix
(tests/lab/test_nat_matrix.py): easy/hard and firewall/hard go direct through the
birthday-paradox port spray (magicsock.spray), with the twin's hard NAT picking seeded random
ports from 1024-65535 like ``masquerade fully-random``. Each node learns its own NAT role from
the STUN check (mapping varies by destination), as the daemon does from netcheck, and opens the
spray sockets the disco layer asks for as further twin sockets.
"""

from __future__ import annotations

import pathlib
import random
from dataclasses import dataclass, field

import pytest

from relaymesh.disco import is_disco
from relaymesh.keys import NodeKey, PrivateKey
from relaymesh.lab.grid import NAT_KINDS, GridResult, expected_path, write_reports
from relaymesh.lab.topologies import nat_pair
from relaymesh.lab.twin import Addr, SimSocket, TwinNetwork
from relaymesh.node.disco import DiscoManager, Send
from relaymesh.node.netmap import MapNode
from relaymesh.paths import Path

WG_PORT = 41641
REGION = 1
DERP_DELAY = 0.01  # s: one way through the simulated DERP server
TICK = 0.2  # s: the daemon's DISCO_TICK
DATA_INTERVAL = 0.1  # s between data packets while traffic runs
DIRECT_WITHIN = 5.0  # issue 5: direct within 5 s where possible


class SimDerp:
    """A DERP server: forwards by node key after DERP_DELAY; counts what it carried."""

    def __init__(self, net: TwinNetwork) -> None:
        self.net = net
        self.nodes: dict[NodeKey, TwinNode] = {}
        self.forwarded = 0

    def send(self, src: NodeKey, dst: NodeKey, data: bytes) -> None:
        node = self.nodes.get(dst)
        if node is None:
            return
        self.forwarded += 1
        self.net.loop.call_later(DERP_DELAY, lambda: node.on_derp(src, data))


@dataclass
class TwinNode:
    net: TwinNetwork
    derp: SimDerp
    host: str
    node_id: int
    rng: random.Random
    got: list[tuple[str, bytes, float]] = field(default_factory=list)
    spray_socks: dict[int, SimSocket] = field(default_factory=dict)
    spray_opened: int = 0

    def __post_init__(self) -> None:
        self.node_priv = PrivateKey.generate()
        self.disco_priv = PrivateKey.generate()
        self.key = self.node_priv.node_public()
        self.disco = DiscoManager(self.disco_priv, self.key, self.rng.randbytes,
                                  home_region=REGION)
        obs = self.net.nat_check(self.host, local_port=WG_PORT)  # STUN through our NAT
        self.sock = self.net.socket(self.host, WG_PORT)
        self.sock.set_receiver(self.on_udp)
        eps: list[Addr] = [self.sock.local_addr]
        if obs.mapped1 is not None and obs.mapped1 not in eps:
            eps.insert(0, obs.mapped1)
        self.endpoints = eps
        self.disco.set_endpoints(eps)
        varies = (None if obs.mapped1 is None or obs.mapped2 is None
                  else obs.mapped1 != obs.mapped2)
        self.disco.set_nat(obs.mapped1 is not None, varies,
                           obs.mapped1[0] if obs.mapped1 is not None else "")
        self.derp.nodes[self.key] = self
        self.peer_id = 0
        self._tick()

    def map_node(self) -> MapNode:
        return MapNode(id=self.node_id, name=self.host, addresses=[], node_key=self.key,
                       disco_key=self.disco_priv.disco_public(), endpoints=list(self.endpoints),
                       home_derp=REGION)

    @property
    def now(self) -> float:
        return self.net.now

    def meet(self, peer: TwinNode) -> None:
        self.peer_id = peer.node_id
        self.send(self.disco.set_peers([peer.map_node()], self.now))

    def send(self, sends: list[Send]) -> None:
        opened, closed = self.disco.take_socket_changes()
        for sid in opened:  # the shell opens what the disco layer names, before sending
            sock = self.net.socket(self.host)
            sock.set_receiver(lambda d, src, sid=sid: self.on_udp(d, src, sid))
            self.spray_socks[sid] = sock
            self.spray_opened += 1
        for s in sends:
            if s.derp is not None:
                self.derp.send(self.key, s.derp, s.data)
            elif s.sock:
                if s.sock in self.spray_socks:
                    self.spray_socks[s.sock].sendto(s.data, s.addr)
            else:
                self.sock.sendto(s.data, s.addr)
        for sid in closed:
            sock = self.spray_socks.pop(sid, None)
            if sock is not None:
                sock.close()

    def on_udp(self, data: bytes, src: Addr, sock: int = 0) -> None:
        if is_disco(data):
            sends, _ = self.disco.handle(data, src, self.now, sock=sock)
            self.send(sends)
        elif data.startswith(b"DATA"):
            self.got.append(("direct", data, self.now))

    def on_derp(self, src: NodeKey, data: bytes) -> None:
        if is_disco(data):
            sends, _ = self.disco.handle(data, ("derp", REGION), self.now, via_derp=REGION)
            self.send(sends)
        else:
            self.got.append(("derp", data, self.now))

    def send_data(self, peer: TwinNode, seq: int) -> None:
        """One data packet where the route says (both while mirroring), like the datapath."""
        self.send(self.disco.note_activity(self.peer_id, self.now))
        self.disco.note_data(self.peer_id, self.now)
        direct, region = self.disco.route(self.peer_id, self.now)
        payload = b"DATA%d" % seq
        if direct is not None:
            sid = self.disco.route_socket(self.peer_id, self.now)
            (self.spray_socks[sid] if sid else self.sock).sendto(payload, direct)
        if region:
            self.derp.send(self.key, peer.key, payload)

    def path(self) -> Path:
        return self.disco.path(self.peer_id, self.now)

    def _tick(self) -> None:
        self.send(self.disco.tick(self.now))
        self.net.loop.call_later(TICK, self._tick)


def build(kind_a: str, kind_b: str, seed: int = 1) -> tuple[TwinNetwork, TwinNode, TwinNode]:
    net = TwinNetwork(nat_pair(kind_a, kind_b), seed=seed)
    derp = SimDerp(net)
    rng = random.Random(seed)
    a = TwinNode(net, derp, "a", 1, rng)
    b = TwinNode(net, derp, "b", 2, rng)
    return net, a, b


def run_traffic(net: TwinNetwork, a: TwinNode, b: TwinNode, seconds: float) -> None:
    """A and B exchange data packets every DATA_INTERVAL for ``seconds`` (simulated)."""
    end = net.now + seconds
    seq = iter(range(1 << 30))

    def step() -> None:
        if net.now >= end:
            return
        a.send_data(b, next(seq))
        b.send_data(a, next(seq))
        net.loop.call_later(DATA_INTERVAL, step)

    step()
    net.run_for(seconds)


CELLS = [
    ("none", "none"),
    ("easy", "easy"),
    ("easy", "hard"),
    ("hard", "easy"),
    ("firewall", "hard"),
    ("hard", "firewall"),
    ("firewall", "firewall"),
    ("hard", "hard"),
    *[("udp-blocked", k) for k in NAT_KINDS],
    ("none", "hard"),
    ("one2one", "hard"),
]


@pytest.mark.parametrize(("kind_a", "kind_b"), CELLS, ids=[f"{a}-{b}" for a, b in CELLS])
def test_twin_nat_matrix(kind_a: str, kind_b: str) -> None:
    net, a, b = build(kind_a, kind_b)
    t0 = net.now
    # the map arrives at both at about the same time; data starts at once
    a.meet(b)
    b.meet(a)
    run_traffic(net, a, b, 8.0)
    want = expected_path(kind_a, kind_b)
    assert (str(a.path()), str(b.path())) == (want, want)
    # the very first data went over DERP: nothing was known to work yet
    assert b.got and b.got[0][0] == "derp" and b.got[0][1] == b"DATA0"
    first_direct = [t for how, _, t in b.got if how == "direct"]
    if want == "direct":
        assert first_direct and first_direct[0] - t0 < DIRECT_WITHIN
        # once direct, the tail of the run is direct only (no more mirroring)
        tail = [how for how, _, t in b.got if t > net.now - 2.0]
        assert tail and set(tail) == {"direct"}
    else:
        assert not first_direct
    received = {d for _, d, _ in b.got}
    sent = {b"DATA%d" % i for i in range(0, 160, 2)}  # A sent the even sequence numbers
    assert sent <= received, f"{len(sent - received)} of A's packets never reached B"
    spray_checks(kind_a, kind_b, a, b)


def spray_checks(kind_a: str, kind_b: str, a: TwinNode, b: TwinNode) -> None:
    """Who sprayed: only a hard side; it probes only an EIM peer; a spray that went direct
    leaves exactly the winning socket open, and the hard side's path lives on it."""
    for me, other, mine, theirs in ((a, b, kind_a, kind_b), (b, a, kind_b, kind_a)):
        sprays = me.disco.spray.counters.get("sprays", 0)
        rounds = me.disco.spray.counters.get("probe_rounds", 0)
        if mine != "hard" or theirs in ("none", "one2one") or "udp-blocked" in (mine, theirs):
            assert me.spray_opened == 0, f"{mine} opened spray sockets toward {theirs}"
        if mine == "hard" or "udp-blocked" in (mine, theirs):
            assert rounds == 0, f"{mine} probed {theirs}"
        if mine == "hard" and theirs in ("easy", "firewall"):
            assert sprays == 1 and me.disco.spray.counters.get("hits") == 1
            assert len(me.spray_socks) == 1  # the losers closed after the window
            assert other.disco.spray.counters.get("probe_rounds") == 1
            desc = me.disco.describe(other.node_id, me.now)
            assert desc is not None and "(spray socket " in desc
        if mine == "hard" and theirs == "hard":
            assert sprays <= 1 and not me.spray_socks  # once, then the peer is known hard


def test_twin_direct_path_that_dies_falls_back_to_derp_mirroring_first() -> None:
    """A direct pair whose UDP goes away: packets are mirrored to DERP while the path is
    suspect, then DERP only; nothing is lost once the mirror starts."""
    net, a, b = build("easy", "easy")
    a.meet(b)
    b.meet(a)
    run_traffic(net, a, b, 4.0)
    assert a.path() is Path.DIRECT
    b.sock.set_receiver(lambda data, src: None)  # B's UDP receive dies: only DERP reaches B
    b.got.clear()
    run_traffic(net, a, b, 10.0)
    assert a.path() is Path.DERP
    assert b.got and all(how == "derp" for how, _, _ in b.got)
    # the first DERP copy came within heartbeat + suspect delay (+ a tick) of the break
    assert b.got[0][2] - (net.now - 10.0) < 1.5 + 1.0 + 2 * TICK + DERP_DELAY
    # from the first mirrored copy on, every packet A sent arrived (no gap at the switch)
    seqs = [int(d[4:]) for _, d, _ in b.got]
    assert seqs == list(range(seqs[0], seqs[-1] + 1, 2))


def test_twin_call_me_maybe_lets_a_late_side_punch_at_once() -> None:
    """A learns B's endpoints only through B's call-me-maybe (the map had none): still direct."""
    net, a, b = build("easy", "easy")
    saved = b.endpoints
    b.endpoints = []
    a.meet(b)  # A's map says B has no endpoints
    b.endpoints = saved
    b.meet(a)
    run_traffic(net, a, b, 3.0)
    assert a.path() is Path.DIRECT and b.path() is Path.DIRECT
    assert a.disco.call_me_maybe_received >= 1


def test_grid_report_tables_every_pair_and_marks_surprises(tmp_path: pathlib.Path) -> None:
    """relaymesh lab grid's writer (the lab run itself is docs/nat-grid.md's evidence)."""
    rs = [GridResult("easy", "easy", "direct", "direct", "direct 1.2.3.4:5", True, "direct"),
          GridResult("easy", "hard", "direct", "derp", "-", True, "derp"),
          GridResult("hard", "hard", "derp", "derp", "derp(1)", False, "derp")]
    md, page = tmp_path / "g.md", tmp_path / "g.html"
    write_reports(rs, md, page, "relaymesh lab grid --kinds easy,hard")
    text = md.read_text()
    assert "| **easy** | direct | direct/derp * |" in text
    assert "| **hard** | direct/derp * | derp (no echo!) |" in text
    html = page.read_text()
    assert '<td class="direct">direct</td>' in html and '<td class="mixed">' in html
    assert "relaymesh lab grid --kinds easy,hard" in html
