"""Fuzz Device.receive with random and mutated valid datagrams (hypothesis).

Invariant per datagram: nothing escapes; it is either accepted (an authenticated peer comes back
and no drop is counted) or exactly one drop counter goes up and no plaintext comes out. The example
count comes from RELAYMESH_FUZZ_EXAMPLES (default 300 so CI stays brief; `make fuzz` sets it large).
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relaymesh.wireguard.testing import MemoryNet, Node, ipv4_packet, ipv6_packet

EXAMPLES = int(os.environ.get("RELAYMESH_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck)
)


def build(under_load: bool) -> tuple[MemoryNet, Node, Node, list[bytes]]:
    """A connected pair and a corpus of valid datagrams of every type addressed to b."""
    net = MemoryNet()
    a = net.add("a")
    b = net.add("b", under_load=lambda: under_load)
    net.link(a, b, ["10.0.0.1/32", "fd00::1/128"], ["10.0.0.2/32", "fd00::2/128"])
    corpus: list[bytes] = []
    (init,) = a.device.send_packet(ipv4_packet("10.0.0.1", "10.0.0.2", b"x"), net.now)
    corpus.append(init.data)
    if under_load:  # get a cookie so that a's next initiation carries mac2
        r = b.device.receive(init.data, a.endpoint, net.now)
        a.device.receive(r.transmits[0].data, b.endpoint, net.now)
        net.now += 5.5
        (init,) = a.device.tick(net.now)
        corpus.append(init.data)
    r = b.device.receive(init.data, a.endpoint, net.now)
    (resp,) = r.transmits
    corpus.append(resp.data)  # a response (b -> a) is also junk for b: wrong direction
    r2 = a.device.receive(resp.data, b.endpoint, net.now)
    corpus.extend(t.data for t in r2.transmits)  # the flushed data packet
    for i in range(4):
        for pkt in (ipv4_packet("10.0.0.1", "10.0.0.2", bytes(i * 7)),
                    ipv6_packet("fd00::1", "fd00::2", b"v6" * i),
                    ipv4_packet("10.9.9.9", "10.0.0.2", b"spoofed source")):
            corpus.extend(t.data for t in a.device.send_packet(pkt, net.now))
    # a cookie reply b could receive: from a device under load answering b
    c = MemoryNet().add("c", under_load=lambda: True)
    c.device.set_peer(b.key.node_public(), allowed_ips=["10.0.0.2/32"])
    b.device.set_peer(c.key.node_public(), allowed_ips=["10.3.0.0/16"], endpoint=c.endpoint)
    (binit,) = b.device.initiate_handshake(c.key.node_public(), net.now)
    corpus.append(binit.data)
    corpus.extend(t.data for t in c.device.receive(binit.data, b.endpoint, net.now).transmits)
    assert {d[0] for d in corpus} == {1, 2, 3, 4}
    b.device.drops.clear()
    return net, a, b, corpus


@st.composite
def mutated(draw: Any, corpus: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(corpus)))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "extend", "type", "splice"]))
        if op == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        elif op == "truncate":
            del data[draw(st.integers(0, len(data))):]
        elif op == "extend":
            data += draw(st.binary(max_size=40))
        elif op == "type" and data:
            data[0] = draw(st.integers(0, 6))
        elif op == "splice":
            other = draw(st.sampled_from(corpus))
            cut = draw(st.integers(0, min(len(data), len(other))))
            data = data[:cut] + bytearray(other[cut:])
    return bytes(data)


def check_one(node: Node, datagram: bytes, now: float) -> None:
    before = sum(node.device.drops.values())
    r = node.device.receive(datagram, ("a", 51820), now)  # must not raise
    delta = sum(node.device.drops.values()) - before
    assert node.device.drops["internal_error"] == 0
    assert delta in (0, 1)
    if delta == 1:
        assert r.packets == []
    else:
        assert r.peer is not None  # accepted only when authenticated
        for p in r.packets:
            assert p[0] >> 4 in (4, 6)


@pytest.mark.timeout(0)  # `make fuzz` runs 200k examples: longer than the suite's 300 s limit
@pytest.mark.parametrize("under_load", [False, True])
def test_fuzz_receive(under_load: bool) -> None:
    net, _a, b, corpus = build(under_load)
    datagrams = st.one_of(st.binary(max_size=200), st.sampled_from(corpus), mutated(corpus))
    clock = {"now": net.now}

    @FUZZ
    @given(datagrams, st.floats(0, 1.0))
    def run(datagram: bytes, dt: float) -> None:
        clock["now"] += dt
        check_one(b, datagram, clock["now"])
        # the shell hands in memoryviews of a reused, writable receive buffer
        check_one(b, memoryview(bytearray(datagram)), clock["now"])

    run()
