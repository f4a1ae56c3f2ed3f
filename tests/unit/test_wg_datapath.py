"""The datapath threads with a fake core over loopback UDP and MemoryTun: no root needed.

The fake core is a "null cipher": outbound packets become ``b"D" + packet`` to a fixed endpoint,
inbound ``b"D"`` datagrams become packets, ``b"X"`` makes it raise (the datapath must count it
and go on), ``b"P"`` makes it answer the sender with ``b"Q"``. That isolates what the datapath
owns: draining, batching, endpoints, timers, counters, and error containment.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import sys
import time
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field

import pytest
from asyncwait import poll_until as wait_for

from relaymesh.keys import PrivateKey
from relaymesh.wireguard.datapath import Datapath, open_udp_socket
from relaymesh.wireguard.device import Device
from relaymesh.wireguard.tun import MemoryTun


@dataclass(slots=True)
class Tx:
    endpoint: Hashable
    data: bytes


@dataclass(slots=True)
class Rx:
    transmits: list[Tx] = field(default_factory=list)
    packets: list[bytes] = field(default_factory=list)


class NullCore:
    def __init__(self, peer: tuple[str, int] | None) -> None:
        self.peer = peer
        self.sources: list[Hashable] = []
        self.deadline: float | None = None
        self.ticks = 0

    def send_packet(self, ip_packet: bytes, now: float) -> list[Tx]:
        return [Tx(self.peer, b"D" + ip_packet)] if self.peer else []

    def receive(self, datagram: memoryview, source: Hashable, now: float) -> Rx:
        self.sources.append(source)
        kind = bytes(datagram[:1])
        if kind == b"X":
            raise ValueError("malformed")
        if kind == b"P":
            return Rx(transmits=[Tx(source, b"Q")])
        return Rx(packets=[bytes(datagram[1:])])

    def tick(self, now: float) -> list[Tx]:
        self.ticks += 1
        self.deadline = None
        return [Tx(self.peer, b"T")] if self.peer else []

    def next_deadline(self) -> float | None:
        return self.deadline


Pair = tuple[Datapath, MemoryTun, Datapath, MemoryTun]


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@pytest.fixture
def pair(threads: int) -> Iterator[Pair]:
    sa, sb = open_udp_socket(0, "127.0.0.1"), open_udp_socket(0, "127.0.0.1")
    pa, pb = sa.getsockname()[1], sb.getsockname()[1]
    ta, tb = MemoryTun("a"), MemoryTun("b")
    da = Datapath(NullCore(("127.0.0.1", pb)), ta, sa, threads=threads)
    db = Datapath(NullCore(("127.0.0.1", pa)), tb, sb, threads=threads)
    da.start()
    db.start()
    try:
        yield da, ta, db, tb
    finally:
        da.stop()
        db.stop()
        for x in (ta, tb, sa, sb):
            x.close()


def test_packets_cross_both_ways_in_order(pair: Pair) -> None:
    da, ta, db, tb = pair
    sent = [bytes([0x45]) + i.to_bytes(4, "big") * 300 for i in range(200)]
    got: list[bytes] = []
    window = 8  # below MemoryTun's queue length, so no packet can be dropped for lack of room
    for i in range(0, len(sent), window):
        for p in sent[i : i + window]:
            ta.inject(p)
        while len(got) < min(i + window, len(sent)):
            q = tb.delivered(timeout=2.0)
            assert q is not None, f"lost after {len(got)} packets"
            got.append(q)
    assert got == sent
    tb.inject(b"\x60back")
    assert ta.delivered(timeout=2.0) == b"\x60back"
    sa, sb = da.stats(), db.stats()
    assert sa["tun_rx_packets"] == 200 and sa["udp_tx_packets"] == 200
    assert sb["udp_rx_packets"] == 200 and sb["tun_tx_packets"] == 200
    assert sb["tun_tx_bytes"] == sum(map(len, sent))
    assert sa["udp_tx_bytes"] == sum(map(len, sent)) + 200  # one "D" byte of framing each


def test_core_exception_is_counted_and_loop_survives(pair: Pair) -> None:
    _, _, db, tb = pair
    port = db.sock.getsockname()[1]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _ in range(5):
            s.sendto(b"Xgarbage", ("127.0.0.1", port))
        s.sendto(b"Dstill-alive", ("127.0.0.1", port))
    assert tb.delivered(timeout=2.0) == b"still-alive"
    assert db.stats()["drop_core_receive_error"] == 5
    assert db.running


def test_reply_goes_to_observed_source_as_plain_ipv4(pair: Pair) -> None:
    _, _, db, _ = pair
    port = db.sock.getsockname()[1]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(2.0)
        s.sendto(b"Pping", ("127.0.0.1", port))
        data, _ = s.recvfrom(100)
        assert data == b"Q"
        core = db.device
        assert isinstance(core, NullCore)
        assert core.sources[-1] == ("127.0.0.1", s.getsockname()[1])


def test_dual_stack_socket_unmaps_ipv4_sources(threads: int) -> None:
    sock = open_udp_socket(0)  # "::" dual-stack when IPv6 is available
    if sock.family != socket.AF_INET6:
        sock.close()
        pytest.skip("IPv6 disabled on this host")
    core = NullCore(None)
    with MemoryTun() as tun:
        dp = Datapath(core, tun, sock, threads=threads)
        dp.start()
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(b"Dx", ("127.0.0.1", sock.getsockname()[1]))
                assert tun.delivered(timeout=2.0) == b"x"
                assert core.sources == [("127.0.0.1", s.getsockname()[1])]
        finally:
            dp.stop()
            sock.close()


def test_timer_runs_tick_when_deadline_passes_and_sends_result(threads: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx, MemoryTun() as tun:
        rx.bind(("127.0.0.1", 0))
        rx.settimeout(2.0)
        core = NullCore(("127.0.0.1", rx.getsockname()[1]))
        sock = open_udp_socket(0, "127.0.0.1")
        dp = Datapath(core, tun, sock, threads=threads)
        dp.start()
        try:
            t0 = time.monotonic()
            dp.call(lambda dev, now: setattr(dev, "deadline", now + 0.2))
            assert rx.recvfrom(10)[0] == b"T"
            assert time.monotonic() - t0 >= 0.2  # not before the deadline
            assert core.ticks == 1
        finally:
            dp.stop()
            sock.close()


def test_send_error_is_counted_not_raised(threads: int) -> None:
    core = NullCore(("127.0.0.1", 0))  # port 0: sendto fails with EINVAL
    sock = open_udp_socket(0, "127.0.0.1")
    with MemoryTun() as tun:
        dp = Datapath(core, tun, sock, threads=threads)
        dp.start()
        try:
            tun.inject(b"\x45abc")
            assert wait_for(lambda: dp.stats().get("drop_udp_send_error", 0) == 1)
            assert dp.running
        finally:
            dp.stop()
            sock.close()


def test_stop_is_prompt_and_idempotent(threads: int) -> None:
    sock = open_udp_socket(0, "127.0.0.1")
    with MemoryTun() as tun:
        dp = Datapath(NullCore(None), tun, sock, threads=threads)
        dp.start()
        t0 = time.monotonic()
        dp.stop()
        dp.stop()
        assert time.monotonic() - t0 < 1.0
        assert not dp.running
    sock.close()


def ipv4_packet(src: str, dst: str, payload: bytes) -> bytes:
    """A minimal IPv4/UDP-protocol packet: what the core checks is version, length and source."""
    total = 20 + len(payload)
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0, 64, 17, 0,
                         ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    return header + payload


def test_real_core_handshake_then_data_both_ways(threads: int) -> None:
    """Two real Devices behind two datapaths on loopback: the first packet is staged, the handshake
    runs through the UDP loops, and the packet comes out of the other MemoryTun unchanged."""
    ka, kb = PrivateKey.generate(), PrivateKey.generate()
    sa, sb = open_udp_socket(0, "127.0.0.1"), open_udp_socket(0, "127.0.0.1")
    da, db = Device(ka), Device(kb)
    da.set_peer(kb.node_public(), allowed_ips=["10.0.0.2/32"],
                endpoint=("127.0.0.1", sb.getsockname()[1]))
    db.set_peer(ka.node_public(), allowed_ips=["10.0.0.1/32"])  # learns a's endpoint
    with MemoryTun("a") as ta, MemoryTun("b") as tb:
        pa = Datapath(da, ta, sa, threads=threads)
        pb = Datapath(db, tb, sb, threads=threads)
        pa.start()
        pb.start()
        try:
            first = ipv4_packet("10.0.0.1", "10.0.0.2", b"hello through the tunnel")
            ta.inject(first)
            assert tb.delivered(timeout=5.0) == first
            reply = ipv4_packet("10.0.0.2", "10.0.0.1", b"x" * 1000)
            tb.inject(reply)
            assert ta.delivered(timeout=5.0) == reply
            spoofed = ipv4_packet("10.9.9.9", "10.0.0.1", b"not from b's allowed IPs")
            # b routes by destination, so it encrypts this; a must drop it (source check)
            tb.inject(spoofed)
            assert wait_for(lambda: pa.stats().get("core_drop_bad_source", 0) == 1)
            assert ta.delivered(timeout=0.2) is None
            assert pa.stats()["udp_rx_packets"] >= 3  # response, data, spoofed data
            peer = pb.call(lambda dev, now: dev.peer(ka.node_public()))
            assert peer is not None and peer.endpoint == ("127.0.0.1", sa.getsockname()[1])
        finally:
            pa.stop()
            pb.stop()
            sa.close()
            sb.close()


def test_batched_sends_keep_datagram_boundaries_and_order(threads: int) -> None:
    """_send_all groups runs for UDP GSO: every datagram must still arrive alone and in order."""
    r1 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    r2 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for r in (r1, r2):
        r.bind(("127.0.0.1", 0))
        r.settimeout(2.0)
    e1, e2 = ("127.0.0.1", r1.getsockname()[1]), ("127.0.0.1", r2.getsockname()[1])
    sock = open_udp_socket(0, "127.0.0.1")
    with MemoryTun() as tun:
        dp = Datapath(NullCore(None), tun, sock, threads=threads)
        batch = (
            [Tx(e1, bytes([65 + i]) * 100) for i in range(5)]
            + [Tx(e1, b"s" * 60), Tx(e1, b"t" * 100)]
            + [Tx(e2, b"c" * 100) for _ in range(3)]
            + [Tx(e1, b"d" * 200)]
        )
        dp.transmit(batch)
        got1 = [r1.recv(2048) for _ in range(8)]
        got2 = [r2.recv(2048) for _ in range(3)]
        assert got1 == [t.data for t in batch if t.endpoint == e1]
        assert got2 == [b"c" * 100] * 3
        assert dp.stats()["udp_tx_packets"] == len(batch)
        assert dp.stats()["udp_tx_bytes"] == sum(len(t.data) for t in batch)
    for x in (r1, r2, sock):
        x.close()


def test_coalesced_receive_is_split_into_datagrams(threads: int) -> None:
    """A UDP GSO burst (GRO hands it over as one buffer) reaches the core as separate datagrams."""
    sock = open_udp_socket(0, "127.0.0.1")
    core = NullCore(None)
    with MemoryTun() as tun, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        dp = Datapath(core, tun, sock, threads=threads)
        dp.start()
        try:
            payloads = [b"D" + bytes([48 + i]) * 49 for i in range(4)] + [b"Dlast"]
            try:
                s.sendmsg([b"".join(payloads)], [(17, 103, (50).to_bytes(2, sys.byteorder))], 0,
                          sock.getsockname())  # SOL_UDP, UDP_SEGMENT
            except OSError:
                pytest.skip("kernel without UDP GSO")
            for p in payloads:
                assert tun.delivered(timeout=2.0) == p[1:]
            assert wait_for(lambda: dp.stats()["udp_rx_packets"] == len(payloads))
        finally:
            dp.stop()
            sock.close()
