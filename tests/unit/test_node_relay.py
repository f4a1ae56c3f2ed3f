"""Peer relays in the node's disco layer (sans-IO), against the real relay core.

Three DiscoManagers (a, b and the relay node r) and r's :class:`RelayServer` exchange datagrams
through a tiny in-memory network: DERP delivers by node key, UDP to the relay's address goes to the
relay core, and direct UDP between a and b is dropped (two hard NATs). Also: the datapath's relay
unwrapping (TrackingDevice) and the Prometheus text of the daemon's metrics.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from ipaddress import ip_address
from types import SimpleNamespace
from typing import Any

from relaymesh.disco import AllocateRequest, CallMeMaybeVia, Ping, RelayEndpoint, seal
from relaymesh.keys import PrivateKey
from relaymesh.magicsock.route import PeerEndpoint
from relaymesh.node.disco import NOT_AUTHORIZED, DiscoManager, PingResult, RelayInfo, Send
from relaymesh.node.engine import TrackingDevice
from relaymesh.node.filter import InboundFilter
from relaymesh.node.metrics import render
from relaymesh.node.netmap import MapNode
from relaymesh.paths import Path
from relaymesh.relay import PROTO_DISCO, PROTO_WIREGUARD, RelayServer, encode_header
from relaymesh.wireguard.device import Received

NAMES = ("a", "b", "r", "x")  # x: a relay nobody granted
KEYS = {n: (PrivateKey.generate(), PrivateKey.generate()) for n in NAMES}  # (node, disco)
ADDR = {"a": ("198.18.1.2", 41641), "b": ("198.18.2.2", 41641), "r": ("198.18.0.50", 41641)}
RELAY_ADDR = ("198.18.0.50", 40000)


def node(i: int, name: str) -> MapNode:
    nk, dk = KEYS[name]
    ip, port = ADDR.get(name, ("198.18.9.9", 41641))
    return MapNode.from_json({
        "id": i, "name": name, "addresses": [f"100.64.0.{i}/32"],
        "node_key": nk.node_public().to_text(), "disco_key": dk.disco_public().to_text(),
        "endpoints": [f"{ip}:{port}"], "home_derp": 1, "relay_server_port": None})


IDS = {n: i + 1 for i, n in enumerate(NAMES)}
NODES = {n: node(IDS[n], n) for n in NAMES}


def relay_info(name: str) -> RelayInfo:
    n = NODES[name]
    assert n.disco_key is not None
    return RelayInfo(name, n.disco_key, n.node_key, 1)


class Net:
    """a, b and the relay node r; r's relay core answers allocations and binds."""

    def __init__(self, allowed: bool = True) -> None:
        counter = itertools.count(1)
        rand = lambda k: next(counter).to_bytes(k, "big")  # noqa: E731 (deterministic txids)
        self.m = {n: DiscoManager(KEYS[n][1], KEYS[n][0].node_public(), rand, home_region=1)
                  for n in ("a", "b", "r")}
        for n, mgr in self.m.items():
            mgr.self_name = n
            mgr.set_peers([NODES[p] for p in ("a", "b", "r") if p != n], 0.0)
        self.allowed = allowed
        self.relay = RelayServer(KEYS["r"][1], 0.0, rng=os.urandom,
                                 candidates=[(ip_address(RELAY_ADDR[0]), RELAY_ADDR[1])])
        self.m["r"].on_allocate = lambda pkt: self.relay.handle_allocate_packet(
            pkt, self.now, lambda _a, _b: self.allowed)
        self.now = 0.0
        self.results: list[PingResult] = []
        self.udp_to_relay: list[tuple[str, bytes]] = []

    def by_node_key(self, raw: bytes) -> str:
        return next(n for n in NAMES if KEYS[n][0].node_public().raw == raw)

    def deliver(self, sender: str, sends: list[Send], limit: int = 500) -> None:
        queue = [(sender, s) for s in sends]
        while queue and limit:
            limit -= 1
            frm, s = queue.pop(0)
            if s.derp is not None:  # DERP: by node key, region from the send
                to = self.by_node_key(s.derp.raw)
                out, res = self.m[to].handle(s.data, ("derp", 1), self.now, via_derp=1)
            elif s.addr == RELAY_ADDR:
                self.udp_to_relay.append((frm, s.data))
                for data, dest in self.relay.handle_datagram(s.data, ADDR[frm], self.now):
                    to = next(n for n, a in ADDR.items() if a == dest)
                    out, res = self.m[to].handle(data, RELAY_ADDR, self.now)
                    self.results += res
                    queue += [(to, o) for o in out]
                continue
            else:
                continue  # direct UDP between hard NATs: lost
            self.results += res
            queue += [(to, o) for o in out]

    def run(self, seconds: float, step: float = 0.1) -> None:
        """Advance the clock, ticking everybody (keeps a and b active)."""
        end = self.now + seconds
        while self.now < end:
            self.now += step
            for n in ("a", "b"):
                other = "b" if n == "a" else "a"
                self.deliver(n, self.m[n].note_activity(IDS[other], self.now))
            for n, mgr in self.m.items():
                self.deliver(n, mgr.tick(self.now))


