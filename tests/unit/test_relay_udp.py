"""The relay's UDP shell over loopback: bind handshake, forwarding, drops, malformed input."""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address
from typing import Any

import pytest

from relaymesh import disco, relay
from relaymesh.keys import PrivateKey
from relaymesh.relay import RelayLimits, RelayServer, native
from relaymesh.relay.udp import Counters, RelayUDP
from relaymesh.wireguard.datapath import SOL_UDP, UDP_SEGMENT

TIMEOUT = 2.0
SO_RCVBUFFORCE = 33  # <asm/socket.h>


class Client:
    """A client socket on loopback that binds with BindClient and sends relay-framed packets."""

    def __init__(self, key: PrivateKey, relay_port: int) -> None:
        self.key = key
        self.relay = ("127.0.0.1", relay_port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:  # root may exceed rmem_max: a burst must not overflow the receiver
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 4 << 20)
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(TIMEOUT)

    @property
    def addr(self) -> tuple[str, int]:
        name = self.sock.getsockname()
        return (name[0], name[1])

    def bind(self, ep: disco.RelayEndpoint, gen: int = 1, answer_from: Client | None = None,
             tamper: bool = False) -> None:
        bc = relay.BindClient(self.key, ep, gen)
        self.sock.sendto(bc.bind_packet(), self.relay)
        challenge, _ = self.sock.recvfrom(2048)
        answer = bc.handle_packet(challenge)
        if tamper:  # a well-sealed answer whose MAC is not the one the relay issued
            _, msg = disco.open_sealed(memoryview(challenge)[relay.HEADER_LEN:], self.key)
            assert isinstance(msg, disco.Challenge)
            bad = bytes([msg.mac[0] ^ 1]) + msg.mac[1:]
            forged = disco.Answer(ep.session_id, gen, bc.other, bad)
            answer = answer[: relay.HEADER_LEN] + disco.seal(forged, self.key, ep.server_disco)
        (answer_from or self).sock.sendto(answer, self.relay)

    def recv(self, timeout: float = TIMEOUT) -> bytes | None:
        self.sock.settimeout(timeout)
        try:
            return bytes(self.sock.recv(65535))
        except TimeoutError:
            return None


def wait_for(cond: Callable[[], bool], timeout: float = TIMEOUT) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def native_or_skip() -> None:
    try:
        native.load()
    except OSError as e:
        pytest.skip(f"native relay loop unavailable here: {e}")


class World:
    def __init__(self, offload: bool, limits: RelayLimits | None = None,
                 native: bool = False) -> None:
        if native:
            native_or_skip()
        self.relay_key = PrivateKey.generate()
        self.server = RelayServer(self.relay_key, time.monotonic(), limits=limits)
        self.shell = RelayUDP(self.server, 0, host="127.0.0.1", offload=offload, native=native)
        self.server.candidates = [(IPv4Address("127.0.0.1"), self.shell.port)]
        self.shell.start()
        assert self.shell.native == native
        self.a = Client(PrivateKey.generate(), self.shell.port)
        self.b = Client(PrivateKey.generate(), self.shell.port)
        self.clients = [self.a, self.b]

    def allocate(self) -> disco.RelayEndpoint:
        with self.shell.lock:
            resp = self.server.handle_allocate(self.a.key.disco_public(),
                                               self.b.key.disco_public(), 1,
                                               time.monotonic(), allowed=True)
        assert resp is not None
        return resp.endpoint

    def bound(self) -> disco.RelayEndpoint:
        ep = self.allocate()
        self.a.bind(ep)
        self.b.bind(ep)
        assert wait_for(lambda: self.state(ep) is relay.State.BOUND)
        return ep

    def state(self, ep: disco.RelayEndpoint) -> relay.State | None:
        with self.shell.lock:
            st = self.server.session_stats(ep.session_id)
        return None if st is None else st.state

    def drops(self) -> dict[str, int]:
        self.shell.refresh()  # the native loop's counters reach the core now
        with self.shell.lock:
            return dict(self.server.drops)

    def counters(self) -> Counters:
        self.shell.refresh()
        return self.shell.counters

    def session(self, ep: disco.RelayEndpoint) -> relay.SessionStats:
        self.shell.refresh()
        with self.shell.lock:
            st = self.server.session_stats(ep.session_id)
        assert st is not None
        return st

    def close(self) -> None:
        self.shell.stop()
        for c in self.clients:
            c.sock.close()


