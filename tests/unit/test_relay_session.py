"""Sans-IO relay server: allocate, bind handshake, forwarding, expiry, limits, through memory."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from ipaddress import IPv4Address

import pytest

from relaymesh import disco, relay
from relaymesh.keys import DiscoKey, PrivateKey
from relaymesh.relay import Drop, RelayLimits, RelayServer, State
from relaymesh.relay.session import Addr

FUZZ = int(os.environ.get("RELAYMESH_FUZZ_EXAMPLES", "300"))
CANDIDATE = (IPv4Address("127.0.0.1"), 7000)
A_ADDR: Addr = ("127.0.0.2", 40001)
B_ADDR: Addr = ("127.0.0.3", 40002)


@dataclass
class World:
    srv: RelayServer
    relay_key: PrivateKey
    a: PrivateKey
    b: PrivateKey


def make(limits: RelayLimits | None = None, seed: int = 1) -> World:
    relay_key = PrivateKey.generate()
    srv = RelayServer(
        relay_key, now=0.0, rng=random.Random(seed).randbytes, limits=limits, candidates=[CANDIDATE]
    )
    return World(srv, relay_key, PrivateKey.generate(), PrivateKey.generate())


def allocate(srv: RelayServer, x: PrivateKey, y: PrivateKey, now: float) -> disco.RelayEndpoint:
    resp = srv.handle_allocate(x.disco_public(), y.disco_public(), 7, now, allowed=True)
    assert resp is not None
    assert resp.generation == 7
    return resp.endpoint


def challenge(srv: RelayServer, client: relay.BindClient, source: Addr, now: float) -> bytes:
    """Send bind from ``source``; return the answer packet the client produces."""
    out = srv.handle_datagram(client.bind_packet(), source, now)
    assert len(out) == 1 and out[0][1] == source
    return client.handle_packet(out[0][0])


def bind(
    srv: RelayServer,
    key: PrivateKey,
    ep: disco.RelayEndpoint,
    source: Addr,
    now: float,
    gen: int = 1,
) -> None:
    client = relay.BindClient(key, ep, gen)
    assert srv.handle_datagram(challenge(srv, client, source, now), source, now) == []


def data(ep: disco.RelayEndpoint, payload: bytes) -> bytes:
    return relay.encode_header(ep.session_id, relay.PROTO_WIREGUARD) + payload


def bound_pair(limits: RelayLimits | None = None) -> tuple[World, disco.RelayEndpoint]:
    w = make(limits)
    ep = allocate(w.srv, w.a, w.b, 0.0)
    bind(w.srv, w.a, ep, A_ADDR, 1.0)
    bind(w.srv, w.b, ep, B_ADDR, 1.0)
    return w, ep


def test_two_clients_allocate_bind_and_forward_through_memory() -> None:
    w = make()
    ep = allocate(w.srv, w.a, w.b, 0.0)
    # A tells B about the session; B learns the same endpoint description through disco.
    via = disco.seal(disco.CallMeMaybeVia(ep), w.a, w.b.disco_public())
    _, msg = disco.open_sealed(via, w.b)
    assert isinstance(msg, disco.CallMeMaybeVia)
    ep_b = msg.endpoint
    assert ep_b.server_disco == w.relay_key.disco_public()
    assert ep_b.candidates == (CANDIDATE,)

    bind(w.srv, w.a, ep, A_ADDR, 1.0)
    assert w.srv.session_stats(ep.session_id).state is State.HALF_BOUND  # type: ignore[union-attr]
    bind(w.srv, w.b, ep_b, B_ADDR, 1.5)
    assert w.srv.session_stats(ep.session_id).state is State.BOUND  # type: ignore[union-attr]

    p1 = data(ep, b"wireguard from a")
    assert w.srv.handle_datagram(p1, A_ADDR, 2.0) == [(p1, B_ADDR)]  # unmodified, header included
    p2 = data(ep, b"from b, a bit longer")
    assert w.srv.forward(p2, B_ADDR, 2.0) == A_ADDR
    stats = w.srv.session_stats(ep.session_id)
    assert stats is not None
    assert stats.packets == (1, 1)
    assert stats.bytes == (len(p1), len(p2))
    m = w.srv.metrics(with_sessions=True)
    assert m.forwarded_packets == 2 and m.forwarded_bytes == len(p1) + len(p2)
    assert m.sessions_by_state == {"allocated": 0, "half_bound": 0, "bound": 1}
    assert m.sessions[0] == stats
    assert m.drops == {}


def test_no_forwarding_until_both_sides_bound() -> None:
    w = make()
    ep = allocate(w.srv, w.a, w.b, 0.0)
    bind(w.srv, w.a, ep, A_ADDR, 1.0)
    assert w.srv.forward(data(ep, b"x"), A_ADDR, 1.0) is None
    assert w.srv.drops[Drop.NOT_BOUND] == 1


def test_wrong_mac_is_refused() -> None:
    w = make()
    ep = allocate(w.srv, w.a, w.b, 0.0)
    hdr = relay.encode_header(ep.session_id, relay.PROTO_DISCO, control=True)
    forged = disco.Answer(ep.session_id, 1, w.b.disco_public(), b"\x00" * 32)
    pkt = hdr + disco.seal(forged, w.a, w.relay_key.disco_public())
    assert w.srv.handle_datagram(pkt, A_ADDR, 1.0) == []
    assert w.srv.drops[Drop.BAD_MAC] == 1
    assert w.srv.session_stats(ep.session_id).state is State.ALLOCATED  # type: ignore[union-attr]


def test_answer_from_a_different_source_is_refused() -> None:
    w = make()
    ep = allocate(w.srv, w.a, w.b, 0.0)
    answer = challenge(w.srv, relay.BindClient(w.a, ep, 1), A_ADDR, 1.0)
    assert w.srv.handle_datagram(answer, ("127.0.0.9", 40001), 1.0) == []
    assert w.srv.drops[Drop.BAD_MAC] == 1
    assert w.srv.session_stats(ep.session_id).addrs == (None, None)  # type: ignore[union-attr]


def test_valid_session_id_from_unbound_address_is_dropped() -> None:
    w, ep = bound_pair()
    assert w.srv.forward(data(ep, b"spoof"), ("127.0.0.66", 5555), 2.0) is None
    assert w.srv.forward(data(ep, b"x"), A_ADDR, 2.0) == B_ADDR
    other = (ep.session_id + 1) & 0xFFFFFF
    assert w.srv.forward(relay.encode_header(other, relay.PROTO_WIREGUARD), A_ADDR, 2.0) is None
    assert w.srv.drops == {Drop.UNBOUND_SOURCE: 1, Drop.UNKNOWN_SESSION: 1}


def test_third_party_cannot_bind() -> None:
    w = make()
    ep = allocate(w.srv, w.a, w.b, 0.0)
    mallory = PrivateKey.generate()
    hdr = relay.encode_header(ep.session_id, relay.PROTO_DISCO, control=True)
    bind_msg = disco.Bind(ep.session_id, 1, w.b.disco_public())
    pkt = hdr + disco.seal(bind_msg, mallory, w.relay_key.disco_public())
    assert w.srv.handle_datagram(pkt, A_ADDR, 1.0) == []
    assert w.srv.drops[Drop.NOT_PARTY] == 1
    with pytest.raises(relay.BindError):
        relay.BindClient(mallory, ep, 1)


def test_secret_rotation_accepts_previous_and_refuses_older() -> None:
    limits = RelayLimits(bind_lifetime=1000.0, secret_rotation=120.0)
    w = make(limits)
    ep = allocate(w.srv, w.a, w.b, 0.0)
    ans_a = challenge(w.srv, relay.BindClient(w.a, ep, 1), A_ADDR, 10.0)
    ans_b = challenge(w.srv, relay.BindClient(w.b, ep, 1), B_ADDR, 10.0)
    # One rotation later (epoch 1): the previous secret still verifies.
    assert w.srv.handle_datagram(ans_a, A_ADDR, 130.0) == []
    assert w.srv.session_stats(ep.session_id).addrs[0] == A_ADDR  # type: ignore[union-attr]
    # Two rotations later (epoch 2): the secret of epoch 0 is gone.
    assert w.srv.handle_datagram(ans_b, B_ADDR, 250.0) == []
    assert w.srv.drops[Drop.BAD_MAC] == 1
    assert w.srv.session_stats(ep.session_id).addrs[1] is None  # type: ignore[union-attr]


def test_secret_gap_of_two_periods_refuses_old_mac_even_without_traffic() -> None:
    limits = RelayLimits(bind_lifetime=1000.0, secret_rotation=120.0)
    w = make(limits)
    ep = allocate(w.srv, w.a, w.b, 0.0)
    ans_a = challenge(w.srv, relay.BindClient(w.a, ep, 1), A_ADDR, 10.0)
    assert w.srv.handle_datagram(ans_a, A_ADDR, 245.0) == []  # no rotation ran at 120..240
    assert w.srv.drops[Drop.BAD_MAC] == 1


def test_unbound_session_expires_after_bind_lifetime() -> None:
    w = make()
    ep = allocate(w.srv, w.a, w.b, 0.0)
    bind(w.srv, w.a, ep, A_ADDR, 5.0)  # half bound still counts as unbound
    assert w.srv.expire(30.0) == 0
    assert w.srv.expire(30.5) == 1
    assert len(w.srv) == 0
    assert w.srv.session_stats(ep.session_id) is None


def test_bound_session_expires_after_idle_lifetime_of_either_side() -> None:
    w, ep = bound_pair()  # both bound at t=1
    pkt = data(ep, b"keepalive")
    assert w.srv.forward(pkt, A_ADDR, 200.0) == B_ADDR  # A is active, B silent since t=1
    assert w.srv.expire(300.0) == 0
    assert w.srv.forward(pkt, A_ADDR, 301.5) is None
    assert w.srv.drops[Drop.EXPIRED] == 1
    assert len(w.srv) == 0
    assert w.srv.metrics().forwarded_packets == 1  # retired counters survive expiry


def test_traffic_both_ways_keeps_a_bound_session_alive() -> None:
    w, ep = bound_pair()
    pkt = data(ep, b"x")
    for t in range(100, 1000, 100):
        assert w.srv.forward(pkt, A_ADDR, float(t)) == B_ADDR
        assert w.srv.forward(pkt, B_ADDR, float(t)) == A_ADDR
    assert w.srv.expire(1000.0) == 0


def test_rate_limit_limits_one_client_while_another_session_flows() -> None:
    limits = RelayLimits(
        packets_per_second=10.0, packet_burst=5.0, bytes_per_second=1e9, byte_burst=1e9
    )
    w, ep = bound_pair(limits)
    c, d = PrivateKey.generate(), PrivateKey.generate()
    ep2 = allocate(w.srv, c, d, 0.0)
    c_addr, d_addr = ("127.0.0.4", 1), ("127.0.0.5", 2)
    bind(w.srv, c, ep2, c_addr, 1.0)
    bind(w.srv, d, ep2, d_addr, 1.0)

    flood = [w.srv.forward(data(ep, b"flood"), A_ADDR, 2.0) for _ in range(20)]
    assert flood.count(B_ADDR) == 5 and flood.count(None) == 15
    assert w.srv.drops[Drop.RATE_LIMITED] == 15
    # Another client's session is not affected, nor is the peer of the flooding client.
    assert [w.srv.forward(data(ep2, b"ok"), c_addr, 2.0) for _ in range(5)] == [d_addr] * 5
    assert w.srv.forward(data(ep, b"reply"), B_ADDR, 2.0) == A_ADDR
    # Tokens come back with time: 0.5 s at 10 pkt/s is 5 packets.
    later = [w.srv.forward(data(ep, b"x"), A_ADDR, 2.5) for _ in range(6)]
    assert later.count(B_ADDR) == 5


def test_byte_rate_limit() -> None:
    limits = RelayLimits(bytes_per_second=1000.0, byte_burst=1000.0)
    w, ep = bound_pair(limits)
    big = data(ep, b"\x00" * 592)  # 600 bytes with the header
    assert w.srv.forward(big, A_ADDR, 2.0) == B_ADDR
    assert w.srv.forward(big, A_ADDR, 2.0) is None
    assert w.srv.drops[Drop.RATE_LIMITED] == 1


def test_forward_run_takes_one_decision_for_a_run_and_limits_a_prefix() -> None:
    """A GRO run: one call for ``count`` same-header packets. Within the limits the whole run
    goes; over them only the prefix the tokens allow, the rest counted as rate-limited."""
    limits = RelayLimits(packets_per_second=10.0, packet_burst=8.0, bytes_per_second=1e9,
                         byte_burst=1e9)
    w, ep = bound_pair(limits)
    pkt = data(ep, b"\x04" + b"r" * 100)
    assert w.srv.forward_run(pkt, A_ADDR, 2.0, 5, 5 * len(pkt)) == (B_ADDR, 5)
    assert w.srv.forward_run(pkt, A_ADDR, 2.0, 5, 5 * len(pkt)) == (B_ADDR, 3)  # 3 tokens left
    assert w.srv.drops[Drop.RATE_LIMITED] == 2
    assert w.srv.forward_run(pkt, A_ADDR, 2.0, 4, 4 * len(pkt)) == (None, 0)
    assert w.srv.drops[Drop.RATE_LIMITED] == 6
    st = w.srv.session_stats(ep.session_id)
    assert st is not None and st.packets[0] == 8 and st.bytes[0] == 8 * len(pkt)
    # the byte limit cuts a run too (each packet charged at the run's first, largest size)
    w2, ep2 = bound_pair(RelayLimits(bytes_per_second=1000.0, byte_burst=1000.0))
    big = data(ep2, b"\x00" * 292)  # 300 bytes with the header
    assert w2.srv.forward_run(big, A_ADDR, 2.0, 4, 4 * 300) == (B_ADDR, 3)
    # a run that is not routable is dropped whole and counted per packet
    assert w2.srv.forward_run(big, ("127.0.0.9", 9), 2.0, 7, 7 * 300) == (None, 0)
    assert w2.srv.drops[Drop.UNBOUND_SOURCE] == 7


def test_reallocation_returns_the_same_session() -> None:
    w = make()
    ep1 = allocate(w.srv, w.a, w.b, 0.0)
    ep2 = allocate(w.srv, w.b, w.a, 3.0)  # unordered pair: the other side asking
    assert (ep2.session_id, ep2.allocation_id) == (ep1.session_id, ep1.allocation_id)
    assert len(w.srv) == 1
    ep3 = allocate(w.srv, w.a, PrivateKey.generate(), 4.0)
    assert ep3.session_id != ep1.session_id
    assert ep3.allocation_id > ep1.allocation_id
    # Re-allocation refreshed the bind window: alive at 31 s after the first allocation.
    assert w.srv.expire(31.0) == 0


def test_allocation_refusals_are_counted() -> None:
    limits = RelayLimits(max_sessions=2, max_sessions_per_client=1)
    w = make(limits)
    a, b = w.a.disco_public(), w.b.disco_public()
    assert w.srv.handle_allocate(a, b, 1, 0.0, allowed=False) is None
    assert w.srv.handle_allocate(a, a, 1, 0.0, allowed=True) is None
    assert w.srv.handle_allocate(a, b, 1, 0.0, allowed=True) is not None
    assert w.srv.handle_allocate(a, DiscoKey(b"c" * 32), 1, 0.0, allowed=True) is None
    assert w.srv.handle_allocate(DiscoKey(b"c" * 32), DiscoKey(b"d" * 32), 1, 0.0, True)
    assert w.srv.handle_allocate(DiscoKey(b"e" * 32), DiscoKey(b"f" * 32), 1, 0.0, True) is None
    assert w.srv.drops == {
        Drop.NOT_ALLOWED: 1,
        Drop.BAD_ALLOCATE: 1,
        Drop.CLIENT_SESSION_CAP: 1,
        Drop.SESSION_CAP: 1,
    }


def test_nat_rebinding_with_new_generation() -> None:
    w, ep = bound_pair()
    new_a: Addr = ("127.0.0.2", 50000)
    bind(w.srv, w.a, ep, new_a, 10.0, gen=2)
    assert w.srv.forward(data(ep, b"x"), A_ADDR, 11.0) is None
    assert w.srv.forward(data(ep, b"x"), new_a, 11.0) == B_ADDR
    assert w.srv.forward(data(ep, b"y"), B_ADDR, 11.0) == new_a
    # A delayed answer of the old generation cannot move the binding back.
    client = relay.BindClient(w.a, ep, 1)
    answer = challenge(w.srv, client, A_ADDR, 12.0)
    assert w.srv.handle_datagram(answer, A_ADDR, 12.0) == []
    assert w.srv.drops[Drop.STALE_GENERATION] == 1
    assert w.srv.forward(data(ep, b"y"), B_ADDR, 12.0) == new_a


def test_sealed_allocate_over_derp_path() -> None:
    w = make()
    req = disco.AllocateRequest(w.a.disco_public(), w.b.disco_public(), 42)
    pkt = disco.seal(req, w.a, w.relay_key.disco_public())
    seen: list[tuple[DiscoKey, DiscoKey]] = []

    def allow(x: DiscoKey, y: DiscoKey) -> bool:
        seen.append((x, y))
        return True

    out = w.srv.handle_allocate_packet(pkt, 0.0, allow)
    assert out is not None
    to, sealed = out
    assert to == w.a.disco_public()
    assert seen == [(w.a.disco_public(), w.b.disco_public())]
    sender, resp = disco.open_sealed(sealed, w.a)
    assert sender == w.relay_key.disco_public()
    assert isinstance(resp, disco.AllocateResponse) and resp.generation == 42
    assert resp.endpoint.bind_lifetime_ms == 30_000 and resp.endpoint.idle_lifetime_ms == 300_000
    # A request naming two other clients is refused.
    stranger = PrivateKey.generate()
    pkt2 = disco.seal(req, stranger, w.relay_key.disco_public())
    assert w.srv.handle_allocate_packet(pkt2, 0.0, allow) is None
    assert w.srv.drops[Drop.NOT_PARTY] == 1


def test_bind_client_rejects_challenge_not_from_relay() -> None:
    w = make()
    ep = allocate(w.srv, w.a, w.b, 0.0)
    client = relay.BindClient(w.a, ep, 1)
    hdr = relay.encode_header(ep.session_id, relay.PROTO_DISCO, control=True)
    fake = disco.Challenge(ep.session_id, 1, b"\x01" * 32)
    impostor = PrivateKey.generate()
    with pytest.raises(relay.BindError):
        client.handle_packet(hdr + disco.seal(fake, impostor, w.a.disco_public()))
    with pytest.raises(relay.BindError):
        client.handle_packet(b"\x00" * 5)


def _valid_packets(w: World, ep: disco.RelayEndpoint) -> list[bytes]:
    client = relay.BindClient(w.a, ep, 3)
    out = w.srv.handle_datagram(client.bind_packet(), A_ADDR, 1.0)
    return [client.bind_packet(), client.handle_packet(out[0][0]), data(ep, b"payload")]


def _assert_answered_or_counted(w: World, pkt: bytes, source: Addr) -> None:
    before = sum(w.srv.drops.values())
    out = w.srv.handle_datagram(pkt, source, 5.0)
    assert out or sum(w.srv.drops.values()) == before + 1


def test_fuzz_relay_random_datagrams_never_raise_and_are_counted() -> None:
    w, ep = bound_pair()
    rnd = random.Random(1234)
    for _ in range(FUZZ):
        n = rnd.choice([0, 3, 8, 40, 62, 120, 200])
        pkt = rnd.randbytes(n)
        if n >= 8 and rnd.random() < 0.5:  # plausible header, random rest
            pkt = (
                relay.encode_header(ep.session_id, relay.PROTO_DISCO, control=rnd.random() < 0.7)
                + pkt[8:]
            )
        _assert_answered_or_counted(w, pkt, (f"127.0.0.{rnd.randint(1, 9)}", rnd.randint(1, 9)))


def test_fuzz_relay_mutated_datagrams_never_raise_and_are_counted() -> None:
    w = make()
    ep = allocate(w.srv, w.a, w.b, 0.0)
    valid = _valid_packets(w, ep)
    rnd = random.Random(99)
    for _ in range(FUZZ):
        pkt = bytearray(rnd.choice(valid))
        for _ in range(rnd.randint(1, 3)):
            op = rnd.choice(["flip", "cut", "add"])
            if op == "flip" and pkt:
                pkt[rnd.randrange(len(pkt))] ^= rnd.randint(1, 255)
            elif op == "cut" and pkt:
                del pkt[rnd.randrange(len(pkt)) :]
            else:
                pkt += rnd.randbytes(rnd.randint(1, 8))
        _assert_answered_or_counted(w, bytes(pkt), A_ADDR)
    assert w.srv.session_stats(ep.session_id).addrs == (None, None)  # type: ignore[union-attr]


def test_fuzz_relay_allocate_packets_never_raise() -> None:
    w = make()
    req = disco.AllocateRequest(w.a.disco_public(), w.b.disco_public(), 1)
    valid = disco.seal(req, w.a, w.relay_key.disco_public())
    rnd = random.Random(7)
    for i in range(FUZZ):
        pkt = bytearray(valid if i % 2 else rnd.randbytes(rnd.randint(0, 150)))
        if pkt:
            pkt[rnd.randrange(len(pkt))] ^= rnd.randint(1, 255)
        before = sum(w.srv.drops.values())
        assert w.srv.handle_allocate_packet(bytes(pkt), 0.0, lambda x, y: True) is None
        assert sum(w.srv.drops.values()) == before + 1


def test_forward_leaves_control_packets_to_handle_datagram_uncounted() -> None:
    w = make()
    ep = allocate(w.srv, w.a, w.b, 0.0)
    bind_pkt = relay.BindClient(w.a, ep, 1).bind_packet()
    assert relay.is_control(bind_pkt)
    assert w.srv.forward(bind_pkt, A_ADDR, 1.0) is None
    assert w.srv.drops == {}
    assert len(w.srv.handle_datagram(bind_pkt, A_ADDR, 1.0)) == 1


def test_control_packet_for_unknown_session_is_dropped() -> None:
    w = make()
    ep = allocate(w.srv, w.a, w.b, 0.0)
    pkt = bytearray(relay.BindClient(w.a, ep, 1).bind_packet())
    pkt[4:7] = ((ep.session_id + 1) & 0xFFFFFF).to_bytes(3, "big")
    assert w.srv.handle_datagram(bytes(pkt), A_ADDR, 1.0) == []
    assert w.srv.drops == {Drop.UNKNOWN_SESSION: 1}


def test_wireguard_protocol_in_a_control_packet_is_dropped() -> None:
    w = make()
    ep = allocate(w.srv, w.a, w.b, 0.0)
    pkt = relay.encode_header(ep.session_id, relay.PROTO_WIREGUARD, control=True) + b"\x01" * 40
    assert w.srv.handle_datagram(pkt, A_ADDR, 1.0) == []
    assert w.srv.drops == {Drop.BAD_PROTOCOL: 1}


def test_sessions_by_state_counts_each_state() -> None:
    w = make()
    allocate(w.srv, w.a, w.b, 0.0)
    c, d = PrivateKey.generate(), PrivateKey.generate()
    ep2 = allocate(w.srv, c, d, 0.0)
    bind(w.srv, c, ep2, ("127.0.0.4", 1), 1.0)
    e, g = PrivateKey.generate(), PrivateKey.generate()
    ep3 = allocate(w.srv, e, g, 0.0)
    bind(w.srv, e, ep3, ("127.0.0.6", 1), 1.0)
    bind(w.srv, g, ep3, ("127.0.0.7", 1), 1.0)
    assert w.srv.metrics().sessions_by_state == {"allocated": 1, "half_bound": 1, "bound": 1}


def test_bad_configuration_is_refused_at_construction() -> None:
    key = PrivateKey.generate()
    with pytest.raises(ValueError):
        RelayServer(key, 0.0, limits=RelayLimits(idle_lifetime=0.0))
    with pytest.raises(ValueError):
        RelayServer(key, 0.0, candidates=[(IPv4Address("127.0.0.1"), 70000)])
    too_many = [(IPv4Address("127.0.0.1"), p) for p in range(disco.MAX_ENDPOINTS + 1)]
    with pytest.raises(ValueError):
        RelayServer(key, 0.0, candidates=too_many)


def test_disco_ping_and_pong_through_the_relay() -> None:
    """Clients measure the relay path with disco pings: protocol disco, control bit clear."""
    w, ep = bound_pair()
    hdr = relay.encode_header(ep.session_id, relay.PROTO_DISCO)
    ping = disco.Ping(b"\x07" * 12, w.a.node_public())
    out = w.srv.handle_datagram(hdr + disco.seal(ping, w.a, w.b.disco_public()), A_ADDR, 2.0)
    assert len(out) == 1 and out[0][1] == B_ADDR
    got = relay.decode_header(out[0][0])
    assert (got.protocol, got.control) == (relay.PROTO_DISCO, False)
    sender, msg = disco.open_sealed(out[0][0][relay.HEADER_LEN :], w.b)
    assert sender == w.a.disco_public() and msg == ping
    pong = disco.Pong(ping.tx_id, (IPv4Address(A_ADDR[0]), A_ADDR[1]))
    back = w.srv.handle_datagram(hdr + disco.seal(pong, w.b, w.a.disco_public()), B_ADDR, 2.1)
    assert [addr for _, addr in back] == [A_ADDR]
    assert disco.open_sealed(back[0][0][relay.HEADER_LEN :], w.a)[1] == pong


def test_expire_sweeps_idle_bound_sessions() -> None:
    w, _ = bound_pair()  # bound at t=1, then silence
    assert w.srv.expire(301.0) == 0
    assert w.srv.expire(301.5) == 1
    assert w.srv.metrics().sessions_by_state == {"allocated": 0, "half_bound": 0, "bound": 0}


def test_rate_limit_is_per_client_across_its_sessions() -> None:
    limits = RelayLimits(packets_per_second=1.0, packet_burst=3.0)
    w, ep = bound_pair(limits)
    c = PrivateKey.generate()
    ep2 = allocate(w.srv, w.a, c, 0.0)
    a2: Addr = ("127.0.0.2", 40009)
    bind(w.srv, w.a, ep2, a2, 1.0)
    bind(w.srv, c, ep2, ("127.0.0.8", 1), 1.0)
    sent = [w.srv.forward(data(ep, b"x"), A_ADDR, 2.0) for _ in range(2)]
    sent += [w.srv.forward(data(ep2, b"x"), a2, 2.0) for _ in range(2)]
    assert sent.count(None) == 1  # A's burst of 3 covers both of its sessions together


def test_credit_keeps_a_kernel_forwarded_session_alive() -> None:
    """Traffic the kernel fast path forwarded counts as activity: the session does not idle out."""
    limits = RelayLimits(idle_lifetime=10.0)
    w, ep = bound_pair(limits)
    other, _ = bound_pair(limits)
    sid = ep.session_id
    assert not w.srv.credit(sid + 1000, 0, 1, 100, 5.0)  # unknown session
    for t in (5.0, 10.0, 15.0):  # both sides forwarded in the kernel, unseen by the core
        assert w.srv.credit(sid, 0, 3, 300, t)
        assert w.srv.credit(sid, 1, 2, 200, t)
    stats = w.srv.session_stats(sid)
    assert stats is not None and stats.packets == (9, 6) and stats.bytes == (900, 600)
    assert w.srv.expire(16.0) == 0  # credited: alive past the idle lifetime from the bind at 1.0
    assert w.srv.forward(data(ep, b"x"), A_ADDR, 16.0) == B_ADDR
    assert other.srv.expire(16.0) == 1  # the same session without credit idles out


# ---- load -------------------------------------------------------------------------------------

def test_load_is_zero_when_idle_and_follows_the_forwarding_rate() -> None:
    w, ep = bound_pair(RelayLimits(capacity_pps=1000.0))
    srv = w.srv
    srv.sample_load(1.0)
    assert srv.load() == pytest.approx(1 / 10_000)  # one session of max_sessions, no traffic
    now = 1.0
    for _ in range(60):  # 60 s at 500 pkt/s: the average converges on 500 (tau 10 s)
        for i in range(500):
            assert srv.forward(data(ep, b"x"), A_ADDR, now + i / 1000) == B_ADDR
        now += 1.0
        srv.sample_load(now)
    assert srv.forwarding_rate == pytest.approx(500.0, rel=0.01)
    assert srv.load() == pytest.approx(0.5, rel=0.01)
    assert srv.load(capacity_pps=5000.0) == pytest.approx(0.1, rel=0.01)
    for _ in range(60):  # silence: the average decays towards 0
        now += 1.0
        srv.sample_load(now)
    assert srv.load() < 0.01


def test_load_counts_kernel_forwarded_packets_and_saturates_at_one() -> None:
    w, ep = bound_pair(RelayLimits(capacity_pps=100.0))
    srv = w.srv
    srv.sample_load(1.0)
    for t in range(2, 62):
        assert srv.credit(ep.session_id, 0, 1000, 100_000, float(t))  # 1000 pkt/s in the kernel
        srv.sample_load(float(t))
    assert srv.forwarding_rate == pytest.approx(1000.0, rel=0.01)
    assert srv.load() == 1.0


def test_load_follows_session_occupancy() -> None:
    w = make(RelayLimits(max_sessions=4))
    keys = [PrivateKey.generate() for _ in range(6)]
    allocate(w.srv, keys[0], keys[1], 0.0)
    assert w.srv.load() == 0.25
    allocate(w.srv, keys[2], keys[3], 0.0)
    allocate(w.srv, keys[4], keys[5], 0.0)
    assert w.srv.load() == 0.75


def test_load_sample_gaps_weigh_as_their_length() -> None:
    """One sample after a 10 s gap weighs like ten 1 s samples (irregular timer ticks)."""
    w1, ep1 = bound_pair(RelayLimits(capacity_pps=1000.0))
    w2, ep2 = bound_pair(RelayLimits(capacity_pps=1000.0))
    for srv in (w1.srv, w2.srv):
        srv.sample_load(1.0)
    for t in range(2, 12):
        w1.srv.credit(ep1.session_id, 0, 300, 0, float(t))
        w1.srv.sample_load(float(t))
    w2.srv.credit(ep2.session_id, 0, 3000, 0, 11.0)
    w2.srv.sample_load(11.0)
    assert w1.srv.forwarding_rate == pytest.approx(w2.srv.forwarding_rate, rel=1e-9)
    assert w1.srv.forwarding_rate == pytest.approx(300 * (1 - 2.718281828459045 ** -1), rel=1e-6)


def test_allocate_response_carries_the_load_in_permille() -> None:
    w, ep = bound_pair(RelayLimits(max_sessions=4, capacity_pps=100.0))
    a, b = w.a.disco_public(), w.b.disco_public()
    resp = w.srv.handle_allocate(a, b, 1, 1.0, True)
    assert resp is not None and resp.load_permille == 250  # 1 of 4 sessions, no traffic yet
    w.srv.sample_load(1.0)
    for t in range(2, 62):  # 90 pkt/s for a minute: the rate beats occupancy
        assert w.srv.credit(ep.session_id, 0, 90, 9000, float(t))
        w.srv.sample_load(float(t))
    resp = w.srv.handle_allocate(a, b, 2, 62.0, True)
    assert resp is not None and 890 <= resp.load_permille <= 900
    w.srv.load_capacity_pps = 1000.0  # the shell's capacity (kernel path on) is what clients see
    resp = w.srv.handle_allocate(a, b, 3, 62.0, True)
    assert resp is not None and resp.load_permille == 250
