"""Spray sockets in the threaded datapath (loopback only): extra sockets are polled with the main
one, their disco goes to their own divert hook, a known sender becomes the peer's endpoint, and a
peer routed through a spray socket gets its WireGuard sent from that socket."""

from __future__ import annotations

import socket
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from asyncwait import poll_until as wait_for

from relaymesh.disco import MAGIC
from relaymesh.magicsock.route import MeshDatapath, PeerEndpoint
from relaymesh.wireguard.datapath import Datapath, open_udp_socket
from relaymesh.wireguard.tun import MemoryTun

LO = "127.0.0.1"


@dataclass(slots=True)
class Rx:
    transmits: list[Any] = field(default_factory=list)
    packets: list[bytes] = field(default_factory=list)
    peer: object | None = None


@dataclass(frozen=True, slots=True)
class Tx:
    endpoint: Hashable
    data: bytes


class Core:
    """Records (datagram, source) for everything the datapath hands it."""

    def __init__(self) -> None:
        self.seen: list[tuple[bytes, Any]] = []

    def send_packet(self, ip_packet: bytes, now: float) -> list[Any]:
        return []

    def receive(self, datagram: memoryview, source: Hashable, now: float) -> Rx:
        self.seen.append((bytes(datagram), source))
        return Rx()

    def tick(self, now: float) -> list[Any]:
        return []

    def next_deadline(self) -> float | None:
        return None


def udp(port: int = 0) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((LO, port))
    return s


@pytest.fixture
def closing() -> Iterator[list[Any]]:
    things: list[Any] = []
    yield things
    for t in reversed(things):
        if isinstance(t, Datapath):
            t.stop()
        else:
            t.close()


@pytest.mark.parametrize("threads", [1, 2])
def test_extra_socket_is_polled_mapped_and_diverted(threads: int, closing: list[Any]) -> None:
    core, tun, main = Core(), MemoryTun(), open_udp_socket(0, LO)
    main_disco: list[Any] = []
    dp = Datapath(core, tun, main, threads=threads,
                  divert=lambda d, s: main_disco.append(s) or True)
    extra, tx = udp(), udp()
    closing += [tun, main, extra, tx]
    dp.start()
    closing.append(dp)
    peer = object()
    src = (LO, tx.getsockname()[1])
    extra_disco: list[Any] = []
    dp.add_socket(extra, lambda ep: peer if ep == src else ep,
                  lambda d, s: extra_disco.append((d[:6], s)) or True)
    wg = b"\x04\x00\x00\x00" + b"w" * 28
    disco = MAGIC + b"d" * 90
    for _ in range(3):  # the loop may still be rebuilding its poll set: resend until seen
        tx.sendto(wg, (LO, extra.getsockname()[1]))
        if wait_for(lambda: bool(core.seen), 0.5):
            break
    assert core.seen and core.seen[0] == (wg, peer)  # the known sender is the peer's endpoint
    tx.sendto(disco, (LO, extra.getsockname()[1]))
    assert wait_for(lambda: bool(extra_disco))
    assert extra_disco[0] == (MAGIC, src) and main_disco == []  # plain (ip, port) to divert
    # the main socket still works as before
    tx.sendto(wg, (LO, main.getsockname()[1]))
    assert wait_for(lambda: (wg, src) in core.seen)


def test_removed_extra_socket_is_no_longer_read_and_closing_it_is_harmless(
        closing: list[Any]) -> None:
    core, tun, main = Core(), MemoryTun(), open_udp_socket(0, LO)
    dp = Datapath(core, tun, main)
    extra, tx = udp(), udp()
    closing += [tun, main, tx]
    dp.start()
    closing.append(dp)
    dp.add_socket(extra)
    port = extra.getsockname()[1]
    wg = b"\x04\x00\x00\x00" + b"x" * 28
    for _ in range(3):
        tx.sendto(wg, (LO, port))
        if wait_for(lambda: bool(core.seen), 0.5):
            break
    assert core.seen
    dp.remove_socket(extra)
    extra.close()
    n = len(core.seen)
    tx.sendto(b"\x04\x00\x00\x00" + b"y" * 28, (LO, main.getsockname()[1]))
    assert wait_for(lambda: len(core.seen) == n + 1)  # the loop survived and reads the main
    assert dp.running and dp.stats().get("drop_udp_recv_error", 0) == 0


def test_peer_routed_through_a_spray_socket_is_sent_from_it(closing: list[Any]) -> None:
    core, tun, main = Core(), MemoryTun(), open_udp_socket(0, LO)
    dp = MeshDatapath(core, tun, main)
    spray, rx = udp(), udp()
    rx.settimeout(2.0)
    closing += [tun, main, spray, rx]
    pe, other = PeerEndpoint(b"k" * 32), PeerEndpoint(b"o" * 32)
    dest = (LO, rx.getsockname()[1])
    dp.set_route(pe, dest, 0, sock=spray)
    dp.set_route(other, dest, 0)
    assert dp.spray_routes == 1
    dp.transmit([Tx(pe, b"via-spray"), Tx(other, b"via-main")])
    got = {rx.recvfrom(100) for _ in range(2)}
    assert got == {(b"via-spray", spray.getsockname()), (b"via-main", (LO, main.getsockname()[1]))}
    dp.drop_sock_routes(spray)  # the socket is closing: nobody sends from it any more
    assert pe.sock is None and pe.direct is None and dp.spray_routes == 0
