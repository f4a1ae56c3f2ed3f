"""The two datapath hooks the node daemon uses: ``divert`` (disco) and ``inbound_filter``.

A fake core treats datagrams starting with byte 4 (WireGuard transport type) as data carrying one
plaintext packet (the rest of the datagram), from a fixed fake peer.
"""

from __future__ import annotations

import socket
import sys
import threading
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from asyncwait import poll_until as wait_for

from relaymesh.disco import MAGIC
from relaymesh.relay.header import PROTO_DISCO, PROTO_WIREGUARD, encode_header
from relaymesh.relay.header import WIREGUARD_PREFIX as RELAY_WIREGUARD_PREFIX
from relaymesh.wireguard.datapath import SOL_UDP, UDP_SEGMENT, Datapath, open_udp_socket
from relaymesh.wireguard.tun import MemoryTun

PEER = object()


@dataclass(slots=True)
class Rx:
    transmits: list[Any] = field(default_factory=list)
    packets: list[bytes] = field(default_factory=list)
    peer: object | None = None


class Core:
    def __init__(self) -> None:
        self.seen: list[bytes] = []

    def send_packet(self, ip_packet: bytes, now: float) -> list[Any]:
        return []

    def receive(self, datagram: memoryview, source: Hashable, now: float) -> Rx:
        d = bytes(datagram)
        self.seen.append(d)
        return Rx(packets=[d[1:]], peer=PEER) if d[:1] == b"\x04" else Rx()

    def tick(self, now: float) -> list[Any]:
        return []

    def next_deadline(self) -> float | None:
        return None


Setup = Callable[..., tuple[Datapath, Core, MemoryTun, Callable[[bytes], None]]]


@pytest.fixture
def setup() -> Iterator[Setup]:
    made: list[tuple[Datapath, MemoryTun, socket.socket, socket.socket]] = []

    def make(**hooks: Any) -> tuple[Datapath, Core, MemoryTun, Callable[[bytes], None]]:
        sock = open_udp_socket(0, "127.0.0.1")
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tx.bind(("127.0.0.1", 0))
        core, tun = Core(), MemoryTun()
        dp = Datapath(core, tun, sock, **hooks)
        dp.start()
        made.append((dp, tun, sock, tx))
        port = sock.getsockname()[1]
        return dp, core, tun, lambda data: tx.sendto(data, ("127.0.0.1", port))

    yield make
    for dp, tun, sock, tx in made:
        dp.stop()
        tun.close()
        sock.close()
        tx.close()


def test_divert_takes_disco_and_leaves_wireguard_to_the_core(setup: Setup) -> None:
    got: list[tuple[bytes, tuple[str, int]]] = []
    main = threading.get_ident()
    threads: set[int] = set()

    def divert(data: bytes, src: tuple[str, int]) -> bool:
        threads.add(threading.get_ident())
        got.append((data, src))
        return data.startswith(MAGIC)

    _, core, tun, send = setup(divert=divert)
    disco = MAGIC + b"x" * 80
    send(disco)
    send(b"\x04\x00\x00\x00packet")
    assert wait_for(lambda: tun.delivered(0.01) is not None)
    assert wait_for(lambda: len(got) == 1)
    assert got[0][0] == disco and isinstance(got[0][0], bytes)  # a copy, not a view
    assert got[0][1][0] == "127.0.0.1"  # source unmapped from ::ffff:
    assert core.seen == [b"\x04\x00\x00\x00packet"]  # the core never saw the disco datagram
    assert main not in threads


def test_divert_returning_false_passes_the_datagram_to_the_core(setup: Setup) -> None:
    _, core, _, send = setup(divert=lambda data, src: False)
    send(b"garbage")
    assert wait_for(lambda: core.seen == [b"garbage"])


def test_framed_wireguard_skips_divert_other_relay_frames_do_not(setup: Setup) -> None:
    """The node passes the relay header's WireGuard prefix as ``framed``: relayed WireGuard goes
    to the device without the divert's copy; relayed disco (same header, other protocol) and
    plain disco still reach divert."""
    got: list[bytes] = []

    def divert(data: bytes, src: tuple[str, int]) -> bool:
        got.append(data)
        return True

    _, core, _, send = setup(divert=divert, framed=RELAY_WIREGUARD_PREFIX)
    wg = encode_header(7, PROTO_WIREGUARD) + b"\x04\x00\x00\x00wg"
    relayed_disco = encode_header(7, PROTO_DISCO) + MAGIC + b"d" * 40
    disco = MAGIC + b"x" * 40
    for d in (wg, relayed_disco, disco):
        send(d)
    assert wait_for(lambda: len(got) == 2 and len(core.seen) == 1)
    assert core.seen == [wg]
    assert got == [relayed_disco, disco]


