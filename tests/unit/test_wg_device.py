"""Sans-IO Devices talking through memory: handshakes, data, routing, cookies, rekeys."""

from __future__ import annotations

import pytest

from relaymesh.keys import PrivateKey
from relaymesh.wireguard import Device, Timers
from relaymesh.wireguard import messages as m
from relaymesh.wireguard.testing import MemoryNet, Node, ipv4_packet, ipv6_packet

A_IPS = ["10.0.0.1/32", "fd00::1/128"]
B_IPS = ["10.0.0.2/32", "fd00::2/128"]


def pair(**kw: object) -> tuple[MemoryNet, Node, Node]:
    net = MemoryNet()
    a, b = net.add("a"), net.add("b")
    net.link(a, b, A_IPS, B_IPS, **kw)
    return net, a, b


def a_to_b(i: int = 0) -> bytes:
    return ipv4_packet("10.0.0.1", "10.0.0.2", b"a->b %d" % i)


def b_to_a(i: int = 0) -> bytes:
    return ipv4_packet("10.0.0.2", "10.0.0.1", b"b->a %d" % i)


def peer_of(owner: Node, other: Node):  # type: ignore[no-untyped-def]
    p = owner.device.peer(other.key.node_public())
    assert p is not None
    return p


@pytest.mark.parametrize("initiator", ["a", "b"])
def test_handshake_and_data_both_directions(initiator: str) -> None:
    net, a, b = pair()
    first, second = (a, b) if initiator == "a" else (b, a)
    pkt1 = a_to_b() if first is a else b_to_a()
    out = net.send(first, pkt1)
    assert len(out) == 1 and out[0].data[0] == m.MESSAGE_INITIATION and len(out[0].data) == 148
    net.deliver()
    assert second.inbox == [pkt1]  # the queued packet was flushed after the handshake
    for i in range(5):
        net.send(a, a_to_b(i))
        net.send(b, b_to_a(i))
    net.deliver()
    assert a.inbox[-5:] == [b_to_a(i) for i in range(5)]
    assert b.inbox[-5:] == [a_to_b(i) for i in range(5)]
    assert not a.device.drops and not b.device.drops
    assert peer_of(a, b).last_handshake == net.now and peer_of(b, a).last_handshake == net.now
    assert peer_of(a, b).tx_bytes > 0 and peer_of(a, b).rx_bytes > 0


def test_data_padded_to_16_and_keepalive_is_empty() -> None:
    net, a, b = pair()
    net.send(a, a_to_b())
    net.deliver()
    for size in (1, 15, 16, 17, 100):
        pkt = ipv4_packet("10.0.0.1", "10.0.0.2", bytes(size))
        (t,) = a.device.send_packet(pkt, net.now)
        encrypted = len(t.data) - m.TRANSPORT_HEADER_SIZE - m.TAG_SIZE
        assert encrypted % 16 == 0 and len(pkt) <= encrypted < len(pkt) + 16
        r = b.device.receive(t.data, a.endpoint, net.now)
        assert r.packets == [pkt]  # padding stripped by the IP total length
    ka = a.device._send_keepalive(peer_of(a, b), net.now)  # keepalive = empty payload
    assert len(ka[0].data) == m.TRANSPORT_MIN_SIZE
    r = b.device.receive(ka[0].data, a.endpoint, net.now)
    assert r.packets == [] and r.peer is peer_of(b, a) and not b.device.drops


def test_ipv6_routing_longest_prefix_across_peers() -> None:
    net = MemoryNet()
    a, b, c = net.add("a"), net.add("b"), net.add("c")
    net.link(a, b, ["fd00::1/128"], ["fd00:1::/32"])
    net.link(a, c, ["fd00::1/128"], ["fd00:1:2::/48", "10.9.0.0/16"])
    to_b = ipv6_packet("fd00::1", "fd00:1:9::5", b"to b")
    to_c = ipv6_packet("fd00::1", "fd00:1:2::5", b"to c")
    net.send(a, to_b)
    net.send(a, to_c)
    net.deliver()
    assert b.inbox == [to_b] and c.inbox == [to_c]
    reply = ipv6_packet("fd00:1:2::5", "fd00::1", b"reply")
    net.send(c, reply)
    net.deliver()
    assert a.inbox == [reply]
    assert a.device.route("fd00:1:2::1") is peer_of(a, c)
    assert a.device.route("fd00:1:3::1") is peer_of(a, b)
    assert a.device.route("fd01::1") is None
    assert net.send(a, ipv6_packet("fd00::1", "fd01::1")) == []
    assert a.device.drops["no_route"] == 1


