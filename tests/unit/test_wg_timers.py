"""Fake-clock tests of every WireGuard timer (whitepaper §6), at the whitepaper's default values."""

from __future__ import annotations

import itertools
import random

from relaymesh.wireguard import messages as m
from relaymesh.wireguard.device import Peer
from relaymesh.wireguard.testing import MemoryNet, Node, ipv4_packet

A_IPS = ["10.0.0.1/32"]
B_IPS = ["10.0.0.2/32"]


def a_to_b(i: int = 0) -> bytes:
    return ipv4_packet("10.0.0.1", "10.0.0.2", b"a->b %d" % i)


def b_to_a(i: int = 0) -> bytes:
    return ipv4_packet("10.0.0.2", "10.0.0.1", b"b->a %d" % i)


def peer_of(owner: Node, other: Node) -> Peer:
    p = owner.device.peer(other.key.node_public())
    assert p is not None
    return p


def connected(**kw: object) -> tuple[MemoryNet, Node, Node]:
    """a and b after a completed handshake initiated by a (a's first packet delivered)."""
    net = MemoryNet()
    a, b = net.add("a"), net.add("b")
    net.link(a, b, A_IPS, B_IPS, **kw)
    net.send(a, a_to_b())
    net.deliver()
    assert b.inbox == [a_to_b()]
    return net, a, b


def kinds(transmits: list) -> list[int]:  # type: ignore[type-arg]
    return [t.data[0] for t in transmits]


def test_initiator_rekeys_when_sending_after_rekey_after_time() -> None:
    net, a, b = connected()
    t0 = net.now
    net.now = t0 + 119.9
    assert kinds(net.send(a, a_to_b(1))) == [m.MESSAGE_TRANSPORT]
    net.now = t0 + 120.0
    assert kinds(net.send(a, a_to_b(2))) == [m.MESSAGE_TRANSPORT, m.MESSAGE_INITIATION]
    # the responder never rekeys on time (avoids both sides rekeying at once)
    assert kinds(net.send(b, b_to_a(1))) == [m.MESSAGE_TRANSPORT]


def test_session_rejected_after_reject_after_time() -> None:
    net, a, b = connected()
    t0 = net.now
    net.now = t0 + 179.9
    late, init = a.device.send_packet(a_to_b(1), net.now)  # also starts a rekey (>120 s)...
    assert init.data[0] == m.MESSAGE_INITIATION  # ...whose initiation we lose
    net.now = t0 + 180.0
    assert b.device.receive(late.data, a.endpoint, net.now).packets == []
    assert b.device.drops == {"expired_keypair": 1}
    # sending with the expired keypair is refused: the packet waits for the running handshake
    assert m.MESSAGE_TRANSPORT not in kinds(net.send(a, a_to_b(2)))
    assert list(peer_of(a, b).staged) == [a_to_b(2)]
    net.now = t0 + 185.4  # the lost initiation is retransmitted (REKEY_TIMEOUT + jitter)
    assert kinds(net.tick(a)) == [m.MESSAGE_INITIATION]
    net.deliver()
    assert b.inbox[-1] == a_to_b(2)


def test_retransmit_with_jitter_within_bounds() -> None:
    net = MemoryNet()
    a, b = net.add("a"), net.add("b")
    net.link(a, b, A_IPS, B_IPS)
    times = [net.now]
    assert kinds(net.send(a, a_to_b())) == [m.MESSAGE_INITIATION]
    for _ in range(8):
        deadline = a.device.next_deadline()
        assert deadline is not None
        net.now = deadline - 0.001
        assert a.device.tick(net.now) == []  # nothing before the deadline
        net.now = deadline
        assert kinds(a.device.tick(net.now)) == [m.MESSAGE_INITIATION]
        times.append(net.now)
    gaps = [y - x for x, y in itertools.pairwise(times)]
    assert all(5.0 <= g <= 5.333 + 1e-9 for g in gaps), gaps
    assert len({round(g, 6) for g in gaps}) > 1  # jittered, not a fixed period


