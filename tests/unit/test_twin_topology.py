"""The Topology data model shared by the lab and the twin: validation, TOML, default topologies."""

from __future__ import annotations

from pathlib import Path

import pytest

from relaymesh.lab import Topology, TopologyError
from relaymesh.lab.topologies import BUILTIN, TOML_DIR, load, nat_pair


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_builtin_functions_equal_their_toml_files(name: str) -> None:
    assert Topology.from_toml(TOML_DIR / f"{name}.toml") == BUILTIN[name]()


def test_toml_round_trip_keeps_everything(tmp_path: Path) -> None:
    topo = Topology("rt")
    topo.add_network("lan", nat="firewall")
    topo.add_host("a", network="lan")
    topo.add_host("r")
    topo.set_impairment("a", delay_ms=20, jitter_ms=5, loss_pct=0.5, rate_mbit=50)
    topo.add_port_forward("lan", "a", 41641)
    path = tmp_path / "rt.toml"
    path.write_text(topo.to_toml())
    back = Topology.from_toml(path)
    assert back == topo
    assert back.impairments["a"].rate_mbit == 50
    assert back.networks["lan"].forwards[0].port == 41641


def test_load_accepts_names_and_nat_pair_kinds() -> None:
    t = load("nat_pair:hard,one2one")
    assert t.nat_of("a") == "hard" and t.nat_of("b") == "one2one" and t.nat_of("srv") is None
    assert load("relay").nat_of("a") == "hard"
    with pytest.raises(TopologyError, match="built-in"):
        load("nope")
    with pytest.raises(TopologyError, match="two NAT kinds"):
        load("nat_pair:easy")


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda t: t.add_network("lan", nat="symmetric"), "unknown NAT kind"),
        (lambda t: t.add_host("a", network="missing"), "unknown network"),
        (lambda t: t.add_host("Bad-Name"), "must match"),
        (lambda t: t.add_host("averyveryverylongname"), "must match"),
        (lambda t: t.add_host("inet"), "reserved"),
        (lambda t: (t.add_host("a"), t.add_host("a")), "already used"),
        (lambda t: (t.add_host("a"), t.set_impairment("a", delay_ms=5, jitter_ms=6)), "jitter"),
        (lambda t: (t.add_host("a"), t.set_impairment("a", loss_pct=101)), "loss_pct"),
        (lambda t: t.set_impairment("ghost", delay_ms=1), "unknown host"),
        (lambda t: (t.add_network("l", nat="udp-blocked"), t.add_host("a", network="l"),
                    t.add_port_forward("l", "a", 1)), "udp-blocked"),
        (lambda t: (t.add_network("l"), t.add_host("a"), t.add_port_forward("l", "a", 1)),
         "not on network"),
    ],
)
def test_invalid_topologies_are_rejected(build: object, match: str) -> None:
    topo = Topology("bad")
    with pytest.raises(TopologyError, match=match):
        build(topo)  # type: ignore[operator]


def test_bad_toml_is_one_clear_error(tmp_path: Path) -> None:
    p = tmp_path / "x.toml"
    p.write_text("[hosts.a\n")
    with pytest.raises(TopologyError, match="invalid TOML"):
        Topology.from_toml(p)
    p.write_text("[hosts.a]\nimpairment = {delay = 5}\n")
    with pytest.raises(TopologyError, match="bad impairment"):
        Topology.from_toml(p)
    with pytest.raises(TopologyError, match="cannot read"):
        Topology.from_toml(tmp_path / "missing.toml")


def test_nat_pair_shape() -> None:
    t = nat_pair("easy", "hard")
    assert [h.name for h in t.hosts_on(None)] == ["srv"]
    assert [h.name for h in t.hosts_on("lan_b")] == ["b"]


def test_add_host_behind_puts_each_host_on_its_own_natted_lan_or_the_internet() -> None:
    topo = Topology("behind")
    topo.add_host_behind("a", "hard")
    topo.add_host_behind("r", None)
    assert topo.hosts["a"].network == "na" and topo.networks["na"].nat == "hard"
    assert topo.hosts["r"].network is None and "nr" not in topo.networks
    with pytest.raises(TopologyError):
        topo.add_host_behind("b", "no-such-nat")