def granted() -> Net:
    net = Net()
    for n in ("a", "b"):
        net.m[n].set_relays([relay_info("r")], {})
    return net


def test_hard_nat_pair_ends_on_the_relay_both_ways() -> None:
    net = granted()
    net.run(1.0)
    for me, peer in (("a", "b"), ("b", "a")):
        assert net.m[me].path(IDS[peer], net.now) is Path.PEER_RELAY
        route = net.m[me].relay_route(IDS[peer], net.now)
        assert route is not None and route[0] == RELAY_ADDR
        sid = route[1][4:7]
        assert route[1] == encode_header(int.from_bytes(sid, "big"), PROTO_WIREGUARD)
        desc = net.m[me].describe(IDS[peer], net.now) or ""
        assert desc.startswith(f"peer-relay r ({RELAY_ADDR[0]}:{RELAY_ADDR[1]}, session ")
        inbound = net.m[me].relay_inbound()  # (a and b also reach r through r: not checked)
        assert inbound[(RELAY_ADDR, int.from_bytes(sid, "big"))] == NODES[peer].node_key.raw
    # one session on the relay for a and b, bound on both sides
    ab = {NODES["a"].disco_key, NODES["b"].disco_key}
    mine = [s for s in net.relay.metrics(with_sessions=True).sessions if set(s.clients) == ab]
    assert len(mine) == 1 and mine[0].state == "bound"
    assert net.m["a"].relay_counters["allocate_sent"] >= 1
    assert net.m["b"].relay_counters["cmmv_received"] >= 1


def test_cli_ping_goes_through_the_relay_and_names_it() -> None:
    net = granted()
    net.run(1.0)
    txids, sends = net.m["a"].cli_ping(IDS["b"], net.now)
    assert len(txids) == 1 and sends[0].addr == RELAY_ADDR
    assert sends[0].data[:8] == encode_header(int.from_bytes(sends[0].data[4:7], "big"),
                                              PROTO_DISCO)
    net.deliver("a", sends)
    (res,) = [r for r in net.results if r.txid == txids[0]]
    assert res.path is Path.PEER_RELAY and res.relay == "r" and res.addr == RELAY_ADDR
    assert res.session == int.from_bytes(sends[0].data[4:7], "big")


def test_relay_refusing_the_pair_leaves_derp() -> None:
    net = Net(allowed=False)
    for n in ("a", "b"):
        net.m[n].set_relays([relay_info("r")], {})
    net.run(1.0)
    assert net.m["a"].path(IDS["b"], net.now) is Path.DERP
    assert net.relay.drops["not_allowed"] >= 1
    assert net.m["r"].relay_counters["allocate_refused"] >= 1


def test_call_me_maybe_via_an_unauthorized_relay_is_refused_with_a_reason() -> None:
    net = granted()
    net.m["b"].set_relays([], {})  # b may use no relay at all
    net.run(1.0)
    assert net.m["b"].path(IDS["a"], net.now) is Path.DERP
    assert net.m["b"].relay_counters["cmmv_relay_not_authorized"] >= 1
    rows = {r.candidate: r for r in net.m["b"].report(IDS["a"], net.now)}
    assert rows["peer-relay r"].state == "unavailable"
    assert "not authorized" in rows["peer-relay r"].reason
    # and b never bound: nothing from b reached the relay
    assert not [d for frm, d in net.udp_to_relay if frm == "b"]


def test_announced_but_not_granted_relays_show_in_debug_path() -> None:
    net = granted()
    net.m["a"].set_relays([relay_info("r")], {"x": NOT_AUTHORIZED})
    rows = {r.candidate: r for r in net.m["a"].report(IDS["b"], 0.0)}
    assert rows["peer-relay x"].state == "unavailable"
    assert rows["peer-relay x"].reason == NOT_AUTHORIZED
    assert "peer-relay r" not in rows  # usable: not an exclusion