def test_gro_run_of_framed_wireguard_skips_divert_a_relayed_disco_inside_does_not() -> None:
    """A GSO burst through a peer relay arrives as one GRO receive: when every segment is framed
    WireGuard (one check for the whole receive) none reaches divert; a relayed disco segment of
    the same size inside such a burst still does, and only it."""
    got: list[bytes] = []

    def divert(data: bytes, src: tuple[str, int]) -> bool:
        got.append(data)
        return True

    sock = open_udp_socket(0, "127.0.0.1")
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    core, tun = Core(), MemoryTun()
    dp = Datapath(core, tun, sock, divert=divert, framed=RELAY_WIREGUARD_PREFIX)
    try:
        if not dp.offloads["gro"]:
            pytest.skip("no UDP GRO on this kernel's loopback")
        dp.start()
        dest = ("127.0.0.1", sock.getsockname()[1])

        def burst(datagrams: list[bytes]) -> None:
            size = len(datagrams[0]).to_bytes(2, sys.byteorder)
            tx.sendmsg([b"".join(datagrams)], [(SOL_UDP, UDP_SEGMENT, size)], 0, dest)

        wg = [encode_header(7, PROTO_WIREGUARD) + b"\x04" + bytes([i]) * 200 for i in range(12)]
        burst(wg)
        assert wait_for(lambda: len(core.seen) == len(wg))
        assert core.seen == wg and got == []
        relayed_disco = encode_header(7, PROTO_DISCO) + MAGIC + b"d" * (len(wg[0]) - 14)
        assert len(relayed_disco) == len(wg[0])
        burst([*wg[:5], relayed_disco, *wg[5:]])
        assert wait_for(lambda: len(core.seen) == 2 * len(wg) and len(got) == 1)
        assert core.seen[len(wg):] == wg
        assert got == [relayed_disco]
    finally:
        dp.stop()
        tun.close()
        sock.close()
        tx.close()


def test_inbound_filter_drops_and_counts(setup: Setup) -> None:
    seen_peers: list[object] = []

    def flt(packet: bytes, peer: object) -> bool:
        seen_peers.append(peer)
        if packet == b"boom":
            raise RuntimeError("filter bug")
        return packet.startswith(b"ok")

    dp, _, tun, send = setup(inbound_filter=flt)
    for p in (b"no-1", b"boom", b"ok-1"):
        send(b"\x04" + p)
    assert wait_for(lambda: len(seen_peers) == 3)
    assert tun.delivered(2.0) == b"ok-1"
    assert tun.delivered(0.2) is None
    stats = dp.stats()
    assert stats["drop_filtered"] == 2  # the refused packet and the one whose filter raised
    assert stats["drop_filter_error"] == 1
    assert seen_peers == [PEER] * 3


class RunCore(Core):
    """A core that takes GRO runs of framed WireGuard whole (like the node's TrackingDevice):
    session 7 whole, session 8 not (None: segment by segment), session 9 raises."""

    def __init__(self) -> None:
        super().__init__()
        self.runs: list[int] = []

    def receive_run(self, view: memoryview, total: int, seg: int, source: Hashable,
                    now: float) -> list[Rx] | None:
        session = int.from_bytes(view[4:7], "big")
        if session == 9:
            raise RuntimeError("core bug")
        if session != 7:
            return None
        segs = [bytes(view[off : off + seg]) for off in range(0, total, seg)]
        self.runs.append(len(segs))
        return [Rx(packets=[s[8:]], peer=PEER) for s in segs]


def test_a_device_takes_a_framed_gro_run_whole_or_hands_it_back() -> None:
    """The datapath offers every GRO receive that starts framed to ``receive_run``: what it
    returns is delivered as per-segment results; None hands the segments to ``receive`` one by
    one; an exception drops that receive, counted, and the loop goes on."""
    sock = open_udp_socket(0, "127.0.0.1")
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    core, tun = RunCore(), MemoryTun()
    dp = Datapath(core, tun, sock, framed=RELAY_WIREGUARD_PREFIX)
    try:
        if not dp.offloads["gro"]:
            pytest.skip("no UDP GRO on this kernel's loopback")
        dp.start()
        dest = ("127.0.0.1", sock.getsockname()[1])

        def burst(session: int) -> list[bytes]:
            dgrams = [encode_header(session, PROTO_WIREGUARD) + b"\x04" + bytes([i]) * 100
                      for i in range(6)]
            size = len(dgrams[0]).to_bytes(2, sys.byteorder)
            tx.sendmsg([b"".join(dgrams)], [(SOL_UDP, UDP_SEGMENT, size)], 0, dest)
            return dgrams

        whole = burst(7)
        for d in whole:
            assert tun.delivered(2.0) == d[8:]
        assert core.runs == [6] and core.seen == []
        burst(9)
        assert wait_for(lambda: dp.stats().get("drop_core_receive_error") == 1)
        handed_back = burst(8)
        assert wait_for(lambda: core.seen == handed_back)
        assert core.runs == [6]
        assert tun.delivered(0.2) is None  # segment by segment, the fake core delivers no frame
        assert dp.stats()["udp_rx_packets"] == 18
    finally:
        dp.stop()
        tun.close()
        sock.close()
        tx.close()
