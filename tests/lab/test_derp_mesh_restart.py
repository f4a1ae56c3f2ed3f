"""Issue 5 acceptance 3, real processes: meshed DERP servers and a DERP server restart.

One lab: A and B each behind a ``udp-blocked`` NAT (DERP is their only path), control + DERP
server ``1a`` on ``srv``, DERP server ``1b`` on ``srv2``; both servers in region 1, meshed with a
pre-shared key. A is pinned to 1a and B to 1b (``daemon --derp-node``), so every packet between
them crosses the mesh.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from relaymesh.lab import LabFactory
from relaymesh.lab.grid import (
    DERP_PORT,
    SERVER_HOST,
    MeshLab,
    derp_map,
    pair_topology,
    until,
)

pytestmark = pytest.mark.lab

RESUME_DEADLINE = 5.0  # issue 5: traffic resumes within 5 s of a DERP server restart


def _url(mesh: MeshLab, host: str) -> str:
    return f"http://{mesh.lab.address(host)}:{DERP_PORT}/derp"


@pytest.fixture(scope="module")
def mesh(
    tmp_path_factory: pytest.TempPathFactory, module_lab_factory: LabFactory
) -> Iterator[MeshLab]:
    lab = module_lab_factory(pair_topology([("udp-blocked", "udp-blocked")], extra_hosts=["srv2"],
                        name="derpmesh"))
    root = tmp_path_factory.mktemp("derpmesh")
    m = MeshLab(lab, root)
    key = root / "mesh.key"
    key.write_text("lab-mesh-key-" + lab.run_id + "\n")
    m.start_derp("1a", SERVER_HOST, mesh_with=[_url(m, "srv2")], mesh_key=key)
    m.start_derp("1b", "srv2", mesh_with=[_url(m, SERVER_HOST)], mesh_key=key)
    m.start_control(derp_map([(1, [("1a", lab.address(SERVER_HOST)),
                                   ("1b", lab.address("srv2"))])]))
    m.start_nodes(["a0", "b0"], derp_node={"a0": "1a", "b0": "1b"})
    yield m


def _server_of(mesh: MeshLab, node: str) -> str:
    conns = mesh.status(node)["derp"]["connections"]
    return str(conns["1"]["url"])


def test_nodes_on_two_meshed_servers_talk_over_derp(mesh: MeshLab) -> None:
    assert _server_of(mesh, "a0") == f"{mesh.lab.address(SERVER_HOST)}:{DERP_PORT}"
    assert _server_of(mesh, "b0") == f"{mesh.lab.address('srv2')}:{DERP_PORT}"
    r = mesh.echo("a0", "b0", deadline=15)
    assert r["ok"], r
    assert mesh.path("a0", "b0") == "derp" and mesh.path("b0", "a0") == "derp"
    assert "via derp(1)" in mesh.cli("b0", "ping", "-c", "1", "a0").stdout


def test_traffic_resumes_within_5s_of_a_derp_server_restart(mesh: MeshLab) -> None:
    assert mesh.echo("a0", "b0", deadline=15)["ok"]
    old = mesh.derps.pop("1a")
    old.stop()
    assert not old.alive
    key = mesh.root / "mesh.key"
    t0 = time.monotonic()
    mesh.start_derp("1a", SERVER_HOST, mesh_with=[_url(mesh, "srv2")], mesh_key=key)
    until(lambda: mesh.status("a0")["derp"]["connections"]["1"]["connected"], RESUME_DEADLINE,
          "a0 reconnected to 1a")
    left = RESUME_DEADLINE - (time.monotonic() - t0)
    r = mesh.echo("a0", "b0", deadline=max(left, 0.5), each=0.5)
    assert r["ok"], f"no echo within {RESUME_DEADLINE} s of the restart: {r}"
    assert time.monotonic() - t0 < RESUME_DEADLINE + 1.0  # + the echo's own process start