def test_relay_disco_from_an_unbound_session_is_dropped() -> None:
    net = granted()
    b_disco = NODES["b"].disco_key
    assert b_disco is not None
    a = net.m["a"]
    ping = seal(Ping(b"\x01" * 12, NODES["b"].node_key), KEYS["b"][1],
                NODES["a"].disco_key)  # type: ignore[arg-type]
    out, res = a.handle(encode_header(1234, PROTO_DISCO) + ping, RELAY_ADDR, 0.0)
    assert out == [] and res == []
    assert a.drops["relay_unknown_session"] == 1
    out, _ = a.handle(b"\x00\x80junk", RELAY_ADDR, 0.0)
    assert out == [] and a.drops["relay_bad_header"] == 1


def test_relay_node_answers_allocations_only_through_its_relay_service() -> None:
    net = Net()
    net.m["r"].on_allocate = None  # r runs no relay server
    a_disco, b_disco = NODES["a"].disco_key, NODES["b"].disco_key
    assert a_disco is not None and b_disco is not None
    req = seal(AllocateRequest(a_disco, b_disco, 1), KEYS["a"][1],
               NODES["r"].disco_key)  # type: ignore[arg-type]
    out, _ = net.m["r"].handle(req, ("derp", 1), 0.0, via_derp=1)
    assert out == [] and net.m["r"].relay_counters["allocate_no_relay_server"] == 1


def test_relay_serving_its_own_node_binds_from_the_node_itself() -> None:
    """r is one end: its own relay allocates in-process and both ends bind to it."""
    net = Net()
    r_disco = NODES["r"].disco_key
    a_disco = NODES["a"].disco_key
    assert r_disco is not None and a_disco is not None

    def local(peer: Any) -> RelayEndpoint | None:
        resp = net.relay.handle_allocate(r_disco, peer, 1, net.now, True)
        return None if resp is None else resp.endpoint

    net.m["r"].set_local_relay(local)
    net.m["a"].set_relays([relay_info("r")], {})
    end = net.now + 1.0
    while net.now < end:
        net.now += 0.1
        net.deliver("a", net.m["a"].note_activity(IDS["r"], net.now))
        net.deliver("r", net.m["r"].note_activity(IDS["a"], net.now))
        for n in ("a", "r"):
            net.deliver(n, net.m[n].tick(net.now))
    assert net.m["a"].path(IDS["r"], net.now) is Path.PEER_RELAY
    assert net.m["r"].path(IDS["a"], net.now) is Path.PEER_RELAY
    ar = [s for s in net.relay.metrics(with_sessions=True).sessions
          if set(s.clients) == {a_disco, r_disco}]
    assert len(ar) == 1 and ar[0].state == "bound"
    assert ar[0].addrs[1 if ar[0].clients[1] == r_disco else 0] == ADDR["r"]  # r's own socket


def test_cmmv_naming_a_session_we_are_not_part_of_is_counted() -> None:
    net = granted()
    x_disco, r_disco = NODES["x"].disco_key, NODES["r"].disco_key
    b_disco = NODES["b"].disco_key
    assert x_disco is not None and r_disco is not None and b_disco is not None
    ep = RelayEndpoint(r_disco, (b_disco, x_disco), 1, 7, 30000, 300000,
                       ((ip_address(RELAY_ADDR[0]), RELAY_ADDR[1]),))
    data = seal(CallMeMaybeVia(ep), KEYS["b"][1], NODES["a"].disco_key)  # type: ignore[arg-type]
    out, _ = net.m["a"].handle(data, ("derp", 1), 0.0, via_derp=1)
    assert out == [] and net.m["a"].relay_counters["cmmv_not_party"] == 1


class _Inner:
    """A stand-in WireGuard device that records what it was asked to decrypt."""

    def __init__(self) -> None:
        self.got: list[tuple[bytes, Any]] = []

    def receive(self, datagram: memoryview, source: Any, now: float) -> Received:
        self.got.append((bytes(datagram), source))
        return Received([], [], None)


