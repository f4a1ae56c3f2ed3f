"""The in-memory twin: same NAT table as the lab (same assertion helper), impairment, determinism.

No root, no real time: everything runs on the twin's simulated clock.
"""

from __future__ import annotations

import statistics

import pytest

from relaymesh.lab import NAT_KINDS, Topology
from relaymesh.lab.natcheck import EXPECTED, assert_nat_kind, classify
from relaymesh.lab.topologies import nat_pair
from relaymesh.lab.twin import (
    UDP_UNREPLIED_TIMEOUT,
    EventLoop,
    SimSocket,
    TwinNetwork,
    UdpSocketLike,
)

SHORT = {"none": "none", "firewall": "fw", "easy": "easy", "hard": "hard", "one2one": "o2o",
         "udp-blocked": "ub"}


def _all_kinds(seed: int = 0) -> TwinNetwork:
    topo = Topology("kinds")
    for kind in NAT_KINDS:
        topo.add_network("n_" + SHORT[kind], nat=kind)
        topo.add_host("h_" + SHORT[kind], network="n_" + SHORT[kind])
    topo.add_host("r")
    return TwinNetwork(topo, seed=seed)


@pytest.mark.parametrize("kind", NAT_KINDS)
def test_twin_nat_kind_matches_the_table(kind: str) -> None:
    net = _all_kinds()
    host = "h_" + SHORT[kind]
    obs = net.nat_check(host, local_port=41641)
    assert_nat_kind(kind, obs, public_ip=net.public_address(host))


@pytest.mark.parametrize("kind", NAT_KINDS)
def test_assertion_helper_rejects_every_other_kind(kind: str) -> None:
    # The shared helper must be able to fail: a kind's observation fails every differing row.
    net = _all_kinds()
    obs = net.nat_check("h_" + SHORT[kind], local_port=41641)
    for other in NAT_KINDS:
        if EXPECTED[other] != EXPECTED[kind]:
            with pytest.raises(AssertionError):
                assert_nat_kind(other, obs)


@pytest.mark.parametrize("kind", NAT_KINDS)
def test_twin_unsolicited_inbound(kind: str) -> None:
    net = _all_kinds()
    host = "h_" + SHORT[kind]
    rx = net.socket(host, 45000)
    tx = net.socket("r")
    tx.sendto(b"knock", (net.public_address(host), 45000))
    net.run_for(1.0)
    assert (rx.recv() is not None) is (kind in ("none", "one2one"))


def _punch(net: TwinNetwork, a: str, b: str) -> bool:
    ma = net.nat_check(a, local_port=41641).mapped1
    mb = net.nat_check(b, local_port=41641).mapped1
    assert ma and mb
    sa, sb = net.socket(a, 41641), net.socket(b, 41641)
    for _ in range(10):
        sa.sendto(b"punch", mb)
        sb.sendto(b"punch", ma)
        net.run_for(0.1)
    return sa.recv() is not None and sb.recv() is not None


def test_twin_hole_punching_easy_works_hard_fails() -> None:
    assert _punch(TwinNetwork(nat_pair("easy", "easy")), "a", "b")
    assert not _punch(TwinNetwork(nat_pair("hard", "hard")), "a", "b")
    assert _punch(TwinNetwork(nat_pair("easy", "one2one")), "a", "b")


def test_easy_mapping_expires_after_conntrack_timeout() -> None:
    net = TwinNetwork(nat_pair("easy", "easy"))
    a = net.socket("a", 41641)
    srv = net.socket("srv", 3000)
    a.sendto(b"out", (net.address("srv"), 3000))
    net.run_for(0.1)
    got = srv.recv()
    assert got is not None
    public = got[1]
    srv.sendto(b"back", public)
    net.run_for(0.1)
    assert a.recv() is not None
    # A replied flow lives 120 s; silence longer than that closes it.
    net.run_for(121)
    srv.sendto(b"late", public)
    net.run_for(0.1)
    assert a.recv() is None
    assert UDP_UNREPLIED_TIMEOUT == 30.0


def test_firewall_exception_opens_one_port_to_one_host() -> None:
    topo = Topology("exc")
    topo.add_network("lan", nat="easy")
    topo.add_host("a", network="lan")
    topo.add_host("b", network="lan")
    topo.add_host("r")
    topo.add_port_forward("lan", "a", 41641)
    net = TwinNetwork(topo)
    a1, a2, b1 = net.socket("a", 41641), net.socket("a", 41642), net.socket("b", 41641)
    r = net.socket("r")
    for port in (41641, 41642):
        r.sendto(b"k", (net.public_address("a"), port))
    net.run_for(1)
    assert a1.recv() is not None
    assert a2.recv() is None and b1.recv() is None


def _rtts(net: TwinNetwork, host: str, n: int, interval: float) -> tuple[list[float], int]:
    echo = net.socket("r", 7000)
    echo.set_receiver(lambda d, src: echo.sendto(d, src))
    s = net.socket(host)
    sent_at: dict[int, float] = {}
    rtts: list[float] = []
    s.set_receiver(lambda d, src: rtts.append(net.now - sent_at[int(d)]))
    for i in range(n):
        sent_at[i] = net.now
        s.sendto(str(i).encode(), (net.address("r"), 7000))
        net.run_for(interval)
    net.run_for(2.0)
    return rtts, n


