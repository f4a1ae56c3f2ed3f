"""The sans-IO core against Debian's wireguard-go, over real UDP (lab: root, network namespace).

wireguard-go runs in a namespace created here, behind a veth pair; our Device runs in the test
process behind a plain UDP socket (no TUN needed on our side). Inner packets are ICMP/ICMPv6 echoes
that the namespace's kernel answers through wireguard-go, so both handshake directions, the
transport format, counters, padding and a rekey are all checked by the reference implementation.
The veth /30 is drawn at random per run so parallel runs on this machine do not collide.
"""

from __future__ import annotations

import ipaddress
import os
import random
import select
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from relaymesh.keys import PrivateKey
from relaymesh.wireguard import Device, Transmit
from relaymesh.wireguard.testing import icmp6_echo, icmp_echo

pytestmark = pytest.mark.lab

GO_PORT = 51820


def _sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=20)


@dataclass
class Lab:
    ns: str
    outer_us: str
    outer_go: str
    go_key: PrivateKey
    our_key: PrivateKey
    sock: socket.socket
    keyfile: str

    def wg(self, *args: str) -> str:
        return _sh("ip", "netns", "exec", self.ns, "wg", *args).stdout

    def set_go_peer(self) -> None:
        port = self.sock.getsockname()[1]
        self.wg("set", "wgt0", "peer", self.our_key.node_public().to_base64(),
                "allowed-ips", "10.99.0.2/32,fd99::2/128", "endpoint", f"{self.outer_us}:{port}")


