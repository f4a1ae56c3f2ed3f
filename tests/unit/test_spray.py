"""Birthday-paradox port spray: the pure core (magicsock.spray), its DiscoManager wiring, and the
spray-request codec (fuzzed like the other disco messages). Fake clock: ``now`` is passed in."""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import math
import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relaymesh import disco
from relaymesh.disco.codec import MAX_SPRAY_SOCKETS, SprayRequest
from relaymesh.keys import PrivateKey
from relaymesh.magicsock.spray import (
    FAILURE_BACKOFF,
    MAX_OPEN_SOCKETS,
    PORT_RANGE,
    PROBE_BURST,
    PROBE_INTERVAL,
    PROBE_SPAN,
    SPRAY_DELAY,
    SPRAY_INTERVAL,
    SPRAY_PROBES,
    SPRAY_SOCKETS,
    SPRAY_WINDOW,
    Role,
    Sprayer,
    SprayStart,
    is_public_endpoint,
    role_for,
)
from relaymesh.node.disco import DERP_HOST, DiscoManager, Send
from relaymesh.node.netmap import MapNode

FUZZ = int(os.environ.get("RELAYMESH_FUZZ_EXAMPLES", "300"))
HARD_PUB = "198.18.2.2"
EIM_PUB = ("198.18.1.2", 41641)


def hard_sprayer(seed: int = 1) -> Sprayer:
    s = Sprayer(random.Random(seed).randbytes)
    s.role, s.public_ip = Role.HARD, HARD_PUB
    return s


def want(s: Sprayer, now: float, last_send: float | None, pid: int = 1) -> SprayStart | None:
    """consider() for a peer with recent data and no direct path."""
    return s.consider(pid, now, last_send=last_send, active=True, direct=False, can_spray=True)


def start(s: Sprayer, pid: int = 1, t0: float = 0.0) -> SprayStart | None:
    """Data flows without a direct path from t0; the spray starts SPRAY_DELAY later."""
    assert want(s, t0, t0, pid) is None
    return want(s, t0 + SPRAY_DELAY, t0 + SPRAY_DELAY, pid)


# -- roles ---------------------------------------------------------------------------------------

def test_roles_from_netcheck() -> None:
    assert role_for(True, True) is Role.HARD
    assert role_for(True, False) is Role.EIM
    assert role_for(True, None) is Role.UNKNOWN  # fewer than two STUN answers
    assert role_for(False, None) is Role.UNKNOWN  # udp-blocked
    assert role_for(False, True) is Role.UNKNOWN


def test_the_documented_probability_holds() -> None:
    r = PORT_RANGE[1] - PORT_RANGE[0] + 1
    p = 1 - (1 - SPRAY_SOCKETS / r) ** SPRAY_PROBES
    assert p > 0.9996
    assert math.isclose(p, 1 - math.exp(-SPRAY_SOCKETS * SPRAY_PROBES / r), abs_tol=1e-4)


# -- hard side -----------------------------------------------------------------------------------

def test_hard_side_sprays_after_the_delay_with_n_sockets() -> None:
    s = hard_sprayer()
    assert want(s, 0.0, 0.0) is None
    assert want(s, SPRAY_DELAY - 0.1, 1.0) is None
    st_ = want(s, SPRAY_DELAY, 1.0)
    assert st_ is not None and len(st_.socks) == SPRAY_SOCKETS == len(set(st_.socks))
    assert s.open_sockets == SPRAY_SOCKETS and s.counters["sprays"] == 1


@pytest.mark.parametrize("role", [Role.EIM, Role.UNKNOWN])
def test_only_a_hard_node_sprays(role: Role) -> None:
    s = hard_sprayer()
    s.role = role
    assert start(s) is None and s.open_sockets == 0