def test_twin_delay_jitter_and_loss() -> None:
    topo = Topology("imp")
    topo.add_network("lan", nat="easy")
    topo.add_host("slow", network="lan")
    topo.add_host("jit")
    topo.add_host("lossy")
    topo.add_host("r")
    topo.set_impairment("slow", delay_ms=40)
    topo.set_impairment("jit", delay_ms=30, jitter_ms=10)
    topo.set_impairment("lossy", loss_pct=10)
    net = TwinNetwork(topo, seed=7)
    rtts, _ = _rtts(net, "slow", 50, 0.01)
    assert len(rtts) == 50
    assert 40 * 0.8 <= statistics.median(rtts) * 1000 <= 40 * 1.2
    rtts, _ = _rtts(TwinNetwork(topo, seed=7), "jit", 200, 0.005)
    ms = [x * 1000 for x in rtts]
    assert min(ms) >= 20 and max(ms) <= 41 and statistics.pstdev(ms) > 3
    rtts, n = _rtts(TwinNetwork(topo, seed=7), "lossy", 2000, 0.001)
    loss = 100 * (n - len(rtts)) / n
    assert 7 <= loss <= 13


def test_same_seed_same_run_different_seed_different_ports() -> None:
    def ports(seed: int) -> tuple[object, ...]:
        net = TwinNetwork(nat_pair("hard", "hard"), seed=seed)
        o = net.nat_check("a", local_port=41641)
        return (o.mapped1, o.mapped2)

    assert ports(1) == ports(1)
    assert ports(1) != ports(2)


def test_sim_socket_is_a_udp_socket_like_and_queues_or_calls_back() -> None:
    net = TwinNetwork(nat_pair("none", "none"))
    a, b = net.socket("a", 1000), net.socket("b", 2000)
    assert isinstance(a, UdpSocketLike) and isinstance(a, SimSocket)
    assert a.local_addr == (net.address("a"), 1000)
    a.sendto(b"one", b.local_addr)
    net.run_for(0.01)
    assert b.recv() == (b"one", a.local_addr)
    seen: list[bytes] = []
    b.set_receiver(lambda d, src: seen.append(d))
    a.sendto(b"two", b.local_addr)
    net.run_for(0.01)
    assert seen == [b"two"] and b.recv() is None
    b.close()
    a.sendto(b"three", b.local_addr)
    net.run_for(0.01)
    assert net.stats.no_listener == 1
    with pytest.raises(OSError):
        b.sendto(b"x", a.local_addr)


def test_event_loop_runs_in_time_order_and_only_when_asked() -> None:
    loop = EventLoop()
    out: list[str] = []
    loop.call_later(2.0, lambda: out.append("late"))
    loop.call_later(1.0, lambda: out.append("early"))
    assert out == [] and loop.now == 0.0
    assert loop.run_for(1.5) is False
    assert out == ["early"] and loop.now == 1.5
    loop.run_for(1.0)
    assert out == ["early", "late"] and loop.pending == 0


def test_run_until_stops_at_the_event_that_satisfies_the_predicate() -> None:
    topo = Topology("p")
    topo.add_host("a")
    topo.add_host("b")
    topo.set_impairment("a", delay_ms=25)
    net = TwinNetwork(topo)
    a, b = net.socket("a"), net.socket("b", 9)
    a.sendto(b"x", b.local_addr)
    assert net.run_until(lambda: bool(b.inbox), timeout=1.0)
    assert 0.025 <= net.now < 0.03  # stopped at delivery, not at the timeout
    assert not net.run_until(lambda: False, timeout=0.5)


def test_classify_reports_address_dependent_filtering() -> None:
    from relaymesh.lab.natcheck import NatObservation

    obs = NatObservation(("10.0.0.2", 5), ("1.2.3.4", 5), ("1.2.3.4", 5), False, True)
    got = classify(obs)
    assert got.filtering == "address-dependent" and got.mapping == "endpoint-independent"


def test_twin_easy_port_clash_matches_linux() -> None:
    """Same scenario as the lab test: the second host on the same port loses only its port."""
    topo = Topology("clash")
    topo.add_network("lan", nat="easy")
    topo.add_host("a", network="lan")
    topo.add_host("b", network="lan")
    net = TwinNetwork(topo, seed=3)
    first = net.nat_check("a", local_port=41641)
    second = net.nat_check("b", local_port=41641)
    assert classify(first).mapping == "endpoint-independent"
    assert first.mapped1 == (net.public_address("a"), 41641)
    # The clash costs port preservation, not endpoint independence: the replacement port is the
    # same for both destinations.
    assert classify(second).mapping == "endpoint-independent"
    assert classify(second).port_preserved is False
    assert second.mapped1 is not None and second.mapped1[0] == first.mapped1[0]
