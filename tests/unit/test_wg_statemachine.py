"""Two Devices under a random schedule of sends, clock jumps, loss, duplication and reordering.

Safety: no packet is ever delivered twice or altered, and nothing raises. Liveness: once the network
behaves again, fresh packets get through both ways. This walks the handshake/rekey/timer state
machine through orders no hand-written test thinks of (simultaneous initiations, lost responses,
rekeys racing data, expiry).
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relaymesh.wireguard.testing import MemoryNet, Node, ipv4_packet

EXAMPLES = max(30, int(os.environ.get("RELAYMESH_FUZZ_EXAMPLES", "300")) // 10)

step = st.one_of(
    st.tuples(st.just("send"), st.sampled_from(["a", "b"]), st.integers(1, 3)),
    st.tuples(st.just("advance"), st.sampled_from([0.01, 1, 5.2, 10, 15.5, 60, 121, 181])),
    st.tuples(st.just("deliver"), st.sampled_from(["all", "shuffle", "drop_one", "dup_one"])),
)


def packet(src: Node, seq: int) -> bytes:
    s, d = ("10.0.0.1", "10.0.0.2") if src.name == "a" else ("10.0.0.2", "10.0.0.1")
    return ipv4_packet(s, d, f"{src.name}:{seq}".encode())


@pytest.mark.timeout(0)  # scales with RELAYMESH_FUZZ_EXAMPLES (large under `make fuzz`)
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(step, max_size=40), st.randoms(use_true_random=False))
def test_random_schedules_are_safe_and_recover(steps: list[Any], rnd: Any) -> None:
    net = MemoryNet()
    a, b = net.add("a"), net.add("b")
    net.link(a, b, ["10.0.0.1/32"], ["10.0.0.2/32"])
    nodes = {"a": a, "b": b}
    seq = 0
    sent: set[bytes] = set()
    for s in steps:
        if s[0] == "send":
            for _ in range(s[2]):
                seq += 1
                p = packet(nodes[s[1]], seq)
                sent.add(p)
                net.send(nodes[s[1]], p)
        elif s[0] == "advance":
            net.now += s[1]
            net.tick()
        elif s[1] == "all":
            net.deliver(max_rounds=1)
        elif s[1] == "shuffle":
            rnd.shuffle(net.in_flight)
            net.deliver(max_rounds=1)
        elif s[1] == "drop_one" and net.in_flight:
            net.in_flight.pop(rnd.randrange(len(net.in_flight)))
        elif s[1] == "dup_one" and net.in_flight:
            net.in_flight.append(rnd.choice(net.in_flight))
    # safety so far
    for n in (a, b):
        assert len(n.inbox) == len(set(n.inbox)), "a packet was delivered twice"
        assert set(n.inbox) <= sent
        assert n.device.drops["internal_error"] == 0
    # liveness: a reliable network from now on; within a few retransmission rounds both ways work
    probe_a, probe_b = packet(a, 10_000), packet(b, 10_001)
    net.send(a, probe_a)
    net.send(b, probe_b)
    for _ in range(40):
        net.deliver()
        if probe_a in b.inbox and probe_b in a.inbox:
            break
        net.now += 1.0
        net.tick()
    assert probe_a in b.inbox and probe_b in a.inbox, (a.device.drops, b.device.drops)
    for n in (a, b):
        assert len(n.inbox) == len(set(n.inbox))
