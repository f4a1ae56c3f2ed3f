"""Disco over DERP in the DiscoManager (sans-IO) and the PeerPaths additions it uses.

Two managers hand each other's datagrams across by hand: UDP sends by address, DERP sends by node
key. Deterministic transaction ids; ``now`` is passed explicitly.
"""

from __future__ import annotations

import itertools

from relaymesh.disco import CallMeMaybe, open_sealed
from relaymesh.keys import PrivateKey
from relaymesh.magicsock.pathsel import Candidate, PathPolicy, PeerPaths, SendPing
from relaymesh.node.disco import DERP_HOST, DiscoManager, Send
from relaymesh.node.netmap import MapNode
from relaymesh.paths import Path

ADDR = {0: ("198.18.0.10", 41641), 1: ("198.18.0.11", 41641)}


class Pair:
    def __init__(self, region: int = 1, with_endpoints: bool = True) -> None:
        counter = itertools.count()
        rand = lambda n: next(counter).to_bytes(n, "big")  # noqa: E731
        self.node = {i: PrivateKey.generate() for i in (0, 1)}
        self.dk = {i: PrivateKey.generate() for i in (0, 1)}
        self.m = {i: DiscoManager(self.dk[i], self.node[i].node_public(), rand,
                                  home_region=region) for i in (0, 1)}
        for i in (0, 1):
            self.m[i].set_endpoints([ADDR[i]])
        self.nodes = {i: MapNode(id=i + 1, name=f"n{i}", addresses=[],
                                 node_key=self.node[i].node_public(),
                                 disco_key=self.dk[i].disco_public(),
                                 endpoints=[ADDR[i]] if with_endpoints else [], home_derp=region)
                      for i in (0, 1)}

    def peer_of(self, i: int) -> int:
        return 2 - i  # node ids are 1 and 2

    def deliver(self, frm: int, sends: list[Send], now: float, udp: bool = True) -> list[object]:
        """Deliver every datagram (and the answers) until quiet; UDP only if ``udp``."""
        results: list[object] = []
        queue = [(frm, s) for s in sends]
        while queue:
            f, s = queue.pop(0)
            to = 1 - f
            if s.derp is not None:
                assert s.derp == self.node[to].node_public()
                out, res = self.m[to].handle(s.data, (DERP_HOST, s.addr[1]), now,
                                             via_derp=s.addr[1])
            elif udp:
                assert s.addr == ADDR[to]
                out, res = self.m[to].handle(s.data, ADDR[f], now)
            else:
                continue
            results += res
            queue += [(to, o) for o in out]
        return results


def test_new_peer_gets_call_me_maybe_over_derp_with_our_endpoints() -> None:
    p = Pair()
    sends = p.m[0].set_peers([p.nodes[1]], 0.0)
    derp = [s for s in sends if s.derp is not None]
    assert [s.addr for s in sends if s.derp is None] == [ADDR[1]]  # the direct ping
    assert len(derp) == 1 and derp[0].addr == (DERP_HOST, 1)
    _, msg = open_sealed(derp[0].data, p.dk[1])
    assert isinstance(msg, CallMeMaybe)
    assert [(str(ip), port) for ip, port in msg.endpoints] == [ADDR[0]]


def test_route_is_derp_until_a_pong_then_direct() -> None:
    p = Pair()
    s0 = p.m[0].set_peers([p.nodes[1]], 0.0)
    s1 = p.m[1].set_peers([p.nodes[0]], 0.0)
    assert p.m[0].route(2, 0.0) == (None, 1)
    assert p.m[0].describe(2, 0.0) == "derp(1)"
    p.deliver(0, s0, 0.01)
    p.deliver(1, s1, 0.01)
    assert p.m[0].route(2, 0.02) == (ADDR[1], 0)
    assert p.m[0].describe(2, 0.02) == f"direct {ADDR[1][0]}:{ADDR[1][1]}"


def test_call_me_maybe_teaches_endpoints_the_map_lacked_and_pings_them() -> None:
    p = Pair(with_endpoints=False)
    p.m[1].set_peers([p.nodes[0]], 0.0)  # B knows no endpoint of A
    sends = p.m[0].set_peers([p.nodes[1]], 0.0)  # A: call-me-maybe over DERP (no pings)
    cmm = [s for s in sends if s.derp is not None]
    out, _ = p.m[1].handle(cmm[0].data, (DERP_HOST, 1), 0.1, via_derp=1)
    assert p.m[1].call_me_maybe_received == 1
    assert [s.addr for s in out if s.derp is None] == [ADDR[0]]  # B pings A's endpoint now


def test_ping_over_derp_is_answered_over_derp_and_cli_ping_reports_derp() -> None:
    p = Pair()
    p.m[0].set_peers([p.nodes[1]], 0.0)
    p.m[1].set_peers([p.nodes[0]], 0.0)
    _, sends = p.m[0].cli_ping(2, 1.0)  # no pong yet: the route is DERP
    assert len(sends) == 1 and sends[0].derp is not None
    (r,) = p.deliver(0, sends, 1.05, udp=False)
    assert r.path is Path.DERP and r.addr == (DERP_HOST, 1)  # type: ignore[attr-defined]
    assert abs(r.latency - 0.05) < 1e-9  # type: ignore[attr-defined]


def test_set_policy_no_direct_drops_a_direct_best_and_auto_reprobes() -> None:
    counter = itertools.count()
    pp = PeerPaths(random_bytes=lambda n: next(counter).to_bytes(n, "big"), derp_region=1)
    pp.set_direct_candidates([ADDR[1]])
    (ping, *_) = pp.on_send(0.0)
    assert isinstance(ping, SendPing)
    pp.on_pong(ping.txid, 0.01)
    assert pp.current_path(0.02) is Path.DIRECT
    assert pp.set_policy(PathPolicy.NO_DIRECT, 0.03) == []  # nothing to probe while forbidden
    assert pp.current_path(0.03) is Path.DERP
    actions = pp.set_policy(PathPolicy.AUTO, 0.04)
    assert [a.cand for a in actions if isinstance(a, SendPing)] == [
        Candidate(Path.DIRECT, addr=ADDR[1])]


def test_reprobe_now_keeps_the_chosen_path() -> None:
    counter = itertools.count()
    pp = PeerPaths(random_bytes=lambda n: next(counter).to_bytes(n, "big"), derp_region=1)
    pp.set_direct_candidates([ADDR[0], ADDR[1]])
    pings = [a for a in pp.on_send(0.0) if isinstance(a, SendPing)]
    pp.on_pong(pings[0].txid, 0.01)
    best = pp.best
    again = [a for a in pp.reprobe_now(1.0) if isinstance(a, SendPing)]
    assert len(again) == 2 and pp.best == best