def test_no_spray_without_data_with_a_direct_path_or_when_not_possible() -> None:
    s = hard_sprayer()
    for t in (0.0, 10.0, 20.0):
        assert s.consider(1, t, last_send=None, active=False, direct=False,
                          can_spray=True) is None
        assert s.consider(2, t, last_send=t, active=True, direct=True, can_spray=True) is None
        assert s.consider(3, t, last_send=t, active=True, direct=False, can_spray=False) is None
    assert s.open_sockets == 0


def test_one_spray_per_peer_per_interval_and_backoff_after_misses() -> None:
    s = hard_sprayer()
    first = start(s)
    assert first is not None
    t = SPRAY_DELAY
    assert s.tick(t + SPRAY_WINDOW, lambda p, k: False) == list(first.socks)  # no hit: all close
    assert s.counters["misses"] == 1
    assert want(s, t + SPRAY_INTERVAL - 1, t + 20) is None
    again = want(s, t + SPRAY_INTERVAL, t + 20)
    assert again is not None and again.generation == first.generation + 1
    # three misses in a row: the next try waits FAILURE_BACKOFF instead of SPRAY_INTERVAL
    t += SPRAY_INTERVAL
    s.tick(t + SPRAY_WINDOW, lambda p, k: False)
    t += SPRAY_INTERVAL
    assert want(s, t, t) is not None
    s.tick(t + SPRAY_WINDOW, lambda p, k: False)
    assert want(s, t + SPRAY_INTERVAL, t + 29) is None
    assert want(s, t + FAILURE_BACKOFF, t + FAILURE_BACKOFF) is not None


