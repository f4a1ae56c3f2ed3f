"""Per-peer routes in the datapath (relaymesh.magicsock.route): direct, DERP, mirrored, inject.

A fake core encrypts nothing: every TUN packet becomes one transmit to the test peer's stable
:class:`PeerEndpoint`; a received datagram starting with byte 4 yields its rest as a plaintext
packet and, when it is ``b"\\x04ping"``, a reply transmit to the source (like a handshake
response). Real UDP sockets on loopback and a MemoryTun.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from relaymesh.magicsock.route import DerpOutbox, MeshDatapath, PeerEndpoint
from relaymesh.node.engine import TrackingDevice
from relaymesh.node.filter import InboundFilter
from relaymesh.stun import MAGIC_COOKIE
from relaymesh.wireguard.datapath import open_udp_socket
from relaymesh.wireguard.tun import MemoryTun

KEY = bytes(range(32))


@dataclass(slots=True)
class Tx:
    endpoint: Hashable
    data: bytes


@dataclass(slots=True)
class Rx:
    transmits: list[Any] = field(default_factory=list)
    packets: list[bytes] = field(default_factory=list)
    peer: object | None = None


class Core:
    def __init__(self, ep: PeerEndpoint) -> None:
        self.ep = ep
        self.sources: list[Hashable] = []

    def send_packet(self, ip_packet: bytes, now: float) -> list[Tx]:
        return [Tx(self.ep, b"\x04" + ip_packet)]

    def receive(self, datagram: memoryview, source: Hashable, now: float) -> Rx:
        d = bytes(datagram)
        self.sources.append(source)
        if d[:1] != b"\x04":
            return Rx()
        out = [Tx(source, b"\x04pong")] if d == b"\x04ping" else []
        return Rx(transmits=out, packets=[d[1:]], peer=self)

    def tick(self, now: float) -> list[Tx]:
        return []

    def next_deadline(self) -> float | None:
        return None


@dataclass
class Rig:
    dp: MeshDatapath
    core: Core
    ep: PeerEndpoint
    tun: MemoryTun
    peer: socket.socket  # the "peer's" UDP socket on loopback
    derp_sent: list[tuple[bytes, int, bytes]]
    loop: asyncio.AbstractEventLoop

    @property
    def peer_addr(self) -> tuple[str, int]:
        return ("127.0.0.1", int(self.peer.getsockname()[1]))

    def udp_received(self, timeout: float = 1.0) -> bytes | None:
        self.peer.settimeout(timeout)
        try:
            return self.peer.recv(2048)
        except TimeoutError:
            return None

    def run_loop(self, seconds: float = 0.1) -> None:
        self.loop.run_until_complete(asyncio.sleep(seconds))


@pytest.fixture
def rig() -> Iterator[Rig]:
    loop = asyncio.new_event_loop()
    ep = PeerEndpoint(KEY)
    core = Core(ep)
    tun = MemoryTun()
    sock = open_udp_socket(0, "127.0.0.1")
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    sent: list[tuple[bytes, int, bytes]] = []
    dp = MeshDatapath(core, tun, sock)
    dp.set_outbox(DerpOutbox(loop, lambda k, r, d: sent.append((k, r, d))))
    dp.start()
    try:
        yield Rig(dp, core, ep, tun, peer, sent, loop)
    finally:
        dp.stop()
        tun.close()
        sock.close()
        peer.close()
        loop.close()


def test_direct_route_sends_udp_only(rig: Rig) -> None:
    assert rig.dp.set_route(rig.ep, rig.peer_addr, 0)
    assert not rig.dp.set_route(rig.ep, rig.peer_addr, 0)  # unchanged: no work
    rig.tun.inject(b"hello")
    assert rig.udp_received() == b"\x04hello"
    rig.run_loop()
    assert rig.derp_sent == [] and rig.dp.derp_routes == 0


def test_derp_route_hands_packets_to_the_event_loop_only(rig: Rig) -> None:
    rig.dp.set_route(rig.ep, None, 7)
    assert rig.dp.derp_routes == 1
    for i in range(5):
        rig.tun.inject(b"p%d" % i)
    for _ in range(20):
        rig.run_loop(0.05)
        if len(rig.derp_sent) == 5:
            break
    assert rig.derp_sent == [(KEY, 7, b"\x04p%d" % i) for i in range(5)]
    assert rig.udp_received(0.2) is None
    assert rig.dp.stats()["derp_tx_packets"] == 5


def test_mirrored_route_sends_both_and_switching_back_stops_derp(rig: Rig) -> None:
    rig.dp.set_route(rig.ep, rig.peer_addr, 3)  # suspect direct path: mirrored
    rig.tun.inject(b"m1")
    assert rig.udp_received() == b"\x04m1"
    rig.run_loop(0.2)
    assert rig.derp_sent == [(KEY, 3, b"\x04m1")]
    rig.dp.set_route(rig.ep, rig.peer_addr, 0)  # the direct path answered again
    assert rig.dp.derp_routes == 0
    rig.tun.inject(b"m2")
    assert rig.udp_received() == b"\x04m2"
    rig.run_loop(0.2)
    assert len(rig.derp_sent) == 1


def test_inject_decrypts_like_udp_and_replies_along_the_route(rig: Rig) -> None:
    rig.dp.set_route(rig.ep, None, 2)
    rig.dp.inject(b"\x04ping", rig.ep)
    assert rig.tun.delivered(1.0) == b"ping"
    assert rig.core.sources == [rig.ep]  # the peer's stable endpoint is the source
    rig.run_loop(0.2)
    assert rig.derp_sent == [(KEY, 2, b"\x04pong")]  # the reply followed the DERP route


def test_inject_applies_the_inbound_filter() -> None:
    ep = PeerEndpoint(KEY)
    tun = MemoryTun()
    sock = open_udp_socket(0, "127.0.0.1")
    dp = MeshDatapath(Core(ep), tun, sock, inbound_filter=lambda p, peer: p.startswith(b"ok"))
    try:
        dp.inject(b"\x04no", ep)
        dp.inject(b"\x04ok", ep)
        assert tun.delivered(1.0) == b"ok"
        assert tun.delivered(0.1) is None
        assert dp.stats()["drop_filtered"] == 1
    finally:
        tun.close()
        sock.close()


def test_outbox_full_drops_and_counts() -> None:
    loop = asyncio.new_event_loop()
    try:
        got: list[bytes] = []
        box = DerpOutbox(loop, lambda k, r, d: got.append(d), maxlen=3)
        results = [box.put(KEY, 1, b"%d" % i) for i in range(5)]
        assert results == [True, True, True, False, False]
        assert box.dropped == 2
        loop.run_until_complete(asyncio.sleep(0.01))
        assert got == [b"0", b"1", b"2"]
        assert box.put(KEY, 1, b"again")  # drained: room again
    finally:
        loop.close()


def _stun_response() -> bytes:
    # 0x0101 binding success, length 0, magic cookie, 12-byte transaction id
    return b"\x01\x01\x00\x00" + MAGIC_COOKIE.to_bytes(4, "big") + b"t" * 12


def test_tracking_device_takes_stun_answers_off_the_wireguard_path() -> None:
    seen: list[tuple[bytes, Any]] = []

    class Inner:
        def __init__(self) -> None:
            self.got: list[bytes] = []

        def receive(self, d: memoryview, source: Any, now: float) -> Rx:
            self.got.append(bytes(d))
            return Rx()

    inner = Inner()
    dev = TrackingDevice(inner, InboundFilter(), lambda: 0.0,  # type: ignore[arg-type]
                         on_stun=lambda d, s: seen.append((d, s)))
    stun = _stun_response()
    r = dev.receive(memoryview(stun), ("1.2.3.4", 3478), 0.0)
    assert r.packets == [] and r.transmits == []
    assert seen == [(stun, ("1.2.3.4", 3478))] and inner.got == []
    wg = b"\x01\x00\x00\x00" + b"\0" * 144  # an initiation's first bytes: not STUN
    dev.receive(memoryview(wg), ("1.2.3.4", 1), 0.0)
    assert inner.got == [wg] and len(seen) == 1


