"""Each NAT kind behaves as its RFC 4787 row in docs/lab.md, observed with real packets.

The assertion helper (relaymesh.lab.natcheck.assert_nat_kind) is the same one the twin's unit
tests use against the simulated NATs.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from relaymesh.lab import NAT_KINDS, Lab, Topology
from relaymesh.lab.natcheck import assert_nat_kind, classify

pytestmark = pytest.mark.lab
LabFactory = Callable[..., Lab]
SHORT = {"none": "none", "firewall": "fw", "easy": "easy", "hard": "hard", "one2one": "o2o",
         "udp-blocked": "ub"}


@pytest.fixture
def all_kinds_lab(lab_factory: LabFactory) -> Lab:
    topo = Topology("kinds")
    for kind in NAT_KINDS:
        topo.add_network("n_" + SHORT[kind], nat=kind)
        topo.add_host(_host(kind), network="n_" + SHORT[kind])
    topo.add_host("r")  # an internet host for unsolicited inbound probes
    return lab_factory(topo)


def _host(kind: str) -> str:
    return "h_" + SHORT[kind]


@pytest.mark.parametrize("kind", NAT_KINDS)
def test_stun_observed_behaviour_matches_the_table(all_kinds_lab: Lab, kind: str) -> None:
    lab = all_kinds_lab
    obs = lab.nat_check(_host(kind), local_port=41641)
    assert_nat_kind(kind, obs, public_ip=lab.public_address(_host(kind)))
    if kind in ("none", "firewall"):
        assert obs.mapped1 == (lab.address(_host(kind)), 41641)


def _unsolicited_delivered(lab: Lab, host: str, port: int) -> bool:
    """Does a datagram from an internet host to (public address, port) reach a listener?"""
    rx = lab.spawn(host, ["python", "-m", "relaymesh.lab.probe", "udp-recv", "--port", str(port),
                          "--timeout", "0.6", "--max", "1"], name=f"rx{port}")
    rx.wait_for("ready")
    lab.python("r", ["udp-send", lab.public_address(host), str(port), "knock", "--repeat", "3"])
    rx.wait(10)
    return any(json.loads(ln)["data"] == "knock" for ln in rx.output().splitlines()
               if ln.startswith("{"))


@pytest.mark.parametrize("kind", NAT_KINDS)
def test_unsolicited_inbound_probe(all_kinds_lab: Lab, kind: str) -> None:
    # Only hosts with no filtering in front of them accept a flow the outside started.
    expected = kind in ("none", "one2one")
    assert _unsolicited_delivered(all_kinds_lab, _host(kind), 45000) is expected


@pytest.mark.parametrize("kind", ["firewall", "easy"])
def test_one_firewall_exception_opens_one_port_to_one_host(lab_factory: LabFactory,
                                                           kind: str) -> None:
    topo = Topology("exc")
    topo.add_network("lan", nat=kind)
    topo.add_host("a", network="lan")
    topo.add_host("b", network="lan")
    topo.add_host("r")
    topo.add_port_forward("lan", "a", 41641)
    lab = lab_factory(topo)
    assert _unsolicited_delivered(lab, "a", 41641)
    assert not _unsolicited_delivered(lab, "a", 41642)
    assert not _unsolicited_delivered(lab, "b", 41641)


def _punch(lab: Lab, a: str, b: str, port: int = 41641) -> bool:
    """Simultaneous open: each side sends to the other's STUN-mapped endpoint, both must hear."""
    ma = lab.nat_check(a, local_port=port).mapped1
    mb = lab.nat_check(b, local_port=port).mapped1
    assert ma and mb
    script = (
        "import socket,sys,time,select\n"
        "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.bind(('0.0.0.0',int(sys.argv[3])))\n"
        "dst=(sys.argv[1],int(sys.argv[2]));end=time.monotonic()+1.5;got=False\n"
        "while time.monotonic()<end and not got:\n"
        "  s.sendto(b'punch',dst)\n"
        "  r,_,_=select.select([s],[],[],0.1)\n"
        "  got=bool(r) and s.recvfrom(100)[0]==b'punch'\n"
        "for _ in range(5): s.sendto(b'punch',dst); time.sleep(0.05)\n"
        "print('GOT' if got else 'NONE')\n"
    )
    pa = lab.spawn(a, ["python", "-c", script, mb[0], str(mb[1]), str(port)], name="punch")
    pb = lab.spawn(b, ["python", "-c", script, ma[0], str(ma[1]), str(port)], name="punch")
    pa.wait(10)
    pb.wait(10)
    return "GOT" in pa.output() and "GOT" in pb.output()


def test_hole_punching_works_between_easy_nats_and_fails_between_hard(
        lab_factory: LabFactory) -> None:
    topo = Topology("punch")
    for kind in ("easy", "hard"):
        for side in ("x", "y"):
            topo.add_network(f"{kind}_{side}", nat=kind)
            topo.add_host(f"{kind[0]}{side}", network=f"{kind}_{side}")
    lab = lab_factory(topo)
    assert _punch(lab, "ex", "ey")
    # With endpoint-dependent mapping the STUN-learned ports are not the ones used towards the
    # peer, so neither side's packets match the other's filter.
    assert not _punch(lab, "hx", "hy")


def test_easy_port_clash_costs_port_preservation_not_eim(
        lab_factory: LabFactory) -> None:
    """Masquerade keeps a port only while (public ip, port, destination) is free.

    Two hosts behind one easy NAT probing from the same port: the first keeps its port for every
    destination; the second clashes and gets another port, the same one for every destination
    (measured on this kernel). The twin models the same
    (tests/unit/test_twin.py::test_twin_easy_port_clash_matches_linux).
    """
    topo = Topology("clash")
    topo.add_network("lan", nat="easy")
    topo.add_host("a", network="lan")
    topo.add_host("b", network="lan")
    lab = lab_factory(topo)
    first = lab.nat_check("a", local_port=41641)
    second = lab.nat_check("b", local_port=41641)
    assert classify(first).mapping == "endpoint-independent"
    assert first.mapped1 == (lab.public_address("a"), 41641)
    # The clash costs port preservation, not endpoint independence: the replacement port is the
    # same for both destinations.
    assert classify(second).mapping == "endpoint-independent"
    assert classify(second).port_preserved is False
    assert second.mapped1 is not None and second.mapped1[0] == first.mapped1[0]