def test_inbound_source_must_be_in_senders_allowed_ips() -> None:
    net, a, b = pair()
    net.send(a, a_to_b())
    net.deliver()
    spoofed = ipv4_packet("10.0.0.77", "10.0.0.2", b"spoof")  # A may only send from 10.0.0.1
    peer = peer_of(a, b)
    kp = peer.current
    assert kp is not None
    (t,) = [a.device._encrypt(peer, kp, spoofed, net.now)]
    r = b.device.receive(t.data, a.endpoint, net.now)
    assert r.packets == [] and b.device.drops == {"bad_source": 1}


def test_replayed_data_packet_dropped() -> None:
    net, a, b = pair()
    net.send(a, a_to_b())
    net.deliver()
    (t,) = a.device.send_packet(a_to_b(1), net.now)
    assert b.device.receive(t.data, a.endpoint, net.now).packets == [a_to_b(1)]
    assert b.device.receive(t.data, a.endpoint, net.now).packets == []
    assert b.device.drops == {"replay": 1}


def test_tampered_data_packet_dropped() -> None:
    net, a, b = pair()
    net.send(a, a_to_b())
    net.deliver()
    (t,) = a.device.send_packet(a_to_b(1), net.now)
    bad = bytearray(t.data)
    bad[-1] ^= 1
    assert b.device.receive(bytes(bad), a.endpoint, net.now).packets == []
    assert b.device.drops == {"bad_auth": 1}


def test_replayed_initiation_rejected() -> None:
    net, a, b = pair()
    (init,) = net.send(a, a_to_b())
    net.deliver()
    before = b.device.peers[a.key.node_public().raw].next or peer_of(b, a).current
    net.now += 1.0
    r = b.device.receive(init.data, a.endpoint, net.now)
    assert r.transmits == [] and b.device.drops == {"replayed_initiation": 1}
    assert (peer_of(b, a).next or peer_of(b, a).current) is before


def test_older_initiation_rejected_after_newer() -> None:
    net, a, b = pair()
    (old,) = a.device.initiate_handshake(b.key.node_public(), net.now)
    net.now += 5.4
    (new,) = a.device.tick(net.now)  # retransmission: fresh initiation, later timestamp
    assert new.data[0] == m.MESSAGE_INITIATION and new.data != old.data
    assert len(b.device.receive(new.data, a.endpoint, net.now).transmits) == 1
    net.now += 1.0
    r = b.device.receive(old.data, a.endpoint, net.now)
    assert r.transmits == [] and b.device.drops == {"replayed_initiation": 1}


def test_initiation_with_bad_mac1_dropped_without_reply() -> None:
    net, a, b = pair()
    (init,) = a.device.send_packet(a_to_b(), net.now)
    bad = bytearray(init.data)
    bad[120] ^= 0xFF
    r = b.device.receive(bytes(bad), a.endpoint, net.now)
    assert r.transmits == [] and b.device.drops == {"bad_mac1": 1}


def test_unknown_peer_initiation_dropped() -> None:
    net, _a, b = pair()
    stranger = net.add("s")
    stranger.device.set_peer(b.key.node_public(), allowed_ips=["10.0.0.2/32"],
                             endpoint=b.endpoint)
    (init,) = stranger.device.send_packet(a_to_b(), net.now)
    r = b.device.receive(init.data, stranger.endpoint, net.now)
    assert r.transmits == [] and b.device.drops == {"unknown_peer": 1}


def test_cookie_reply_under_load_then_handshake_with_mac2() -> None:
    net = MemoryNet()
    load = {"on": True}
    a = net.add("a")
    b = net.add("b", under_load=lambda: load["on"])
    net.link(a, b, A_IPS, B_IPS)
    (init,) = net.send(a, a_to_b())
    assert init.data[132:148] == bytes(16)  # no cookie yet: mac2 zero
    net.in_flight.clear()
    r = b.device.receive(init.data, a.endpoint, net.now)
    assert len(r.transmits) == 1 and r.transmits[0].data[0] == m.MESSAGE_COOKIE_REPLY
    assert b.device.drops == {"under_load": 1}
    assert peer_of(b, a).next is None  # no handshake state was created
    r2 = a.device.receive(r.transmits[0].data, b.endpoint, net.now)
    assert r2.transmits == [] and not a.device.drops
    assert peer_of(a, b).cookies.has_cookie
    # the next initiation (retransmission after REKEY_TIMEOUT) carries mac2 and is accepted
    net.now += 5.4
    (init2,) = a.device.tick(net.now)
    assert init2.data[0] == m.MESSAGE_INITIATION and init2.data[132:148] != bytes(16)
    net.in_flight.append((a.endpoint, b.endpoint, init2.data))
    net.deliver()
    assert b.inbox == [a_to_b()]
    assert b.device.drops == {"under_load": 1}
    assert peer_of(a, b).current is not None