@pytest.fixture
def lab() -> Iterator[Lab]:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    if shutil.which("wireguard-go") is None or shutil.which("wg") is None:
        pytest.skip("wireguard-go / wireguard-tools not installed")
    rid = uuid.uuid4().hex[:6]
    base = 0xAC1E0000 + 4 * random.randrange(1, 16383)  # a random /30 in 172.30.0.0/16
    outer_us, outer_go = str(ipaddress.IPv4Address(base + 1)), str(ipaddress.IPv4Address(base + 2))
    ns, va, vb = f"rm-wgcore-{rid}", f"rmwa{rid}", f"rmwb{rid}"
    tmp = tempfile.mkdtemp(prefix="rm-wgcore-")
    go: subprocess.Popen[bytes] | None = None
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        _sh("ip", "netns", "add", ns)
        _sh("ip", "link", "add", va, "type", "veth", "peer", "name", vb)
        _sh("ip", "link", "set", vb, "netns", ns)
        _sh("ip", "addr", "add", f"{outer_us}/30", "dev", va)
        _sh("ip", "link", "set", va, "up")
        _sh("ip", "-n", ns, "addr", "add", f"{outer_go}/30", "dev", vb)
        _sh("ip", "-n", ns, "link", "set", vb, "up")
        _sh("ip", "-n", ns, "link", "set", "lo", "up")
        env = dict(os.environ, WG_PROCESS_FOREGROUND="1")
        go = subprocess.Popen(["ip", "netns", "exec", ns, "wireguard-go", "-f", "wgt0"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            if _sh("ip", "-n", ns, "link", "show", "wgt0", check=False).returncode == 0:
                break
            time.sleep(0.05)
        else:
            pytest.fail("wireguard-go did not create its interface")
        go_key, our_key = PrivateKey.generate(), PrivateKey.generate()
        keyfile = os.path.join(tmp, "go.key")
        with open(os.open(keyfile, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write(go_key.to_base64())
        sock.bind((outer_us, 0))
        lab = Lab(ns, outer_us, outer_go, go_key, our_key, sock, keyfile)
        lab.wg("set", "wgt0", "listen-port", str(GO_PORT), "private-key", keyfile)
        lab.set_go_peer()
        _sh("ip", "-n", ns, "addr", "add", "10.99.0.1/24", "dev", "wgt0")
        _sh("ip", "-n", ns, "addr", "add", "fd99::1/64", "dev", "wgt0", "nodad")
        _sh("ip", "-n", ns, "link", "set", "wgt0", "up")
        yield lab
    finally:
        sock.close()
        if go is not None:
            go.terminate()
            try:
                go.wait(5)
            except subprocess.TimeoutExpired:
                go.kill()
        _sh("ip", "netns", "del", ns, check=False)
        _sh("ip", "link", "del", va, check=False)
        shutil.rmtree(tmp, ignore_errors=True)


class Driver:
    """Runs our Device on the UDP socket; `offset` shifts the core's clock (to skip to a rekey)."""

    def __init__(self, lab: Lab, under_load: bool = False) -> None:
        self.lab = lab
        self.offset = 0.0
        self.dev = Device(lab.our_key, wall_clock=time.time, under_load=lambda: under_load)
        self.dev.set_peer(lab.go_key.node_public(), allowed_ips=["10.99.0.1/32", "fd99::1/128"],
                          endpoint=(lab.outer_go, GO_PORT))

    def now(self) -> float:
        return time.monotonic() + self.offset

    def send(self, transmits: list[Transmit]) -> None:
        for t in transmits:
            assert isinstance(t.endpoint, tuple)
            self.lab.sock.sendto(t.data, t.endpoint)

    def pump(self, want: int = 1, timeout: float = 5.0) -> list[bytes]:
        got: list[bytes] = []
        end = time.monotonic() + timeout
        while time.monotonic() < end and len(got) < want:
            self.send(self.dev.tick(self.now()))
            r, _, _ = select.select([self.lab.sock], [], [], 0.05)
            if r:
                data, src = self.lab.sock.recvfrom(65535)
                res = self.dev.receive(data, src, self.now())
                self.send(res.transmits)
                got += res.packets
        return got

    def ping4(self, seq: int) -> list[bytes]:
        self.send(self.dev.send_packet(icmp_echo("10.99.0.2", "10.99.0.1", seq), self.now()))
        return self.pump()


def is_echo_reply_v4(p: bytes, seq: int) -> bool:
    return p[0] >> 4 == 4 and p[9] == 1 and p[20] == 0 and int.from_bytes(p[26:28], "big") == seq


def test_we_initiate_then_data_both_ways_v4_and_v6(lab: Lab) -> None:
    d = Driver(lab)
    got = d.ping4(1)
    assert len(got) == 1 and is_echo_reply_v4(got[0], 1), d.dev.drops
    d.send(d.dev.send_packet(icmp6_echo("fd99::2", "fd99::1", 2), d.now()))
    (reply6,) = d.pump()
    assert reply6[0] >> 4 == 6 and reply6[6] == 58 and reply6[40] == 129  # ICMPv6 echo reply
    for seq in range(3, 40):  # many packets of many sizes: counters and padding
        d.send(d.dev.send_packet(icmp_echo("10.99.0.2", "10.99.0.1", seq, b"z" * seq * 7), d.now()))
    replies = d.pump(want=37)
    assert sorted(int.from_bytes(p[26:28], "big") for p in replies) == list(range(3, 40))
    assert "latest handshake" in lab.wg("show", "wgt0")
    assert not d.dev.drops


def test_wireguard_go_initiates(lab: Lab) -> None:
    d = Driver(lab)
    # make wireguard-go send first: a UDP datagram from inside its namespace to our inner address
    _sh("ip", "netns", "exec", lab.ns, "python3", "-c",
        "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM)"
        ".sendto(b'from-go', ('10.99.0.2', 9999))")
    (pkt,) = d.pump()
    assert pkt[9] == 17 and pkt.endswith(b"from-go")
    peer = d.dev.peer(lab.go_key.node_public())
    assert peer is not None and peer.current is not None and not peer.current.is_initiator
    got = d.ping4(5)  # we answer as responder
    assert len(got) == 1 and is_echo_reply_v4(got[0], 5)
    assert not d.dev.drops


def test_our_cookie_reply_makes_wireguard_go_retry_with_mac2(lab: Lab) -> None:
    """Under load we answer wireguard-go's initiation with a cookie reply; its retransmission
    (REKEY_TIMEOUT later) carries a mac2 made with that cookie, which we accept."""
    d = Driver(lab, under_load=True)
    _sh("ip", "netns", "exec", lab.ns, "python3", "-c",
        "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM)"
        ".sendto(b'from-go', ('10.99.0.2', 9999))")
    (pkt,) = d.pump(timeout=10.0)
    assert pkt.endswith(b"from-go")
    assert d.dev.drops == {"under_load": 1}  # the first initiation got a cookie reply


def test_rekey_initiated_by_us_is_accepted(lab: Lab) -> None:
    d = Driver(lab)
    assert d.ping4(1)
    peer = d.dev.peer(lab.go_key.node_public())
    assert peer is not None
    first = peer.current
    d.offset = 121.0  # REKEY_AFTER_TIME passed for the core; wall clock (TAI64N) is real
    time.sleep(0.05)  # past wireguard-go's per-peer initiation rate limit
    out = d.dev.send_packet(icmp_echo("10.99.0.2", "10.99.0.1", 2), d.now())
    assert [t.data[0] for t in out] == [4, 1]  # data on the old session, then an initiation
    d.send(out)
    got = d.pump(want=1)
    assert got and is_echo_reply_v4(got[0], 2)
    d.pump(want=99, timeout=1.0)  # let the response arrive
    assert peer.current is not first and peer.previous is first
    got = d.ping4(3)
    assert got and is_echo_reply_v4(got[0], 3)
    assert not d.dev.drops


def test_inner_source_outside_allowed_ips_dropped(lab: Lab) -> None:
    """wireguard-go only checks destinations when sending; our allowed-IPs check on the inner
    source drops what its host sends from an address we did not allow for that peer."""
    d = Driver(lab)
    assert d.ping4(1)
    _sh("ip", "-n", lab.ns, "addr", "add", "10.99.0.5/32", "dev", "lo")
    _sh("ip", "netns", "exec", lab.ns, "python3", "-c",
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM);"
        "s.bind(('10.99.0.5', 0)); s.sendto(b'spoof', ('10.99.0.2', 9999))")
    assert d.pump(timeout=2.0) == []
    assert d.dev.drops == {"bad_source": 1}