@pytest.fixture(params=[(True, False), (False, False), (True, True)],
                ids=["offload", "no-offload", "native"])
def world(request: pytest.FixtureRequest) -> Iterator[World]:
    w = World(offload=request.param[0], native=request.param[1])
    yield w
    w.close()


def data(ep: disco.RelayEndpoint, payload: bytes) -> bytes:
    return relay.encode_header(ep.session_id, relay.PROTO_WIREGUARD) + payload


def test_port_zero_reports_the_bound_port(world: World) -> None:
    assert world.shell.port != 0
    assert world.shell.sock.getsockname()[1] == world.shell.port


def test_bound_pair_forwards_unmodified_both_ways(world: World) -> None:
    ep = world.bound()
    a_to_b = data(ep, b"\x04" + bytes(range(256)) * 5)
    world.a.sock.sendto(a_to_b, world.a.relay)
    assert world.b.recv() == a_to_b
    b_to_a = data(ep, b"pong")
    world.b.sock.sendto(b_to_a, world.b.relay)
    assert world.a.recv() == b_to_a
    assert wait_for(lambda: world.counters().forwarded_packets == 2
                    and world.counters().forwarded_bytes == len(a_to_b) + len(b_to_a))


def test_burst_is_forwarded_in_order_and_counted(world: World) -> None:
    ep = world.bound()
    pkts = [data(ep, i.to_bytes(4, "big") + bytes(1392)) for i in range(100)]
    for p in pkts:
        world.a.sock.sendto(p, world.a.relay)
    got = []
    while (p2 := world.b.recv(1.0)) is not None:
        got.append(p2)
        if len(got) == len(pkts):
            break
    assert got == pkts  # loopback, one flow: nothing lost, order kept
    st = world.session(ep)  # natively forwarded packets are credited to the core's session
    assert st.packets[0 if st.clients[0] == world.a.key.disco_public() else 1] == 100


def gso_send(sock: socket.socket, datagrams: list[bytes], dest: tuple[str, int]) -> None:
    """One sendmsg with UDP_SEGMENT: the kernel cuts it into ``datagrams`` (all one size but the
    last), as a node's datapath sends a burst; a UDP_GRO receiver gets it back as one buffer."""
    size = len(datagrams[0])
    seg = [(SOL_UDP, UDP_SEGMENT, size.to_bytes(2, sys.byteorder))]
    sock.sendmsg([b"".join(datagrams)], seg, 0, dest)


@pytest.mark.parametrize("native_loop", [False, True], ids=["python", "native"])
def test_gso_burst_is_forwarded_as_one_run_unmodified_and_in_order(native_loop: bool) -> None:
    w = World(offload=True, native=native_loop)
    try:
        if not w.shell.offloads["gro"]:
            pytest.skip("no UDP GRO on this kernel's loopback")
        ep = w.bound()
        burst = [data(ep, b"\x04" + i.to_bytes(2, "big") * 300) for i in range(20)]
        burst.append(data(ep, b"\x04short"))  # a shorter last segment ends the run
        gso_send(w.a.sock, burst, w.a.relay)
        assert [w.b.recv() for _ in burst] == burst
        assert wait_for(lambda: w.counters().forwarded_packets == len(burst))
        st = w.counters()
        assert st.forwarded_bytes == sum(map(len, burst))
        assert st.forwarded_runs >= 1  # one decision for the GRO run, not one per datagram
    finally:
        w.close()