def test_mac2_from_another_source_address_rejected_under_load() -> None:
    net = MemoryNet()
    a = net.add("a")
    b = net.add("b", under_load=lambda: True)
    net.link(a, b, A_IPS, B_IPS)
    (init,) = a.device.send_packet(a_to_b(), net.now)
    (reply,) = b.device.receive(init.data, a.endpoint, net.now).transmits
    a.device.receive(reply.data, b.endpoint, net.now)
    net.now += 5.4
    (init2,) = a.device.tick(net.now)
    r = b.device.receive(init2.data, ("elsewhere", 1), net.now)  # cookie bound to a's address
    assert r.transmits[0].data[0] == m.MESSAGE_COOKIE_REPLY
    assert b.device.drops == {"under_load": 2}


def test_cookie_reply_for_someone_else_rejected() -> None:
    net = MemoryNet()
    a = net.add("a")
    b = net.add("b", under_load=lambda: True)
    net.link(a, b, A_IPS, B_IPS)
    (init,) = a.device.send_packet(a_to_b(), net.now)
    (reply,) = b.device.receive(init.data, a.endpoint, net.now).transmits
    bad = bytearray(reply.data)
    bad[40] ^= 1
    a.device.receive(bytes(bad), b.endpoint, net.now)
    assert a.device.drops == {"bad_cookie_reply": 1}
    assert not peer_of(a, b).cookies.has_cookie


def test_preshared_key_must_match() -> None:
    net = MemoryNet()
    a, b = net.add("a"), net.add("b")
    a.device.set_peer(b.key.node_public(), allowed_ips=B_IPS, endpoint=b.endpoint,
                      preshared_key=b"\x01" * 32)
    b.device.set_peer(a.key.node_public(), allowed_ips=A_IPS, endpoint=a.endpoint,
                      preshared_key=b"\x02" * 32)
    net.send(a, a_to_b())
    net.deliver()
    assert b.inbox == [] and a.device.drops == {"bad_response": 1}
    b.device.set_peer(a.key.node_public(), allowed_ips=A_IPS, preshared_key=b"\x01" * 32)
    net.now += 5.4
    net.tick()
    net.deliver()
    assert b.inbox == [a_to_b()]


def test_peers_added_changed_removed_at_run_time() -> None:
    net, a, b = pair()
    net.send(a, a_to_b())
    net.deliver()
    c = net.add("c")
    # move 10.0.0.2/32 from b to c: a prefix has one owner
    a.device.set_peer(c.key.node_public(), allowed_ips=["10.0.0.2/32"], endpoint=c.endpoint)
    c.device.set_peer(a.key.node_public(), allowed_ips=A_IPS, endpoint=a.endpoint)
    assert peer_of(a, b).allowed_ips == ["fd00::2/128"]
    assert a.device.route("10.0.0.2") is peer_of(a, c)
    net.send(a, a_to_b(7))
    net.deliver()
    assert c.inbox == [a_to_b(7)] and b.inbox == [a_to_b()]
    # change b's endpoint at run time
    a.device.set_peer(b.key.node_public(), allowed_ips=["10.0.0.2/32"], endpoint=("b2", 1))
    assert peer_of(a, b).endpoint == ("b2", 1) and a.device.route("10.0.0.2") is peer_of(a, b)
    # remove b: its sessions and routes are gone, its packets are dropped
    (t,) = b.device.send_packet(b_to_a(), net.now)
    removed = peer_of(a, b)
    a.device.remove_peer(b.key.node_public())
    assert a.device.peer(b.key.node_public()) is None and a.device.route("10.0.0.2") is None
    assert a.device.receive(t.data, b.endpoint, net.now).packets == []
    assert a.device.drops == {"unknown_index": 1}
    assert all(getattr(e, "peer", e) is not removed for e in a.device._index.values())
    # and it can be added back: a fresh handshake works
    a.device.set_peer(b.key.node_public(), allowed_ips=["10.0.0.2/32"], endpoint=b.endpoint)
    net.now += 1
    net.send(a, a_to_b(8))
    net.deliver()
    assert b.inbox[-1] == a_to_b(8)