class MaxJitter(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return b


def test_jitter_comes_from_the_injected_rng() -> None:
    net = MemoryNet()
    a, b = net.add("a", rng=MaxJitter(3)), net.add("b")
    net.link(a, b, A_IPS, B_IPS)
    net.send(a, a_to_b())
    assert a.device.next_deadline() == net.now + 5.0 + 0.333


def test_handshake_abandoned_after_rekey_attempt_time() -> None:
    net = MemoryNet()
    a, b = net.add("a"), net.add("b")
    net.link(a, b, A_IPS, B_IPS)
    start = net.now
    sent = [net.now] if net.send(a, a_to_b()) else []
    while (deadline := a.device.next_deadline()) is not None and deadline < start + 300:
        net.now = deadline
        sent += [net.now for t in a.device.tick(net.now) if t.data[0] == m.MESSAGE_INITIATION]
    assert all(t < start + 90.0 for t in sent)
    assert 16 <= len(sent) <= 18  # one attempt every 5..5.333 s during 90 s
    p = peer_of(a, b)
    assert not p.staged and p.retransmit_at is None  # queued packet dropped, no more retries
    # nothing is delivered and nothing more is sent until new traffic
    net.now = start + 200
    assert a.device.tick(net.now) == []
    assert kinds(net.send(a, a_to_b(1))) == [m.MESSAGE_INITIATION]  # new traffic: new attempt


def test_keepalive_after_receive_only_for_keepalive_timeout() -> None:
    net, a, b = connected()
    t0 = net.now
    net.now = t0 + 9.99
    assert b.device.tick(net.now) == []
    net.now = t0 + 10.0
    (ka,) = b.device.tick(net.now)
    assert ka.endpoint == a.endpoint and len(ka.data) == m.TRANSPORT_MIN_SIZE  # empty payload
    r = a.device.receive(ka.data, b.endpoint, net.now)
    assert r.peer is peer_of(a, b) and r.packets == [] and not a.device.drops
    net.now = t0 + 30.0
    assert b.device.tick(net.now) == []  # one keepalive per receive, not periodic


def test_no_keepalive_when_we_answered_with_data() -> None:
    net, _a, b = connected()
    t0 = net.now
    net.now = t0 + 5.0
    net.send(b, b_to_a())  # b's reply makes a keepalive unnecessary
    net.now = t0 + 11.0
    assert [t for t in b.device.tick(net.now) if len(t.data) == m.TRANSPORT_MIN_SIZE] == []


def answered(net: MemoryNet) -> None:
    """Let b answer a's first packet with its keepalive, as it does 10 s after receiving data."""
    net.now += 10.0
    net.tick()
    net.deliver()


def test_new_handshake_when_sent_data_gets_no_answer() -> None:
    net, a, _b = connected()
    answered(net)
    net.now += 1.0
    t1 = net.now
    net.send(a, a_to_b(1))
    net.in_flight.clear()  # b never sees it
    net.now = t1 + 14.99  # KEEPALIVE + REKEY_TIMEOUT = 15 s (+ jitter)
    assert a.device.tick(net.now) == []
    net.now = t1 + 15.0 + 0.334
    assert kinds(a.device.tick(net.now)) == [m.MESSAGE_INITIATION]


def test_any_authenticated_reply_cancels_new_handshake_timer() -> None:
    net, a, _b = connected()
    net.now += 1.0
    t1 = net.now
    net.send(a, a_to_b(1))
    net.deliver()
    net.now = t1 + 10.0
    net.tick()  # b's keepalive (it received data, sent nothing)
    net.deliver()
    net.now = t1 + 16.0
    assert a.device.tick(net.now) == []


def test_persistent_keepalive() -> None:
    net, a, _b = connected(persistent_keepalive=25)
    answered(net)  # a's last authenticated traffic: b's keepalive, received now
    t0 = net.now
    net.now = t0 + 24.9
    assert a.device.tick(net.now) == []
    net.now = t0 + 25.0
    (ka,) = a.device.tick(net.now)
    assert len(ka.data) == m.TRANSPORT_MIN_SIZE
    net.now = t0 + 50.0
    (ka2,) = a.device.tick(net.now)
    assert len(ka2.data) == m.TRANSPORT_MIN_SIZE


def test_persistent_keepalive_set_at_run_time_starts_handshake_at_once() -> None:
    net = MemoryNet()
    a, b = net.add("a"), net.add("b")
    net.link(a, b, A_IPS, B_IPS)
    a.device.tick(net.now)
    a.device.set_peer(b.key.node_public(), allowed_ips=B_IPS, persistent_keepalive=25)
    deadline = a.device.next_deadline()
    assert deadline is not None and deadline <= net.now
    assert kinds(a.device.tick(net.now)) == [m.MESSAGE_INITIATION]  # no session: handshake


def test_keys_zeroed_after_three_times_reject_after_time() -> None:
    net, a, b = connected()
    t0 = net.now
    net.now = t0 + 539.0
    a.device.tick(net.now)
    b.device.tick(net.now)
    assert peer_of(a, b).current is not None
    net.now = t0 + 540.0
    a.device.tick(net.now)
    b.device.tick(net.now)
    for p in (peer_of(a, b), peer_of(b, a)):
        assert p.current is None and p.previous is None and p.next is None
    assert a.device._index == {} and b.device._index == {}


def test_initiator_rekeys_before_reject_when_only_receiving() -> None:
    """REJECT - KEEPALIVE - REKEY_TIMEOUT (165 s) after the handshake, a received packet makes the
    initiator rekey once, so a receive-only session does not die at 180 s."""
    net, a, b = connected()
    t0 = net.now
    net.now = t0 + 164.0
    (t,) = b.device.send_packet(b_to_a(1), net.now)
    assert a.device.receive(t.data, b.endpoint, net.now).transmits == []
    net.now = t0 + 165.0
    (t,) = b.device.send_packet(b_to_a(2), net.now)
    r = a.device.receive(t.data, b.endpoint, net.now)
    assert kinds(r.transmits) == [m.MESSAGE_INITIATION]
    (t,) = b.device.send_packet(b_to_a(3), net.now + 1)
    assert a.device.receive(t.data, b.endpoint, net.now + 1).transmits == []  # only once


def test_next_deadline_none_when_idle() -> None:
    net = MemoryNet()
    a, b = net.add("a"), net.add("b")
    net.link(a, b, A_IPS, B_IPS)
    assert a.device.next_deadline() is None
