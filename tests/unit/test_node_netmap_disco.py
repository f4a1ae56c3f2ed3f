"""Network map application (full, delta, logout) and the sans-IO disco manager."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from relaymesh.disco import Ping, seal
from relaymesh.keys import PrivateKey
from relaymesh.node.disco import DiscoManager, Send
from relaymesh.node.netmap import MapError, MapNode, NetMap, parse_endpoint
from relaymesh.paths import Path


def node_json(i: int, node: PrivateKey, disco: PrivateKey, eps: list[str]) -> dict[str, Any]:
    return {"id": i, "name": f"n{i}", "user": "alice", "tags": [],
            "addresses": [f"100.64.0.{i}/32", f"fd7a:115c:a1e0::{i}/128"],
            "node_key": node.node_public().to_text(), "disco_key": disco.disco_public().to_text(),
            "endpoints": eps, "online": True}


KEYS = [(PrivateKey.generate(), PrivateKey.generate()) for _ in range(4)]


def nj(i: int, eps: list[str] | None = None) -> dict[str, Any]:
    return node_json(i, *KEYS[i], eps if eps is not None else [f"198.18.0.{i}:41641"])


def test_parse_endpoint_accepts_v4_and_bracketed_v6() -> None:
    assert parse_endpoint("198.18.0.1:41641") == ("198.18.0.1", 41641)
    assert parse_endpoint("[fd00::1]:5") == ("fd00::1", 5)
    for bad in ("198.18.0.1", "x:1", "1.2.3.4:0", "1.2.3.4:70000"):
        with pytest.raises(ValueError):
            parse_endpoint(bad)


def test_full_then_deltas() -> None:
    m = NetMap()
    assert m.apply({"type": "full", "version": 1, "self": nj(0), "peers": [nj(1), nj(2)],
                    "packet_filter": [], "derp_map": {"regions": []}, "relay": {}})
    assert sorted(m.peers) == [1, 2] and m.self_node is not None
    changed = nj(1, ["198.18.0.99:1"])
    assert m.apply({"type": "delta", "version": 2, "peers_changed": [changed, nj(3)],
                    "peers_removed": [2], "packet_filter": [{"src": ["*"]}]})
    assert sorted(m.peers) == [1, 3]
    assert m.peers[1].endpoints == [("198.18.0.99", 1)]
    assert m.packet_filter == [{"src": ["*"]}] and m.version == 2
    assert not m.apply({"type": "keepalive"})
    assert m.find_peer("N3") is m.peers[3]
    assert m.find_peer("100.64.0.1") is m.peers[1]
    assert m.find_peer("fd7a:115c:a1e0::3") is m.peers[3]
    assert m.find_peer("nobody") is None


def test_logout_clears_peers() -> None:
    m = NetMap()
    m.apply({"type": "full", "self": nj(0), "peers": [nj(1)]})
    assert m.apply({"type": "logout", "reason": "node deleted"})
    assert m.logged_out == "node deleted" and m.peers == {}


@pytest.mark.parametrize("msg", [
    {"type": "delta", "peers_changed": []},  # before any full map
    {"type": "full", "peers": []},  # no self
    {"type": "surprise"},
])
def test_malformed_map_messages_raise_map_error(msg: dict[str, Any]) -> None:
    with pytest.raises(MapError):
        NetMap().apply(msg)


def test_bad_node_key_is_a_map_error_and_bad_endpoint_is_skipped() -> None:
    bad = nj(1)
    bad["node_key"] = "nodekey:zz"
    with pytest.raises(MapError):
        MapNode.from_json(bad)
    n = MapNode.from_json(nj(1, ["junk", "198.18.0.1:7"]))
    assert n.endpoints == [("198.18.0.1", 7)]


class Net:
    """Two disco managers (ids 0 and 1) whose datagrams are delivered by hand."""

    def __init__(self) -> None:
        counter = itertools.count()
        rand = lambda n: next(counter).to_bytes(n, "big")  # noqa: E731 (deterministic txids)
        self.addr = {0: ("198.18.0.0", 41641), 1: ("198.18.0.1", 41641)}
        self.m = {i: DiscoManager(KEYS[i][1], KEYS[i][0].node_public(), rand) for i in (0, 1)}
        self.nodes = {i: MapNode.from_json(nj(i, [f"{a[0]}:{a[1]}"]))
                      for i, a in self.addr.items()}

    def deliver(self, sender: int, sends: list[Send], now: float) -> list[Any]:
        """Hand each datagram to the manager whose address it is for; return ping results."""
        results = []
        queue = [(sender, s) for s in sends]
        while queue:
            frm, s = queue.pop(0)
            to = next(i for i, a in self.addr.items() if a == s.addr)
            out, res = self.m[to].handle(s.data, self.addr[frm], now)
            results += res
            queue += [(to, o) for o in out]
        return results


def test_peers_probe_each_other_and_choose_the_direct_path() -> None:
    net = Net()
    s0 = net.m[0].set_peers([net.nodes[1]], 0.0)
    s1 = net.m[1].set_peers([net.nodes[0]], 0.0)
    assert [s.addr for s in s0] == [net.addr[1]]  # a new peer is probed at once
    net.deliver(0, s0, 0.01)
    net.deliver(1, s1, 0.01)
    assert net.m[0].path(1, 0.02) is Path.DIRECT
    assert net.m[0].best_endpoint(1, 0.02) == net.addr[1]
    assert net.m[1].best_endpoint(0, 0.02) == net.addr[0]
    assert net.m[0].pings_answered >= 1 and net.m[1].pings_answered >= 1


def test_cli_ping_reports_latency_path_and_address() -> None:
    net = Net()
    net.m[0].set_peers([net.nodes[1]], 0.0)
    net.m[1].set_peers([net.nodes[0]], 0.0)
    txids, sends = net.m[0].cli_ping(1, 1.0)
    assert len(txids) == 1
    (r,) = net.deliver(0, sends, 1.004)
    assert (r.peer_id, r.path, r.addr) == (1, Path.DIRECT, net.addr[1])
    assert r.latency == pytest.approx(0.004)


def test_ping_claiming_another_node_key_is_dropped() -> None:
    net = Net()
    net.m[1].set_peers([net.nodes[0]], 0.0)
    forged = seal(Ping(b"t" * 12, KEYS[2][0].node_public()), KEYS[0][1],
                  KEYS[1][1].disco_public())
    out, res = net.m[1].handle(forged, net.addr[0], 0.0)
    assert (out, res) == ([], [])
    assert net.m[1].drops["ping_node_key_mismatch"] == 1


def test_garbage_and_strangers_are_counted_not_raised() -> None:
    net = Net()
    net.m[1].set_peers([net.nodes[0]], 0.0)
    stranger = seal(Ping(b"t" * 12, KEYS[3][0].node_public()), KEYS[3][1],
                    KEYS[1][1].disco_public())
    assert net.m[1].handle(stranger, ("1.2.3.4", 1), 0.0) == ([], [])
    assert net.m[1].handle(b"RM\xf0\x9f\x92\xac" + b"\0" * 100, ("1.2.3.4", 1), 0.0) == ([], [])
    assert net.m[1].drops == {"unknown_sender": 1, "bad_disco": 1}


def test_removed_peer_is_forgotten() -> None:
    net = Net()
    net.m[0].set_peers([net.nodes[1]], 0.0)
    net.m[0].set_peers([], 1.0)
    assert net.m[0].path(1, 1.0) is Path.NONE
    assert net.m[0].cli_ping(1, 1.0) == ([], [])
