"""netcheck core driven over the in-memory twin (simulated NATs and clock, no root): every lab NAT
kind gives the answer the lab's own NAT classifier gives, and latency follows the link delay."""

from __future__ import annotations

from typing import Any

import pytest

from relaymesh.lab import NAT_KINDS, Topology
from relaymesh.lab.natcheck import EXPECTED, MAP_ED, classify
from relaymesh.lab.twin import STUN_ADDRS, STUN_PORT, TwinNetwork
from relaymesh.magicsock.netcheck import HttpProbe, Netcheck, Report, StunProbe

LOCAL_PORT = 41641


def twin_derp_map() -> dict[str, Any]:
    """Two regions, one STUN server each, on the twin's two STUN addresses."""
    return {"regions": [
        {"id": i, "code": f"r{i}", "nodes": [
            {"name": f"{i}a", "host": addr, "derp_port": 443, "stun_port": STUN_PORT}]}
        for i, addr in enumerate(STUN_ADDRS, start=1)]}


def run_on_twin(net: TwinNetwork, host: str) -> tuple[Netcheck, Report]:
    """A synchronous shell on the twin's clock (the twin has no TCP: HTTP probes fail)."""
    net.start_stun()
    sock = net.socket(host, LOCAL_PORT)
    core = Netcheck(twin_derp_map(), families=(4,))

    def on_rx(data: bytes, src: tuple[str, int]) -> None:
        core.receive(data, src, net.now)

    sock.set_receiver(on_rx)

    def dispatch(actions: list[StunProbe | HttpProbe]) -> None:
        for a in actions:
            if isinstance(a, StunProbe):
                sock.sendto(a.packet, a.dest)
            else:
                core.http_result(a, None, net.now)

    try:
        dispatch(core.start(net.now))
        for _ in range(100):  # bounded: a check has a handful of deadlines
            if core.done():
                break
            deadline = core.next_deadline()
            assert deadline is not None
            net.loop.run_until(deadline, stop=core.all_answered)
            dispatch(core.poll(net.now))
        assert core.done()
        return core, core.report()
    finally:
        sock.close()


def one_host(kind: str, delay_ms: float = 0.0) -> TwinNetwork:
    topo = Topology("netcheck")
    topo.add_network("lan", nat=kind)
    topo.add_host("h", network="lan")
    if delay_ms:
        topo.set_impairment("h", delay_ms=delay_ms)
    return TwinNetwork(topo, seed=7)


@pytest.mark.parametrize("kind", NAT_KINDS)
def test_every_nat_kind_agrees_with_the_lab_classifier(kind: str) -> None:
    net = one_host(kind)
    _, report = run_on_twin(net, "h")
    observed = classify(one_host(kind).nat_check("h", local_port=LOCAL_PORT))
    if kind == "udp-blocked":
        assert report.udp is False and report.global_v4 is None
        assert report.mapping_varies_by_dest is None
        assert report.region_latency_ms == {}  # no UDP, and no TCP in the twin
        return
    assert report.udp is True
    assert report.mapping_varies_by_dest is (observed.mapping == MAP_ED)
    assert report.mapping_varies_by_dest is (kind == "hard")
    assert report.global_v4 is not None
    ip, port = report.global_v4.rsplit(":", 1)
    assert ip == net.public_address("h")
    if EXPECTED[kind].port_preserved or EXPECTED[kind].mapping == "none":
        assert int(port) == LOCAL_PORT
    assert set(report.region_latency_ms) == {1, 2}
    assert report.region_latency_via == {1: "stun", 2: "stun"}


def test_latency_follows_the_uplink_delay() -> None:
    _, fast = run_on_twin(one_host("easy"), "h")
    _, slow = run_on_twin(one_host("easy", delay_ms=40.0), "h")
    assert all(ms < 5.0 for ms in fast.region_latency_ms.values())
    assert all(40.0 <= ms < 45.0 for ms in slow.region_latency_ms.values())


def test_a_lossy_uplink_still_gets_answers_through_retransmits() -> None:
    topo = Topology("lossy")
    topo.add_network("lan", nat="easy")
    topo.add_host("h", network="lan")
    topo.set_impairment("h", loss_pct=50.0)
    core, report = run_on_twin(TwinNetwork(topo, seed=3), "h")
    assert core.counters["stun_sent"] > 2  # something was lost and sent again
    assert report.udp is True