def test_roaming_updates_endpoint_from_authenticated_packets_only() -> None:
    net, a, b = pair()
    net.send(a, a_to_b())
    net.deliver()
    (t,) = a.device.send_packet(a_to_b(1), net.now)
    b.device.receive(t.data, ("a-new", 999), net.now)
    assert peer_of(b, a).endpoint == ("a-new", 999)
    b.device.receive(b"\x04\0\0\0" + bytes(40), ("evil", 1), net.now)
    assert peer_of(b, a).endpoint == ("a-new", 999)


def test_roaming_disabled_keeps_configured_endpoint() -> None:
    net = MemoryNet()
    a = net.add("a")
    b = net.add("b", roaming=False)
    net.link(a, b, A_IPS, B_IPS)
    net.send(a, a_to_b())
    net.deliver()
    (t,) = a.device.send_packet(a_to_b(1), net.now)
    b.device.receive(t.data, ("a-new", 999), net.now)
    assert peer_of(b, a).endpoint == a.endpoint


def test_responder_without_endpoint_learns_it() -> None:
    net = MemoryNet()
    a, b = net.add("a"), net.add("b")
    a.device.set_peer(b.key.node_public(), allowed_ips=B_IPS, endpoint=b.endpoint)
    b.device.set_peer(a.key.node_public(), allowed_ips=A_IPS)  # no endpoint: a roams
    assert net.send(b, b_to_a()) == [] and b.device.drops == {"no_endpoint": 1}
    net.send(a, a_to_b())
    net.deliver()
    assert peer_of(b, a).endpoint == a.endpoint
    net.send(b, b_to_a())
    net.deliver()
    assert a.inbox == [b_to_a()]


def test_responder_queues_until_initiator_confirms() -> None:
    """The responder may not send with its `next` keypair before the initiator used it."""
    net, a, b = pair()
    (init,) = a.device.initiate_handshake(b.key.node_public(), net.now)
    net.in_flight.clear()
    r = b.device.receive(init.data, a.endpoint, net.now)
    assert peer_of(b, a).next is not None and peer_of(b, a).current is None
    assert b.device.send_packet(b_to_a(), net.now) == []  # queued, handshake already running
    # the response reaches a; a's keepalive confirms; b then flushes its queued packet
    r2 = a.device.receive(r.transmits[0].data, b.endpoint, net.now)
    (keepalive,) = r2.transmits
    assert len(keepalive.data) == m.TRANSPORT_MIN_SIZE
    r3 = b.device.receive(keepalive.data, a.endpoint, net.now)
    assert peer_of(b, a).current is not None and peer_of(b, a).next is None
    assert len(r3.transmits) == 1
    assert a.device.receive(r3.transmits[0].data, b.endpoint, net.now).packets == [b_to_a()]


def test_rekey_without_packet_loss() -> None:
    """Packets sent with the old keypair while a rekey happens are all delivered (previous/next)."""
    net, a, b = pair()
    net.send(a, a_to_b())
    net.deliver()
    old_a = peer_of(a, b).current
    net.now += 121.0  # REKEY_AFTER_TIME passed: a's next send also starts a handshake
    out = net.send(a, a_to_b(1))
    assert [t.data[0] for t in out] == [m.MESSAGE_TRANSPORT, m.MESSAGE_INITIATION]
    in_flight_old = [net.send(b, b_to_a(i)) for i in range(3)]  # b still on the old keypair
    # deliver only the initiation and its response; keep old-key data packets in flight
    held = [x for x in net.in_flight if x[2][0] == m.MESSAGE_TRANSPORT]
    net.in_flight = [x for x in net.in_flight if x[2][0] != m.MESSAGE_TRANSPORT]
    net.deliver()  # initiation -> response -> a's keepalive confirms on b
    assert peer_of(a, b).current is not old_a and peer_of(a, b).previous is old_a
    assert peer_of(b, a).current is not None and peer_of(b, a).current.remote_index != 0
    # new packets use the new keypair, the held old-keypair packets still decrypt
    net.send(a, a_to_b(2))
    net.send(b, b_to_a(3))
    net.in_flight.extend(held)
    net.deliver()
    assert sorted(b.inbox) == sorted([a_to_b(), a_to_b(1), a_to_b(2)])
    assert sorted(a.inbox) == sorted([b_to_a(i) for i in range(4)])
    assert not a.device.drops and not b.device.drops
    assert in_flight_old