@pytest.mark.parametrize("native_loop", [False, True], ids=["python", "native"])
def test_gro_run_with_a_foreign_header_is_routed_per_segment(native_loop: bool) -> None:
    """Segments of one GRO buffer that carry another (unbound) session id are dropped and counted
    one by one; the bound session's segments around them still go through, in order. (The
    native loop forwards the good runs itself and hands the foreign segments to the core.)"""
    w = World(offload=True, native=native_loop)
    try:
        if not w.shell.offloads["gro"]:
            pytest.skip("no UDP GRO on this kernel's loopback")
        ep = w.bound()
        other = ep.session_id ^ 1  # a neighbouring id no session holds
        good = [data(ep, b"\x04" + bytes([i]) * 600) for i in range(6)]
        bad = relay.encode_header(other, relay.PROTO_WIREGUARD) + b"\x04" + b"x" * 600
        burst = [*good[:2], bad, bad, *good[2:5], bad, *good[5:]]
        gso_send(w.a.sock, burst, w.a.relay)
        assert [w.b.recv() for _ in good] == good
        assert w.b.recv(timeout=0.2) is None
        assert wait_for(lambda: w.drops().get("unknown_session", 0) == 3)
        assert w.counters().forwarded_packets == len(good)
    finally:
        w.close()


def test_uniform_run_needs_every_segment_header_equal() -> None:
    """The one-unpack run check takes a GRO buffer as a whole run only when every segment starts
    with the first one's data header; anything else (a foreign header anywhere, the short last
    segment included; control; more segments than one send may carry) goes to the per-segment
    compare (returns 0)."""
    hdr = relay.encode_header(7, relay.PROTO_WIREGUARD)
    seg, n = 100, 5

    def buf(headers: list[bytes], tail: int = seg) -> tuple[memoryview, int]:
        b = b"".join(h + b"p" * (seg - len(h)) for h in headers[:-1])
        b += (headers[-1] + b"t" * seg)[:tail]
        return memoryview(b), len(b)

    check = RelayUDP._uniform_run
    assert check(*buf([hdr] * n), seg, 64) == n
    assert check(*buf([hdr] * n, tail=9), seg, 64) == n  # a short last datagram ends a run
    foreign = relay.encode_header(8, relay.PROTO_WIREGUARD)
    for k in range(1, n):  # the differing header in the middle or in the (short) last one
        assert check(*buf([hdr] * k + [foreign] + [hdr] * (n - k - 1)), seg, 64) == 0
        assert check(*buf([hdr] * k + [foreign] + [hdr] * (n - k - 1), tail=9), seg, 64) == 0
    assert check(*buf([hdr] * n, tail=5), seg, 64) == 0  # last one shorter than a header
    assert check(*buf([hdr] * n), seg, n - 1) == 0  # over one send's segment limit
    ctl = relay.encode_header(7, relay.PROTO_WIREGUARD, control=True)
    assert check(*buf([ctl] * n), seg, 64) == 0
    assert check(*buf([hdr]), seg, 64) == 0  # a single datagram is not a run


def test_send_keeps_datagram_boundaries_between_runs_and_short_tails() -> None:
    """What one drain hands to the send step: the short tail of one GRO receive (a single
    datagram whose receive had a larger segment size) followed by full-size single datagrams and
    a contiguous run to the same place. Every datagram must arrive with its own length: a short
    one may only end a GSO send, never start one whose segment size is larger."""
    w = World(offload=True)
    try:
        if not w.shell.offloads["gso"]:
            pytest.skip("no UDP GSO on this kernel's loopback")
        dest = w.b.addr
        short, full = b"s" * 500, [bytes([i]) * 1200 for i in range(5)]
        out: list[tuple[memoryview | bytes, Any, int]] = [
            (memoryview(short), dest, 1200),  # a GRO tail: its receive's segment size was 1200
            (memoryview(full[0]), dest, 1200),
            (memoryview(full[1]), dest, 1200),
            (memoryview(b"".join(full[2:])), dest, 1200),  # a contiguous run of three
        ]
        w.shell._send(out)
        assert [w.b.recv() for _ in range(6)] == [short, *full]
        assert w.shell.counters.forwarded_packets == 6
    finally:
        w.close()