def test_tracking_device_unwraps_relay_frames_only_for_bound_sessions() -> None:
    inner = _Inner()
    dev = TrackingDevice(inner, InboundFilter(), lambda: 0.0)  # type: ignore[arg-type]
    peer_ep = object()
    dev.set_relay_sessions({(RELAY_ADDR, 77): peer_ep})  # type: ignore[dict-item]
    wg = b"\x04\x00\x00\x00" + b"x" * 40
    dev.receive(memoryview(encode_header(77, PROTO_WIREGUARD) + wg), RELAY_ADDR, 0.0)
    assert inner.got == [(wg, peer_ep)]
    dev.receive(memoryview(encode_header(78, PROTO_WIREGUARD) + wg), RELAY_ADDR, 0.0)
    dev.receive(memoryview(encode_header(77, PROTO_WIREGUARD) + wg), ("198.18.9.9", 1), 0.0)
    dev.receive(memoryview(encode_header(77, PROTO_DISCO) + wg), RELAY_ADDR, 0.0)
    control = encode_header(77, PROTO_WIREGUARD, control=True)
    dev.receive(memoryview(control + wg), RELAY_ADDR, 0.0)
    reserved = bytearray(encode_header(77, PROTO_WIREGUARD))
    reserved[7] = 1  # the reserved byte must be 0
    dev.receive(memoryview(bytes(reserved) + wg), RELAY_ADDR, 0.0)
    dev.receive(memoryview(b"\x00" * 6), RELAY_ADDR, 0.0)  # shorter than a header
    assert len(inner.got) == 1
    assert dev.relay_drops == {"relay_unknown_session": 2, "relay_not_wireguard": 2,
                               "not_relay": 2}
    assert dev.relay_rx_packets == 1



def test_tracking_device_takes_a_gro_run_of_one_session_whole() -> None:
    """``receive_run``: a GRO receive whose segments all carry one bound session reaches the
    device segment by segment, header stripped, after one lookup; a run it cannot take whole
    (another session inside, an unknown session, an unbound source, a header-only tail) is left
    to per-segment :meth:`TrackingDevice.receive` (None), which counts each drop by reason."""
    inner = _Inner()
    dev = TrackingDevice(inner, InboundFilter(), lambda: 0.0)  # type: ignore[arg-type]
    pe = PeerEndpoint(b"p" * 32)
    dev.set_relay_sessions({(RELAY_ADDR, 77): pe})
    hdr, other = encode_header(77, PROTO_WIREGUARD), encode_header(78, PROTO_WIREGUARD)
    wgs = [b"\x04\x00\x00\x00" + bytes([i]) * 40 for i in range(5)]
    tail = b"\x04\x00\x00\x00" + b"z" * 10  # the last segment of a run may be shorter
    buf = b"".join(hdr + w for w in wgs) + hdr + tail
    seg = len(hdr) + len(wgs[0])
    # the datapath hands over its whole receive buffer: bytes past ``total`` are stale
    rs = dev.receive_run(memoryview(buf + b"stale" * 20), len(buf), seg, RELAY_ADDR, 0.0)
    assert rs is not None and len(rs) == 6
    assert inner.got == [(w, pe) for w in [*wgs, tail]]
    assert (dev.relay_rx_packets, dev.relay_rx_bytes) == (6, len(buf))
    for run, source in ((hdr + wgs[0] + other + wgs[1], RELAY_ADDR),
                        (other + wgs[0] + other + wgs[1], RELAY_ADDR),
                        (buf, ("198.18.9.9", 1)),
                        (hdr + wgs[0] + hdr, RELAY_ADDR)):
        assert dev.receive_run(memoryview(run), len(run), seg, source, 0.0) is None
    assert len(inner.got) == 6 and dev.relay_drops == {}