def test_global_socket_cap() -> None:
    s = hard_sprayer()
    started = [start(s, pid) for pid in range(1, 1 + MAX_OPEN_SOCKETS // SPRAY_SOCKETS + 1)]
    assert all(x is not None for x in started[:-1]) and started[-1] is None
    assert s.open_sockets == MAX_OPEN_SOCKETS and s.counters["spray_cap"] == 1


def test_first_hit_wins_losers_close_after_the_window_winner_while_in_use() -> None:
    s = hard_sprayer()
    sp = start(s)
    assert sp is not None
    a, b = sp.socks[10], sp.socks[20]
    assert s.claim(a, 1) and s.claim(a, 1)  # the winner, again
    assert not s.claim(b, 1)  # a later hit on another socket: dropped, counted
    assert not s.claim(a, 2)  # another peer on this peer's socket
    assert s.counters["late_hits"] == 1 and s.counters["wrong_peer_on_spray_socket"] == 1
    t = SPRAY_DELAY
    assert s.tick(t + SPRAY_WINDOW - 0.1, lambda p, k: True) == []
    closed = s.tick(t + SPRAY_WINDOW, lambda p, k: True)
    assert sorted(closed) == sorted(x for x in sp.socks if x != a)
    assert s.open_sockets == 1 and s.winner(1) == a
    assert s.tick(t + 60, lambda p, k: True) == []  # the path on it lives: it stays
    assert s.tick(t + 61, lambda p, k: False) == [a]  # path gone: closed
    assert s.open_sockets == 0


def test_forget_peer_closes_its_sockets() -> None:
    s = hard_sprayer()
    sp = start(s)
    assert sp is not None
    s.forget_peer(1)
    assert sorted(s.take_closed()) == sorted(sp.socks) and s.open_sockets == 0


def test_a_peer_that_asked_us_to_probe_is_hard_and_never_sprayed() -> None:
    s = hard_sprayer()
    assert s.accept_request(1, "198.18.9.9", 0.0, ip_known=True,
                            direct_allowed=True) == "request_not_eim"
    assert start(s) is None and s.open_sockets == 0


# -- EIM side ------------------------------------------------------------------------------------

def eim_sprayer(seed: int = 2) -> Sprayer:
    s = Sprayer(random.Random(seed).randbytes)
    s.role = Role.EIM
    return s


def test_probe_ports_are_distinct_random_and_in_range() -> None:
    s = eim_sprayer()
    ports = s.probe_ports()
    assert len(ports) == SPRAY_PROBES == len(set(ports))
    assert all(PORT_RANGE[0] <= p <= PORT_RANGE[1] for p in ports)
    assert ports != eim_sprayer(3).probe_ports()  # not a fixed list


def test_probes_are_paced_burst_then_spread_over_the_span() -> None:
    s = eim_sprayer()
    assert s.accept_request(1, HARD_PUB, 10.0, ip_known=True, direct_allowed=True) is None
    first = s.due_probes(10.0)
    assert [len(p) for _, _, p in first] == [PROBE_BURST] and first[0][1] == HARD_PUB
    assert s.due_probes(10.0) == []  # nothing more due at the same instant
    mid = s.due_probes(10.0 + PROBE_SPAN / 2)
    n_mid = sum(len(p) for _, _, p in mid)
    assert 0 < n_mid <= (SPRAY_PROBES - PROBE_BURST) // 2 + 1
    rest: list[int] = []
    for _ in range(10):  # at most max_probes_per_call per call: a few calls drain the rest
        rest += [p for _, _, ps in s.due_probes(10.0 + PROBE_SPAN) for p in ps]
    sent = [*first[0][2], *mid[0][2], *rest]
    assert len(sent) == SPRAY_PROBES == len(set(sent))
    assert s.round_of(1) is None and s.due_probes(20.0) == []


def test_a_late_tick_never_sends_more_than_the_per_call_bound() -> None:
    s = eim_sprayer()
    s.accept_request(1, HARD_PUB, 0.0, ip_known=True, direct_allowed=True)
    assert sum(len(p) for _, _, p in s.due_probes(100.0)) == s.config.max_probes_per_call


@pytest.mark.parametrize(("role", "known", "allowed", "why"), [
    (Role.HARD, True, True, "request_not_eim"),  # hard/hard never probes
    (Role.UNKNOWN, True, True, "request_not_eim"),  # udp-blocked / unknown never probes
    (Role.EIM, False, True, "request_unknown_ip"),  # only an ip the peer reported
    (Role.EIM, True, False, "request_policy"),
])
def test_requests_refused_and_counted(role: Role, known: bool, allowed: bool, why: str) -> None:
    s = eim_sprayer()
    s.role = role
    assert s.accept_request(1, HARD_PUB, 0.0, ip_known=known, direct_allowed=allowed) == why
    assert s.counters[why] == 1 and s.due_probes(1.0) == []


def test_one_probe_round_per_peer_per_interval() -> None:
    s = eim_sprayer()
    assert s.accept_request(1, HARD_PUB, 0.0, ip_known=True, direct_allowed=True) is None
    assert s.accept_request(1, HARD_PUB, PROBE_INTERVAL - 0.1, ip_known=True,
                            direct_allowed=True) == "request_rate_limited"
    assert s.accept_request(1, HARD_PUB, PROBE_INTERVAL, ip_known=True,
                            direct_allowed=True) is None


def test_stop_round_ends_probing() -> None:
    s = eim_sprayer()
    s.accept_request(1, HARD_PUB, 0.0, ip_known=True, direct_allowed=True)
    s.due_probes(0.0)
    s.stop_round(1)
    assert s.due_probes(5.0) == [] and s.counters["rounds_stopped_early"] == 1


# -- DiscoManager wiring -------------------------------------------------------------------------

class Nodes:
    """A hard node H (id 1) and an EIM node E (id 2), datagrams handed across by hand."""

    def __init__(self, hard_role: tuple[bool, bool | None] = (True, True),
                 eim_role: tuple[bool, bool | None] = (True, False)) -> None:
        counter = itertools.count()
        rand = lambda n: next(counter).to_bytes(n, "big")  # noqa: E731
        self.keys = {i: PrivateKey.generate() for i in (1, 2)}
        self.disco = {i: PrivateKey.generate() for i in (1, 2)}
        self.m = {i: DiscoManager(self.disco[i], self.keys[i].node_public(), rand,
                                  home_region=1) for i in (1, 2)}
        eps = {1: [(HARD_PUB, 40000), ("10.2.0.10", 41641)], 2: [EIM_PUB, ("10.1.0.10", 41641)]}
        self.node = {i: MapNode(id=i, name=f"n{i}", addresses=[],
                                node_key=self.keys[i].node_public(),
                                disco_key=self.disco[i].disco_public(), endpoints=eps[i],
                                home_derp=1) for i in (1, 2)}
        self.m[1].set_nat(*hard_role, HARD_PUB)
        self.m[2].set_nat(*eim_role, EIM_PUB[0])
        self.m[1].set_peers([self.node[2]], 0.0)
        self.m[2].set_peers([self.node[1]], 0.0)

    def run_data(self, i: int, until: float, step: float = 0.2) -> list[Send]:
        out: list[Send] = []
        t = 0.0
        while t <= until:
            self.m[i].note_data(3 - i, t)
            out += self.m[i].tick(t)
            t += step
        return out


def test_disco_hard_node_opens_sockets_pings_from_each_and_asks_over_derp() -> None:
    n = Nodes()
    sends = n.run_data(1, SPRAY_DELAY + 0.2)
    opened, closed = n.m[1].take_socket_changes()
    assert len(opened) == SPRAY_SOCKETS and closed == []
    sprayed = [s for s in sends if s.sock]
    assert {s.sock for s in sprayed} == set(opened)
    assert {s.addr for s in sprayed} == {EIM_PUB}  # only the peer's public endpoint(s)
    reqs = [s for s in sends if s.derp is not None
            and isinstance(disco.open_sealed(s.data, n.disco[2])[1], SprayRequest)]
    assert len(reqs) == 1 and reqs[0].addr == (DERP_HOST, 1)
    msg = disco.open_sealed(reqs[0].data, n.disco[2])[1]
    assert isinstance(msg, SprayRequest) and str(msg.ip) == HARD_PUB
    assert msg.sockets == SPRAY_SOCKETS


def spray_request(n: Nodes, ip: str = HARD_PUB) -> bytes:
    return disco.seal(SprayRequest(ipaddress.ip_address(ip), SPRAY_SOCKETS, 1), n.disco[1],
                      n.disco[2].disco_public())


def test_disco_eim_node_probes_random_ports_of_the_reported_ip_only() -> None:
    n = Nodes()
    out, _ = n.m[2].handle(spray_request(n), (DERP_HOST, 1), 0.0, via_derp=1)
    assert len(out) == PROBE_BURST
    assert {s.addr[0] for s in out} == {HARD_PUB} and all(s.sock == 0 for s in out)
    assert len({s.data for s in out}) == 1  # one sealed ping reused for every probe
    later = [s for i in range(1, 11) for s in n.m[2].tick(i * 0.2)]  # the daemon's 0.2 s tick
    assert len(out) + len([s for s in later if s.addr[0] == HARD_PUB]) == SPRAY_PROBES
    assert len({s.addr for s in [*out, *later]}) == SPRAY_PROBES  # distinct ports
    # an ip the peer never reported is refused (network safety), counted
    n2 = Nodes()
    out2, _ = n2.m[2].handle(spray_request(n2, "203.0.113.7"), (DERP_HOST, 1), 0.0, via_derp=1)
    assert out2 == [] and n2.m[2].drops["spray_request_unknown_ip"] == 1


def test_disco_spray_request_over_udp_is_not_acted_on() -> None:
    n = Nodes()
    out, _ = n.m[2].handle(spray_request(n), (HARD_PUB, 1234), 0.0)
    assert out == [] and n.m[2].drops["unhandled_SprayRequest"] == 1


@pytest.mark.parametrize("eim_role", [(True, True), (False, None), (True, None)])
def test_disco_hard_or_unknown_receiver_never_probes(eim_role: tuple[bool, bool | None]) -> None:
    n = Nodes(eim_role=eim_role)
    out, _ = n.m[2].handle(spray_request(n), (DERP_HOST, 1), 0.0, via_derp=1)
    assert out == [] and n.m[2].drops["spray_request_not_eim"] == 1
    later = n.m[2].tick(1.0)
    assert all(s.addr[0] != HARD_PUB for s in later)


def test_disco_peer_without_a_public_endpoint_is_not_sprayed() -> None:
    """A udp-blocked peer has no STUN mapping to report: only LAN addresses, which the hard
    side's mappings could never meet (the probes come from the peer's public side)."""
    n = Nodes()
    n.node[2].endpoints = [("10.1.0.10", 41641), ("192.168.1.5", 41641)]
    n.m[1].set_peers([n.node[2]], 0.0)
    n.run_data(1, 10.0)
    assert n.m[1].take_socket_changes() == ([], [])
    assert is_public_endpoint("198.18.1.2") and is_public_endpoint("203.0.113.9")
    assert not any(map(is_public_endpoint, ["10.0.0.1", "100.64.0.1", "fd7a::1", "fe80::1"]))


def test_disco_udp_blocked_never_sprays() -> None:
    n = Nodes(hard_role=(False, None))
    n.run_data(1, 10.0)
    assert n.m[1].take_socket_changes() == ([], [])


def test_disco_hit_answered_from_the_same_socket_and_path_goes_direct_on_it() -> None:
    """The whole exchange: a probe lands on spray socket k, H pongs from k, E learns H:q_k,
    both end on a trusted direct path; H's route names socket k, losers close."""
    n = Nodes()
    h, e = n.m[1], n.m[2]
    sends = n.run_data(1, SPRAY_DELAY + 0.2)
    opened, _ = h.take_socket_changes()
    req = next(s for s in sends if s.derp is not None
               and isinstance(disco.open_sealed(s.data, n.disco[2])[1], SprayRequest))
    t = SPRAY_DELAY + 0.2
    e.note_data(1, t)
    probes, _ = e.handle(req.data, (DERP_HOST, 1), t, via_derp=1)
    k = opened[7]
    q = (HARD_PUB, probes[3].addr[1])  # this probe "lands" on socket k
    out, _ = h.handle(probes[3].data, EIM_PUB, t, sock=k)
    assert out and all(s.sock == k for s in out)  # pong (and a ping) from the same socket
    # a second probe landing on another spray socket is dropped: one winner
    late, _ = h.handle(probes[4].data, EIM_PUB, t, sock=opened[8])
    assert late == [] and h.drops["spray_socket_not_winner"] == 1
    # hand H's datagrams to E and back until quiet (E sees them from H:q)
    queue: list[tuple[int, Send]] = [(1, s) for s in out]
    while queue:
        frm, s = queue.pop(0)
        if frm == 1:
            assert s.sock == k and s.addr == EIM_PUB
            res, _ = e.handle(s.data, q, t)
            queue += [(2, x) for x in res]
        else:
            assert s.sock == 0
            if s.addr != q:
                continue  # E's pings to H's other endpoints: the hard NAT drops them
            res, _ = h.handle(s.data, EIM_PUB, t, sock=k)
            queue += [(1, x) for x in res]
    assert h.route(2, t)[0] == EIM_PUB and h.route_socket(2, t) == k
    assert e.route(1, t)[0] == q and e.route_socket(1, t) == 0
    assert h.spray_inbound() == {(k, EIM_PUB): n.node[2].node_key.raw}
    assert e.spray.counters["rounds_stopped_early"] == 1  # the hit ended E's probing
    h.tick(t + SPRAY_WINDOW)
    _, closed = h.take_socket_changes()
    assert sorted(closed) == sorted(x for x in opened if x != k)


# -- codec ---------------------------------------------------------------------------------------

ips = st.one_of(st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address),
                st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)
                .filter(lambda a: a.ipv4_mapped is None))