def test_rekey_after_messages() -> None:
    net = MemoryNet(timers=Timers(rekey_after_messages=5))
    a, b = net.add("a"), net.add("b")
    net.link(a, b, A_IPS, B_IPS)
    net.send(a, a_to_b())
    net.deliver()
    net.now += 6  # past the REKEY_TIMEOUT rate limit on initiations
    kinds = []
    for i in range(6):
        kinds.append([t.data[0] for t in net.send(a, a_to_b(i))])
    assert [m.MESSAGE_TRANSPORT, m.MESSAGE_INITIATION] in kinds
    net.deliver()
    assert len(b.inbox) == 7 and not b.device.drops


def test_reject_after_messages_forces_new_session() -> None:
    net = MemoryNet(timers=Timers(rekey_after_messages=2**40, reject_after_messages=4))
    a, b = net.add("a"), net.add("b")
    net.link(a, b, A_IPS, B_IPS)
    net.send(a, a_to_b())
    net.deliver()  # counter 0 used by the first packet
    for i in range(3):
        assert [t.data[0] for t in net.send(a, a_to_b(i))] == [m.MESSAGE_TRANSPORT]
    net.deliver()
    net.now += 6  # let the rate limit on initiations pass
    out = net.send(a, a_to_b(9))
    assert [t.data[0] for t in out] == [m.MESSAGE_INITIATION]
    net.deliver()
    assert b.inbox[-1] == a_to_b(9)


def test_set_peer_rejects_bad_config() -> None:
    dev = Device(PrivateKey.generate())
    with pytest.raises(ValueError):
        dev.set_peer(b"short", allowed_ips=[])
    with pytest.raises(ValueError):
        dev.set_peer(PrivateKey.generate().node_public(), allowed_ips=["10.0.0.300/32"])
    with pytest.raises(ValueError):
        dev.set_peer(dev.public_key)


def test_outbound_garbage_counted() -> None:
    net, a, _ = pair()
    assert net.send(a, b"") == [] and net.send(a, b"\x45" * 10) == []
    assert a.device.drops == {"bad_outbound_packet": 2}


def test_simultaneous_initiations_both_complete() -> None:
    """Both sides initiate at once: each answers the other and still completes its own."""
    net, a, b = pair()
    net.send(a, a_to_b())
    net.send(b, b_to_a())
    assert [x[2][0] for x in net.in_flight] == [m.MESSAGE_INITIATION] * 2
    net.deliver()
    assert b.inbox == [a_to_b()] and a.inbox == [b_to_a()]
    assert not a.device.drops and not b.device.drops  # neither response was lost
    assert peer_of(a, b).current is not None and peer_of(b, a).current is not None
    net.send(a, a_to_b(1))
    net.send(b, b_to_a(1))
    net.deliver()
    assert b.inbox[-1] == a_to_b(1) and a.inbox[-1] == b_to_a(1)


def test_packets_on_a_displaced_session_still_accepted() -> None:
    """A keypair pushed out of previous/current/next by racing handshakes stays receive-only."""
    net, a, b = pair()
    net.send(a, a_to_b())
    net.deliver()
    first = peer_of(b, a).current
    assert first is not None
    (late,) = a.device.send_packet(a_to_b(1), net.now)  # on the first session, held back
    for i in range(3):  # three more handshakes, alternating initiators
        net.now += 6
        who, other = (b, a) if i % 2 == 0 else (a, b)
        net.in_flight.extend((who.endpoint, other.endpoint, t.data) for t in
                             who.device.initiate_handshake(other.key.node_public(), net.now))
        net.deliver()
    p = peer_of(b, a)
    assert first not in (p.previous, p.current, p.next) and first in p.retired
    assert b.device.receive(late.data, a.endpoint, net.now).packets == [a_to_b(1)]


def test_padding_capped_at_mtu() -> None:
    net = MemoryNet()
    a, b = net.add("a", mtu=1420), net.add("b")
    net.link(a, b, A_IPS, B_IPS)
    net.send(a, a_to_b())
    net.deliver()
    pkt = ipv4_packet("10.0.0.1", "10.0.0.2", bytes(1415 - 20))
    (t,) = a.device.send_packet(pkt, net.now)
    assert len(t.data) - m.TRANSPORT_MIN_SIZE == 1420  # not 1424: wireguard-go never pads past MTU
    assert b.device.receive(t.data, a.endpoint, net.now).packets == [pkt]
