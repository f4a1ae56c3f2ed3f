"""Issue 5, real processes: the node picks its home DERP region by latency and reports it.

Two regions, one DERP server each: region 1 on ``srv`` (which also runs control) behind a 40 ms
uplink delay, region 2 on ``srv2`` without delay. A node connects to region 1 first (the lowest
id: reachable before anything is measured), then netcheck over its own socket finds region 2
faster, the node moves home there and reports ``home_derp: 2`` to the control server, which its
peer sees in its network map and uses to reach it over DERP.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from relaymesh.lab import LabFactory
from relaymesh.lab.grid import SERVER_HOST, MeshLab, derp_map, pair_topology, until

pytestmark = pytest.mark.lab

SLOW_MS = 40.0


@pytest.fixture(scope="module")
def mesh(
    tmp_path_factory: pytest.TempPathFactory, module_lab_factory: LabFactory
) -> Iterator[MeshLab]:
    topo = pair_topology([("udp-blocked", "easy")], extra_hosts=["srv2"], name="derphome")
    topo.set_impairment(SERVER_HOST, delay_ms=SLOW_MS)
    lab = module_lab_factory(topo)
    m = MeshLab(lab, tmp_path_factory.mktemp("derphome"))
    m.start_derp("1a", SERVER_HOST)
    m.start_derp("2a", "srv2")
    m.start_control(derp_map([(1, [("1a", lab.address(SERVER_HOST))]),
                              (2, [("2a", lab.address("srv2"))])]))
    m.start_nodes(["a0", "b0"])
    yield m


def test_home_region_follows_latency_and_peers_reach_it_there(mesh: MeshLab) -> None:
    for n in ("a0", "b0"):
        until(lambda n=n: mesh.status(n)["self"]["home_derp"] == 2, 15, f"{n} home region 2")
    # the control server passed it on: each side knows the other's home region
    until(lambda: (mesh.peer("a0", "b0") or {}).get("home_derp") == 2, 10, "b0's home in a0's map")
    report = json.loads(mesh.cli("a0", "netcheck", "--json").stdout)
    lat = report["region_latency_ms"]
    assert report["preferred_region"] == 2 and lat["1"] > lat["2"] + SLOW_MS / 2, report
    # A has no UDP: it reaches B over DERP in B's (and its own) home region 2
    r = mesh.echo("a0", "b0", deadline=15)
    assert r["ok"], r
    assert mesh.peer("a0", "b0")["via"] == "derp(2)"  # type: ignore[index]
    conns = mesh.status("a0")["derp"]["connections"]
    assert conns["2"]["connected"]