requests = st.builds(SprayRequest, ips, st.integers(1, MAX_SPRAY_SOCKETS),
                     st.integers(0, 2**32 - 1))


@given(requests)
def test_spray_request_round_trip(msg: SprayRequest) -> None:
    data = disco.encode_message(msg)
    assert len(data) == 2 + 16 + 2 + 4 and data[0] == 0x0A
    assert disco.decode_message(data) == msg


def test_spray_request_layout_is_as_documented() -> None:
    data = disco.encode_message(SprayRequest(ipaddress.IPv4Address("1.2.3.4"), 256, 7))
    assert data.hex() == "0a00" + "00" * 10 + "ffff01020304" + "0100" + "00000007"


@pytest.mark.parametrize("data", [
    b"\x0a\x00" + b"\x00" * 21,  # one byte short
    b"\x0a\x00" + b"\x00" * 23,  # one byte long
    b"\x0a\x00" + b"\x00" * 16 + b"\x00\x00" + b"\x00" * 4,  # zero sockets
    b"\x0a\x00" + b"\x00" * 16 + (MAX_SPRAY_SOCKETS + 1).to_bytes(2, "big") + b"\x00" * 4,
    b"\x0a\x01" + b"\x00" * 16 + b"\x01\x00" + b"\x00" * 4,  # version 1
])
def test_malformed_spray_requests_raise_disco_error(data: bytes) -> None:
    with pytest.raises(disco.DiscoError):
        disco.decode_message(data)


