"""netcheck behind real nftables NATs: a real DERP server (STUN + /derp/probe) on an internet host
and the lab's STUN responder give every NAT kind the report it should (root, namespaces)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from relaymesh.lab import Lab, Topology
from relaymesh.lab.natcheck import MAP_ED, classify

pytestmark = pytest.mark.lab
LabFactory = Callable[..., Lab]
KINDS = {"none": "none", "easy": "easy", "hard": "hard", "udp-blocked": "ub"}
DERP_PORT = 3340
STUN_PORT = 3478


@pytest.fixture
def netcheck_lab(lab_factory: LabFactory, tmp_path: Path) -> tuple[Lab, Path]:
    topo = Topology("netcheck")
    for kind, short in KINDS.items():
        topo.add_network("n_" + short, nat=kind)
        topo.add_host("h_" + short, network="n_" + short)
    topo.add_host("srv")
    lab = lab_factory(topo)
    srv = lab.address("srv")
    derp = lab.spawn("srv", [sys.executable, "-m", "relaymesh", "derp", "serve", "--listen",
                             f"{srv}:{DERP_PORT}", "--stun-port", str(STUN_PORT),
                             "--state-dir", str(tmp_path / "derp")], name="derp")
    derp.wait_for("STUN on udp")
    s1, _ = lab.start_stun()
    derp_map: dict[str, Any] = {"regions": [
        {"id": 1, "code": "srv", "nodes": [{"name": "1a", "host": srv, "derp_port": DERP_PORT,
                                            "stun_port": STUN_PORT, "tls": False}]},
        # STUN only (nothing listens on its DERP port): a second destination for the mapping
        {"id": 2, "code": "stun", "nodes": [{"name": "2a", "host": s1[0], "derp_port": 9,
                                             "stun_port": s1[1], "tls": False}]},
    ]}
    path = tmp_path / "derp.json"
    path.write_text(json.dumps(derp_map))
    return lab, path


def _netcheck(lab: Lab, host: str, derp_map: Path) -> dict[str, Any]:
    cp = lab.exec(host, [sys.executable, "-m", "relaymesh.magicsock.netcheck_io", str(derp_map),
                         "--json", "--bind", "0.0.0.0:41641"], check=False, timeout=30)
    assert cp.stdout.strip(), cp.stderr
    out: dict[str, Any] = json.loads(cp.stdout)
    return out


@pytest.mark.parametrize("kind", list(KINDS))
def test_netcheck_report_per_nat_kind(netcheck_lab: tuple[Lab, Path], kind: str) -> None:
    lab, derp_map = netcheck_lab
    host = "h_" + KINDS[kind]
    r = _netcheck(lab, host, derp_map)
    if kind == "udp-blocked":
        assert r["udp"] is False and r["global_v4"] is None
        assert r["mapping_varies_by_dest"] is None
        # TCP still passes: the real DERP server's /derp/probe gives region 1 a latency
        assert r["region_latency_via"] == {"1": "http"}
        assert r["preferred_region"] == 1
        return
    assert r["udp"] is True
    assert r["global_v4"].rsplit(":", 1)[0] == lab.public_address(host)
    assert r["mapping_varies_by_dest"] is (kind == "hard")
    # the lab's own classifier agrees on the same host
    assert r["mapping_varies_by_dest"] is (classify(lab.nat_check(host)).mapping == MAP_ED)
    assert r["region_latency_via"] == {"1": "stun", "2": "stun"}
    assert r["preferred_region"] in (1, 2)
