"""Peer relay forwarding through real sockets in the lab: A and B behind hard NATs, relay R.

The relay service and both clients run in this test process; their sockets are opened inside the
lab hosts' namespaces (``setns`` on a helper thread: a socket keeps the namespace it was created
in), so allocation is in-process (DERP signalling is not part of this test) while every packet
crosses the real NATs. Run with the userspace loop and with the nftables fast path.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

import pytest

from relaymesh import disco, relay
from relaymesh.keys import PrivateKey
from relaymesh.lab import Lab, Topology
from relaymesh.lab.netns import run_in_netns
from relaymesh.relay import RelayLimits
from relaymesh.relay.service import RelayService
from relaymesh.wireguard.datapath import open_udp_socket

pytestmark = pytest.mark.lab

TIMEOUT = 3.0



def udp_socket_in(ns: str) -> socket.socket:
    def make() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, 33, 4 << 20)  # SO_RCVBUFFORCE: bursts must fit
        s.bind(("0.0.0.0", 0))
        return s

    return run_in_netns(ns, make)


class Client:
    """A relay client in a lab host: one UDP socket, BindClient for the handshake."""

    def __init__(self, lab: Lab, host: str, relay_addr: tuple[str, int],
                 key: PrivateKey | None = None) -> None:
        self.key = key or PrivateKey.generate()
        self.relay = relay_addr
        self.sock = udp_socket_in(lab.netns(host))

    def bind(self, ep: disco.RelayEndpoint, gen: int = 1, *, answer_from: Client | None = None,
             forge_mac: bool = False) -> None:
        bc = relay.BindClient(self.key, ep, gen)
        self.sock.sendto(bc.bind_packet(), self.relay)
        self.sock.settimeout(TIMEOUT)
        challenge = self.sock.recv(2048)
        answer = bc.handle_packet(challenge)
        if forge_mac:  # well sealed, but not the MAC the relay issued
            _, msg = disco.open_sealed(memoryview(challenge)[relay.HEADER_LEN:], self.key)
            assert isinstance(msg, disco.Challenge)
            bad = bytes([msg.mac[0] ^ 0xFF]) + msg.mac[1:]
            answer = answer[: relay.HEADER_LEN] + disco.seal(
                disco.Answer(ep.session_id, gen, bc.other, bad), self.key, ep.server_disco)
        (answer_from or self).sock.sendto(answer, self.relay)

    def send(self, ep: disco.RelayEndpoint, payload: bytes, to: tuple[str, int] | None = None
             ) -> bytes:
        pkt = relay.encode_header(ep.session_id, relay.PROTO_WIREGUARD) + payload
        self.sock.sendto(pkt, to or self.relay)
        return pkt

    def recv_all(self, count: int, timeout: float = TIMEOUT) -> list[bytes]:
        got: list[bytes] = []
        end = time.monotonic() + timeout
        while len(got) < count and (left := end - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                got.append(self.sock.recv(65535))
            except TimeoutError:
                break
        return got

    def close(self) -> None:
        self.sock.close()


def wait_for(cond: Callable[[], bool], timeout: float = TIMEOUT) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def relay_topology() -> Topology:
    topo = Topology(name="relayfwd")
    topo.add_network("lan_a", nat="hard")
    topo.add_network("lan_b", nat="hard")
    topo.add_host("a", network="lan_a")
    topo.add_host("b", network="lan_b")
    topo.add_host("r")
    return topo


@dataclass
class RelayWorld:
    lab: Lab
    service: RelayService
    a: Client
    b: Client
    extra: list[Client]

    @property
    def relay_addr(self) -> tuple[str, int]:
        port = self.service.port
        assert port is not None
        return (self.lab.address("r"), port)

    def client(self, host: str, key: PrivateKey | None = None) -> Client:
        c = Client(self.lab, host, self.relay_addr, key)
        self.extra.append(c)
        return c

    def allocate(self) -> disco.RelayEndpoint:
        resp = self.service.allocate(self.a.key.disco_public(), self.b.key.disco_public())
        assert resp is not None
        return resp.endpoint

    def session(self, ep: disco.RelayEndpoint) -> Any:
        for s in self.service.sessions():
            if s.session_id == ep.session_id:
                return s
        return None

    def bound(self) -> disco.RelayEndpoint:
        ep = self.allocate()
        self.a.bind(ep)
        self.b.bind(ep)
        assert wait_for(lambda: (s := self.session(ep)) is not None and s.state == "bound")
        return ep

    def drops(self) -> dict[str, int]:
        d = self.service.metrics()["drops"]
        assert isinstance(d, dict)
        return d


def start_world(lab: Lab, *, kernel: bool, limits: RelayLimits | None = None,
                grants: set[frozenset[str]] | None = None, native: bool = True) -> RelayWorld:
    ns_r = lab.netns("r")
    a_key, b_key = PrivateKey.generate(), PrivateKey.generate()
    names = {a_key.disco_public(): "a", b_key.disco_public(): "b"}

    def allowed(x: Any, y: Any) -> bool:
        return x in names and y in names

    service = RelayService(
        PrivateKey.generate(), allowed, resolver=names.get, limits=limits,
        static_endpoints=[(IPv4Address(lab.address("r")), 0)], discover_candidates=False,
        kernel=kernel, kernel_netns=ns_r if kernel else None, sync_interval=0.2, native=native,
        socket_factory=lambda port: run_in_netns(ns_r, lambda: open_udp_socket(port)))
    port = service.start(0)
    service.set_candidates([(IPv4Address(lab.address("r")), port)])
    relay_addr = (lab.address("r"), port)
    return RelayWorld(lab, service, Client(lab, "a", relay_addr, a_key),
                      Client(lab, "b", relay_addr, b_key), [])


@pytest.fixture(params=["native", "python", "kernel"])
def world(request: pytest.FixtureRequest, lab_factory: Callable[..., Lab]) -> Iterator[RelayWorld]:
    """The userspace loop in C (the default) and in Python, and the nftables path."""
    lab = lab_factory(relay_topology())
    kernel = request.param == "kernel"
    w = start_world(lab, kernel=kernel, native=request.param == "native")
    if kernel:
        assert w.service.kernel is not None, w.service.kernel_reason
    shell = w.service.shell
    assert shell is not None
    assert shell.native == (request.param == "native"), shell.native_reason
    try:
        yield w
    finally:
        w.service.stop()
        for c in (w.a, w.b, *w.extra):
            c.close()


def test_hard_nat_clients_cannot_reach_each_other_directly(world: RelayWorld) -> None:
    ep = world.bound()
    s = world.session(ep)
    b_public = s.addrs[s.names.index("b")]
    # B's NAT mapping towards the relay filters everyone else, and A's NAT maps A anew for B
    world.a.send(ep, b"direct?", to=b_public)
    assert world.b.recv_all(1, timeout=0.5) == []


def test_packets_go_through_the_relay_unmodified_both_ways(world: RelayWorld) -> None:
    ep = world.bound()
    sent = [world.a.send(ep, i.to_bytes(2, "big") + os.urandom(1 + (i * 37) % 1380))
            for i in range(100)]
    got = world.b.recv_all(len(sent))
    assert sorted(got) == sorted(sent)
    back = [world.b.send(ep, b"reply" + os.urandom(i)) for i in range(20)]
    assert sorted(world.a.recv_all(len(back))) == sorted(back)
    names = world.session(ep).names
    assert set(names) == {"a", "b"}  # listed by node name through the resolver


def test_bind_with_a_wrong_mac_is_refused(world: RelayWorld) -> None:
    ep = world.allocate()
    world.a.bind(ep, forge_mac=True)
    assert wait_for(lambda: world.drops().get("bad_mac", 0) == 1)
    assert world.session(ep).state == "allocated"


def test_answer_from_another_source_is_refused(world: RelayWorld) -> None:
    ep = world.allocate()
    elsewhere = world.client("a", world.a.key)  # same key, another socket: another NAT mapping
    world.a.bind(ep, answer_from=elsewhere)
    assert wait_for(lambda: world.drops().get("bad_mac", 0) == 1)
    assert world.session(ep).state == "allocated"


def test_data_from_an_unbound_address_is_dropped(world: RelayWorld) -> None:
    ep = world.bound()
    intruder = world.client("a")
    intruder.send(ep, b"not bound")
    assert wait_for(lambda: world.drops().get("unbound_source", 0) == 1)
    assert world.b.recv_all(1, timeout=0.3) == []