def test_encode_refuses_out_of_range_socket_counts() -> None:
    for n in (0, MAX_SPRAY_SOCKETS + 1):
        with pytest.raises(disco.DiscoError):
            disco.encode_message(SprayRequest(ipaddress.IPv4Address("1.2.3.4"), n, 0))


@given(requests, st.data())
@settings(max_examples=FUZZ)
def test_fuzz_mutated_spray_requests_only_raise_disco_error(msg: SprayRequest,
                                                            data: st.DataObject) -> None:
    raw = bytearray(disco.encode_message(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "grow"]))
        if op == "flip" and raw:
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "cut" and raw:
            del raw[data.draw(st.integers(0, len(raw) - 1)):]
        else:
            raw += data.draw(st.binary(min_size=1, max_size=8))
    with contextlib.suppress(disco.DiscoError):
        disco.decode_message(bytes(raw))


@given(st.binary(max_size=40))
@settings(max_examples=FUZZ)
def test_fuzz_malformed_spray_requests_to_the_manager_are_dropped_and_counted(
        body: bytes) -> None:
    """Sealed garbage after the spray-request type byte never raises out of handle()."""
    n = Nodes()
    from relaymesh.disco import codec

    plain = b"\x0a\x00" + body
    nonce = os.urandom(codec.NONCE_LEN)
    ct = codec._box(n.disco[1].raw, n.disco[2].disco_public().raw).encrypt(plain, nonce)
    pkt = codec.MAGIC + n.disco[1].public_raw() + nonce + ct.ciphertext
    before = sum(n.m[2].drops.values())
    out, _ = n.m[2].handle(pkt, (DERP_HOST, 1), 0.0, via_derp=1)
    try:
        codec.decode_message(plain)
        valid = True
    except disco.DiscoError:
        valid = False
    if not valid:
        assert out == [] and n.m[2].drops["bad_disco"] >= 1
    assert sum(n.m[2].drops.values()) >= before + (0 if valid else 1)


def test_disco_close_spray_sockets_closes_all_and_drops_their_candidates() -> None:
    n = Nodes()
    n.run_data(1, SPRAY_DELAY + 0.2)
    opened, _ = n.m[1].take_socket_changes()
    n.m[1].handle(spray_ping(n), EIM_PUB, 2.0, sock=opened[0])
    assert any(c.sock for c in n.m[1]._peers[2].paths.candidates())
    n.m[1].close_spray_sockets()
    assert sorted(n.m[1].take_socket_changes()[1]) == sorted(opened)
    assert not any(c.sock for c in n.m[1]._peers[2].paths.candidates())


def spray_ping(n: Nodes) -> bytes:
    return disco.seal(disco.Ping(b"t" * 12, n.keys[2].node_public()), n.disco[2],
                      n.disco[1].disco_public())