def test_tracking_device_drops_the_segments_of_a_run_another_peer_sent() -> None:
    """The session is bound to one peer: a segment that decrypts as another peer's is dropped
    and counted, the rest of the run is delivered."""
    pe = PeerEndpoint(b"p" * 32)

    class Inner(_Inner):
        def receive(self, datagram: memoryview, source: Any, now: float) -> Received:
            super().receive(datagram, source, now)
            key = b"q" * 32 if bytes(datagram[4:5]) == b"\x02" else pe.node_key
            return Received([], [], SimpleNamespace(public_key=key))  # type: ignore[arg-type]

    inner = Inner()
    dev = TrackingDevice(inner, InboundFilter(), lambda: 0.0)  # type: ignore[arg-type]
    dev.set_relay_sessions({(RELAY_ADDR, 77): pe})
    hdr = encode_header(77, PROTO_WIREGUARD)
    buf = b"".join(hdr + b"\x04\x00\x00\x00" + bytes([i]) * 40 for i in range(4))
    rs = dev.receive_run(memoryview(buf), len(buf), len(buf) // 4, RELAY_ADDR, 0.0)
    assert rs is not None and len(rs) == 3 and len(inner.got) == 4
    assert dev.relay_drops == {"relay_wrong_peer": 1}
    assert (dev.relay_rx_packets, dev.relay_rx_bytes) == (3, len(buf) * 3 // 4)


def test_prometheus_text_has_every_path_and_the_relay_counters() -> None:
    text = render({"paths": {"peer_relay_tx_bytes": 5000, "derp_rx_packets": 3},
                   "relay": {"running": True, "forwarded_packets": 10, "forwarded_bytes": 900,
                             "sessions_by_state": {"bound": 2}, "drops": {"not_allowed": 1}}})
    lines = set(text.splitlines())
    assert 'relaymesh_path_bytes_total{path="peer_relay",direction="out"} 5000' in lines
    assert 'relaymesh_path_packets_total{path="derp",direction="in"} 3' in lines
    assert 'relaymesh_path_packets_total{path="direct",direction="out"} 0' in lines
    assert "relaymesh_relay_forwarded_bytes_total 900" in lines
    assert 'relaymesh_relay_sessions{state="bound"} 2' in lines
    assert 'relaymesh_relay_drops_total{reason="not_allowed"} 1' in lines
    assert "relaymesh_relay" not in render({"paths": {}})


def test_prometheus_text_has_the_spray_counters() -> None:
    text = render({"paths": {}, "spray": {"sprays": 2, "hits": 1, "probes_sent": 2048,
                                          "open_sockets": 256}})
    lines = set(text.splitlines())
    assert 'relaymesh_spray_events_total{event="sprays"} 2' in lines
    assert 'relaymesh_spray_events_total{event="hits"} 1' in lines
    assert 'relaymesh_spray_events_total{event="probes_sent"} 2048' in lines
    assert "relaymesh_spray_open_sockets 256" in lines
    assert 'event="open_sockets"' not in text  # a gauge, not an event count
    assert "relaymesh_spray" not in render({"paths": {}})


def test_a_second_call_me_maybe_via_does_not_orphan_the_bind_in_flight() -> None:
    """Both peers allocate at once, so each gets the endpoint twice (its own allocation and
    the peer's call-me-maybe-via): one bind goes out, and its challenge is answered."""
    net = granted()
    a_disco, b_disco = NODES["a"].disco_key, NODES["b"].disco_key
    assert a_disco is not None and b_disco is not None
    resp = net.relay.handle_allocate(a_disco, b_disco, 1, 0.0, True)
    assert resp is not None
    cmmv = seal(CallMeMaybeVia(resp.endpoint), KEYS["a"][1], b_disco)
    first, _ = net.m["b"].handle(cmmv, ("derp", 1), 0.0, via_derp=1)
    again, _ = net.m["b"].handle(cmmv, ("derp", 1), 0.1, via_derp=1)
    assert [s.addr for s in first] == [RELAY_ADDR] and again == []
    (challenge, dest), = net.relay.handle_datagram(first[0].data, ADDR["b"], 0.2)
    assert dest == ADDR["b"]
    out, _ = net.m["b"].handle(challenge, RELAY_ADDR, 0.2)
    assert out and out[0].addr == RELAY_ADDR  # the answer (then a ping through the relay)
    assert net.m["b"].relay_counters["bound"] == 1


def test_tailnet_addresses_among_relay_candidates_are_never_bound() -> None:
    """Binding to a relay's tailnet address would relay through the tunnel itself."""
    net = granted()
    a_disco, b_disco, r_disco = (NODES[n].disco_key for n in ("a", "b", "r"))
    assert a_disco is not None and b_disco is not None and r_disco is not None
    ep = RelayEndpoint(r_disco, (a_disco, b_disco), 1, 9, 30000, 300000,
                       ((ip_address("100.64.0.6"), 40000),
                        (ip_address(RELAY_ADDR[0]), RELAY_ADDR[1])))
    out, _ = net.m["b"].handle(seal(CallMeMaybeVia(ep), KEYS["a"][1], b_disco), ("derp", 1),
                               0.0, via_derp=1)
    assert [s.addr for s in out] == [RELAY_ADDR]


def test_the_relays_load_from_its_allocate_response_ranks_the_relay_path() -> None:
    net = granted()
    # three sessions (a-b, and a and b each with the relay node r) of four: 75% load, as the
    # relay answers the allocations that a sends while on the relay (rediscovery, 60 s)
    net.relay.limits = dataclasses.replace(net.relay.limits, max_sessions=4)
    net.run(65.0)
    assert len(net.relay.metrics(with_sessions=True).sessions) == 3
    assert net.m["a"].path(IDS["b"], net.now) is Path.PEER_RELAY
    (row,) = [r for r in net.m["a"].report(IDS["b"], net.now) if r.kind is Path.PEER_RELAY]
    assert row.reason.endswith("relay load 75%"), row