def test_no_forwarding_before_both_sides_are_bound(world: World) -> None:
    ep = world.allocate()
    world.a.bind(ep)
    assert wait_for(lambda: world.state(ep) is relay.State.HALF_BOUND)
    world.a.sock.sendto(data(ep, b"early"), world.a.relay)
    assert wait_for(lambda: world.drops().get("not_bound", 0) == 1)
    assert world.b.recv(0.2) is None


def test_wrong_mac_does_not_bind(world: World) -> None:
    ep = world.allocate()
    world.a.bind(ep, tamper=True)
    assert wait_for(lambda: world.drops().get("bad_mac", 0) == 1)
    assert world.state(ep) is relay.State.ALLOCATED


def test_answer_from_another_source_is_refused(world: World) -> None:
    ep = world.allocate()
    other = Client(world.a.key, world.shell.port)
    world.clients.append(other)
    world.a.bind(ep, answer_from=other)  # the MAC covers the source the challenge went to
    assert wait_for(lambda: world.drops().get("bad_mac", 0) == 1)
    assert world.state(ep) is relay.State.ALLOCATED


def test_data_from_an_unbound_address_is_dropped(world: World) -> None:
    ep = world.bound()
    intruder = Client(PrivateKey.generate(), world.shell.port)
    world.clients.append(intruder)
    intruder.sock.sendto(data(ep, b"spoof"), intruder.relay)
    assert wait_for(lambda: world.drops().get("unbound_source", 0) == 1)
    assert world.a.recv(0.2) is None and world.b.recv(0.05) is None


def test_malformed_input_is_counted_and_the_loop_survives(world: World) -> None:
    ep = world.bound()
    junk = [b"", b"x", b"\x00" * 7, b"\x00\x80\x52\x44\x00\x00\x01\x00", b"\xff" * 100,
            relay.encode_header(ep.session_id, relay.PROTO_DISCO, control=True) + b"garbage",
            data(ep, b"")[:4]]
    before = world.shell.counters.rx_packets
    for j in junk:
        world.a.sock.sendto(j, world.a.relay)
    # the empty datagram is counted as a drop, not as a received packet
    assert wait_for(lambda: world.shell.counters.rx_packets == before + len(junk) - 1
                    and world.shell.counters.drops.get("empty", 0) == 1)
    assert world.shell.running
    drops = world.drops()
    assert drops.get("short", 0) >= 3  # 1, 7 and 4 bytes
    assert drops.get("unknown_session", 0) + drops.get("bad_disco", 0) >= 2
    assert world.shell.counters.drops.get("empty", 0) == 1
    # still forwarding afterwards
    world.a.sock.sendto(data(ep, b"after"), world.a.relay)
    assert world.b.recv() == data(ep, b"after")


def test_rebind_from_a_new_port_moves_the_binding(world: World) -> None:
    ep = world.bound()
    moved = Client(world.a.key, world.shell.port)
    world.clients.append(moved)
    moved.bind(ep, gen=2)
    assert wait_for(lambda: world.a.addr not in _addrs(world, ep) and moved.addr in
                    _addrs(world, ep))
    world.b.sock.sendto(data(ep, b"to-new"), world.b.relay)
    assert moved.recv() == data(ep, b"to-new")
    world.a.sock.sendto(data(ep, b"old"), world.a.relay)
    assert wait_for(lambda: world.drops().get("unbound_source", 0) == 1)


def _addrs(world: World, ep: disco.RelayEndpoint) -> tuple[object, ...]:
    with world.shell.lock:
        st = world.server.session_stats(ep.session_id)
    return () if st is None else st.addrs


@pytest.mark.parametrize("native_loop", [False, True], ids=["python", "native"])
def test_expire_runs_on_the_timer_without_traffic(native_loop: bool) -> None:
    w = World(offload=True, limits=RelayLimits(bind_lifetime=0.2), native=native_loop)
    w.shell.expire_interval = 0.05
    try:
        ep = w.allocate()
        assert w.state(ep) is relay.State.ALLOCATED
        assert wait_for(lambda: w.state(ep) is None, timeout=3.0)
    finally:
        w.close()


