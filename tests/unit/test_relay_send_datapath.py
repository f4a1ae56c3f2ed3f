"""Sends to a peer on a peer relay (loopback only): every datagram leaves with the session's relay
header in front, whether it goes out in a UDP GSO run (the header joined in once per run), alone
by sendto, or with GSO off; a direct peer in the same batch gets no header."""

from __future__ import annotations

import socket
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from relaymesh.magicsock.route import MeshDatapath, PeerEndpoint
from relaymesh.relay.header import PROTO_WIREGUARD, encode_header
from relaymesh.wireguard.datapath import open_udp_socket
from relaymesh.wireguard.tun import MemoryTun

LO = "127.0.0.1"
HDR = encode_header(0x123456, PROTO_WIREGUARD)


@dataclass(frozen=True, slots=True)
class Tx:
    endpoint: Hashable
    data: bytes


class Core:
    def send_packet(self, ip_packet: bytes, now: float) -> list[Any]:
        return []

    def receive(self, datagram: memoryview, source: Hashable, now: float) -> Any:
        raise AssertionError("nothing is received in these tests")

    def tick(self, now: float) -> list[Any]:
        return []

    def next_deadline(self) -> float | None:
        return None


@pytest.fixture(params=[True, False], ids=["gso", "no-gso"])
def setup(request: pytest.FixtureRequest) -> Iterator[tuple[MeshDatapath, socket.socket,
                                                             socket.socket]]:
    tun, main = MemoryTun(), open_udp_socket(0, LO)
    dp = MeshDatapath(Core(), tun, main, offload=bool(request.param))
    relay, direct = (socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2))
    for s in (relay, direct):
        s.bind((LO, 0))
        s.settimeout(2.0)
    yield dp, relay, direct
    for s in (relay, direct, main, tun):
        s.close()


def recv_all(s: socket.socket, n: int) -> list[bytes]:
    return [s.recvfrom(2048)[0] for _ in range(n)]


def test_every_relayed_datagram_carries_the_header_and_direct_ones_do_not(
        setup: tuple[MeshDatapath, socket.socket, socket.socket]) -> None:
    dp, relay, direct = setup
    pe, other = PeerEndpoint(b"k" * 32), PeerEndpoint(b"o" * 32)
    dp.set_route(pe, relay.getsockname(), 0, relay_hdr=HDR)
    dp.set_route(other, direct.getsockname(), 0)
    assert pe.relay_hdr == HDR and other.relay_hdr is None  # what the send code reads
    # a GSO-sized run of equal datagrams ending in a shorter one, then a direct one, then more
    burst = [bytes([i]) * 1200 for i in range(6)] + [b"short"]
    dp.transmit([Tx(pe, d) for d in burst] + [Tx(other, b"direct")] + [Tx(pe, b"tail")])
    assert recv_all(relay, len(burst) + 1) == [HDR + d for d in [*burst, b"tail"]]
    assert recv_all(direct, 1) == [b"direct"]
    dp.transmit([Tx(pe, b"alone")])  # one datagram: plain sendto
    assert recv_all(relay, 1) == [HDR + b"alone"]
    st = dp.stats()
    assert st["relay_tx_packets"] == len(burst) + 2
    assert st["relay_tx_bytes"] == sum(len(HDR) + len(d) for d in [*burst, b"tail", b"alone"])