@pytest.mark.parametrize("native_loop", [False, True], ids=["python", "native"])
def test_dual_stack_socket_unmaps_ipv4_sources(native_loop: bool) -> None:
    if native_loop:
        native_or_skip()
    relay_key = PrivateKey.generate()
    server = RelayServer(relay_key, time.monotonic())
    shell = RelayUDP(server, 0, native=native_loop)  # default: dual-stack "::" where IPv6 is
    server.candidates = [(IPv4Address("127.0.0.1"), shell.port)]
    shell.start()
    a = Client(PrivateKey.generate(), shell.port)
    b = Client(PrivateKey.generate(), shell.port)
    try:
        with shell.lock:
            resp = server.handle_allocate(a.key.disco_public(), b.key.disco_public(), 1,
                                          time.monotonic(), allowed=True)
        assert resp is not None
        a.bind(resp.endpoint)
        b.bind(resp.endpoint)

        def addrs() -> tuple[object, ...]:
            with shell.lock:
                st = server.session_stats(resp.endpoint.session_id)
            return () if st is None else st.addrs

        assert wait_for(lambda: set(addrs()) == {a.addr, b.addr})  # plain dotted IPv4
        a.sock.sendto(data(resp.endpoint, b"v4 over v6 socket"), a.relay)
        assert b.recv() == data(resp.endpoint, b"v4 over v6 socket")
    finally:
        shell.stop()
        a.sock.close()
        b.sock.close()


def test_stop_closes_the_socket_and_thread(world: World) -> None:
    world.shell.stop()
    assert not world.shell.running
    assert world.shell.sock.fileno() == -1


@pytest.mark.parametrize("native_loop", [False, True], ids=["python", "native"])
def test_ipv6_clients_bind_and_forward_on_the_dual_stack_socket(native_loop: bool) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this kernel")
    if native_loop:
        native_or_skip()
    server = RelayServer(PrivateKey.generate(), time.monotonic())
    shell = RelayUDP(server, 0, native=native_loop)
    if shell.sock.family != socket.AF_INET6:
        shell.sock.close()
        pytest.skip("IPv6 socket unavailable: the shell fell back to IPv4")
    server.candidates = [(IPv4Address("127.0.0.1"), shell.port)]
    shell.start()
    keys = [PrivateKey.generate(), PrivateKey.generate()]
    socks = []
    try:
        with shell.lock:
            resp = server.handle_allocate(keys[0].disco_public(), keys[1].disco_public(), 1,
                                          time.monotonic(), allowed=True)
        assert resp is not None
        ep = resp.endpoint
        for key in keys:
            s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            s.bind(("::1", 0))
            s.settimeout(TIMEOUT)
            bc = relay.BindClient(key, ep, 1)
            s.sendto(bc.bind_packet(), ("::1", shell.port))
            s.sendto(bc.handle_packet(s.recv(2048)), ("::1", shell.port))
            socks.append(s)

        def addrs() -> set[object]:
            with shell.lock:
                st = server.session_stats(ep.session_id)
            return set() if st is None else set(st.addrs)

        want = {("::1", s.getsockname()[1]) for s in socks}
        assert wait_for(lambda: addrs() == want)
        pkt = data(ep, b"over IPv6")
        socks[0].sendto(pkt, ("::1", shell.port))
        assert socks[1].recv(2048) == pkt
    finally:
        shell.stop()
        for s in socks:
            s.close()


def test_native_loop_keeps_each_clients_rate_limit() -> None:
    """The native loop charges the core's token buckets, to the letter: a burst over a client's
    packet burst is cut to it, the rest is counted as rate_limited in the core; the other
    client's own bucket is untouched, so its packets still pass."""
    lim = RelayLimits(packets_per_second=1.0, packet_burst=5.0)
    w = World(offload=True, limits=lim, native=True)
    try:
        ep = w.bound()
        burst = [data(ep, i.to_bytes(2, "big") + bytes(500)) for i in range(20)]
        for p in burst:
            w.a.sock.sendto(p, w.a.relay)
        got = []
        while (p2 := w.b.recv(0.3)) is not None:
            got.append(p2)
        assert got == burst[:5]
        assert wait_for(lambda: w.drops().get("rate_limited", 0) == 15)
        w.b.sock.sendto(data(ep, b"b still passes"), w.b.relay)
        assert w.a.recv() == data(ep, b"b still passes")
    finally:
        w.close()


def test_native_loop_follows_a_rebind_and_pause() -> None:
    """The C table follows the core: after a re-bind from a new port the old address's data is
    the core's (dropped as unbound_source) and the new one is forwarded; while paused nothing is
    forwarded (the kernel-path tests rely on it), and after resume forwarding goes on."""
    w = World(offload=True, native=True)
    try:
        ep = w.bound()
        moved = Client(w.a.key, w.shell.port)
        w.clients.append(moved)
        moved.bind(ep, gen=2)
        assert wait_for(lambda: moved.addr in _addrs(w, ep))
        w.a.sock.sendto(data(ep, b"old"), w.a.relay)
        assert wait_for(lambda: w.drops().get("unbound_source", 0) == 1)
        moved.sock.sendto(data(ep, b"new"), moved.relay)
        assert w.b.recv() == data(ep, b"new")
        w.shell.pause()
        time.sleep(0.1)
        moved.sock.sendto(data(ep, b"held"), moved.relay)
        assert w.b.recv(0.3) is None
        w.shell.resume()
        assert w.b.recv() == data(ep, b"held")
    finally:
        w.close()


def test_native_loop_unavailable_falls_back_to_python(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> None:
        raise OSError("no C compiler (cc or gcc) on PATH")

    monkeypatch.setattr(native, "load", broken)
    server = RelayServer(PrivateKey.generate(), time.monotonic())
    shell = RelayUDP(server, 0, host="127.0.0.1", native=True)
    shell.start()
    try:
        assert not shell.native
        assert shell.native_reason is not None and "compiler" in shell.native_reason
        assert shell.running
    finally:
        shell.stop()


def test_native_loop_gathers_single_datagrams_and_keeps_their_boundaries() -> None:
    """Datagrams sent one by one (as wireguard-go sends) that wait in the socket together leave
    the native loop gathered into GSO sends (forwarded_runs), each still arriving whole and in
    order: equal sizes, then a shorter one, which may only end a gathered send."""
    w = World(offload=True, native=True)
    try:
        if not w.shell.offloads["gso"]:
            pytest.skip("no UDP GSO on this kernel's loopback")
        ep = w.bound()
        w.shell.pause()
        time.sleep(0.1)
        sent = [data(ep, bytes([i]) * 700) for i in range(10)]
        sent += [data(ep, b"short"), data(ep, b"x" * 700), data(ep, b"y" * 900)]
        for p in sent:
            w.a.sock.sendto(p, w.a.relay)
        w.shell.resume()
        assert [w.b.recv() for _ in sent] == sent
        assert wait_for(lambda: w.counters().forwarded_packets == len(sent))
        assert w.counters().forwarded_runs >= 1
    finally:
        w.close()


def test_native_forwarding_keeps_a_session_alive_past_the_idle_lifetime() -> None:
    """What the C loop forwards is credited to the core before each expiry, so a session busy
    only through it outlives the idle lifetime; once silent, it expires."""
    w = World(offload=True, limits=RelayLimits(idle_lifetime=0.4), native=True)
    w.shell.expire_interval = 0.05
    try:
        ep = w.bound()
        end = time.monotonic() + 1.2  # three idle lifetimes
        while time.monotonic() < end:
            w.a.sock.sendto(data(ep, b"a"), w.a.relay)
            w.b.sock.sendto(data(ep, b"b"), w.b.relay)
            assert w.b.recv() == data(ep, b"a") and w.a.recv() == data(ep, b"b")
            time.sleep(0.1)
        assert w.state(ep) is relay.State.BOUND
        assert wait_for(lambda: w.state(ep) is None)
    finally:
        w.close()
