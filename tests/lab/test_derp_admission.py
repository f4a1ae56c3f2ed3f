"""Issue 5, real processes: a standalone DERP server admits only the coordination server's tailnet.

Lab ``mesh``: A and B each behind a ``udp-blocked`` NAT (DERP is their only path), control and
DERP server ``1a`` on ``srv``. The DERP server runs ``relaymesh derp serve --admission-url
http://srv:8080 --admission-token-file <control state>/derp-admission.token``, so it learns who is
in the tailnet by polling ``GET /derp/v1/nodes`` (control-protocol.md §4), every 2 s.

Lab ``embedded``: the same, but no DERP process: ``relaymesh control serve --derp`` serves DERP
region 900 itself, admission fed straight from its hot state (no polling), key pinned by the map.
"""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Iterator

import pytest

from relaymesh.derp.admission import CONTROL_POLL_INTERVAL_S
from relaymesh.derp.metrics import parse_prometheus_text, sample
from relaymesh.keys import PrivateKey
from relaymesh.lab import LabFactory
from relaymesh.lab.grid import DERP_PORT, SERVER_HOST, MeshLab, derp_map, pair_topology, until
from relaymesh.lab.lab import LabProcess

pytestmark = pytest.mark.lab

# A node deleted from the tailnet is cut by DERP within one poll (+ the poll's own round trip
# and the eviction); 2 polls leave room for a busy 2-core machine without hiding a missed poll.
DROP_DEADLINE = 2 * CONTROL_POLL_INTERVAL_S + 1.0
# The embedded DERP is told synchronously inside the delete request: only process and scheduling
# slack remains (the holder polls its own state every 50 ms).
EMBEDDED_DROP_DEADLINE = 1.0

# A raw DerpClient with a fresh key (never registered): prints what the server said.
STRANGER = textwrap.dedent("""
    import asyncio, json, sys
    from relaymesh.derp.client import DerpClient, DerpRefusedError
    from relaymesh.keys import PrivateKey
    async def main():
        c = DerpClient(sys.argv[1], PrivateKey.generate())
        try:
            await c.connect()
            return {"connected": True}
        except DerpRefusedError as e:
            return {"connected": False, "refused": str(e)}
        finally:
            await c.close()
    print(json.dumps(asyncio.run(main())))
""")

# A raw DerpClient with a given node key (b's, from its daemon's state dir): connects, then
# reports when the server drops it (bounded: 60 s).
HOLDER = textwrap.dedent("""
    import asyncio, sys, time
    from relaymesh.derp.client import DerpClient, DerpRefusedError
    from relaymesh.keys import PrivateKey
    async def main():
        key = PrivateKey.parse(open(sys.argv[2]).read().strip())
        c = DerpClient(sys.argv[1], key)
        try:
            await c.connect()
        except DerpRefusedError as e:
            print("refused:", e, flush=True)
            return
        print("connected", flush=True)
        t0 = time.monotonic()
        while c.connected and time.monotonic() - t0 < 60:
            await asyncio.sleep(0.05)
        print("dropped:" if not c.connected else "still connected:", c.last_error, flush=True)
        await c.close()
    asyncio.run(main())
""")

METRICS = textwrap.dedent("""
    import sys, urllib.request
    print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())
""")


@pytest.fixture(scope="module")
def mesh(
    tmp_path_factory: pytest.TempPathFactory, module_lab_factory: LabFactory
) -> Iterator[MeshLab]:
    lab = module_lab_factory(pair_topology([("udp-blocked", "udp-blocked")], name="derpadm"))
    root = tmp_path_factory.mktemp("derpadm")
    m = MeshLab(lab, root)
    m.start_control(derp_map([(1, [("1a", lab.address(SERVER_HOST))])]))  # makes the token
    m.start_derp("1a", SERVER_HOST, admission=True)
    m.start_nodes(["a0", "b0"])
    # A node that dials DERP before the server's next poll saw it registered is refused once
    # and retries BACKOFF_MAX_S later: admitted within one poll + one retry.
    for n in ("a0", "b0"):
        until(lambda n=n: _derp_connected(m, n), 15.0, f"{n} connected to DERP", step=0.5)
    yield m


def _derp_url(mesh: MeshLab) -> str:
    return f"http://{mesh.lab.address(SERVER_HOST)}:{DERP_PORT}/derp"


def _metric(mesh: MeshLab, name: str, **labels: str) -> float:
    cp = mesh.lab.exec(SERVER_HOST, [sys.executable, "-c", METRICS,
                                     f"http://127.0.0.1:{DERP_PORT}/metrics"], timeout=20)
    return sample(parse_prometheus_text(cp.stdout), name, **labels)


def _derp_connected(mesh: MeshLab, node: str, region: str = "1") -> bool:
    conns = mesh.status(node)["derp"]["connections"]
    return region in conns and bool(conns[region]["connected"])


def test_tailnet_nodes_talk_through_the_admitting_derp(mesh: MeshLab) -> None:
    r = mesh.echo("a0", "b0", deadline=15)
    assert r["ok"], r
    assert mesh.path("a0", "b0") == "derp" and mesh.path("b0", "a0") == "derp"
    assert _metric(mesh, "relaymesh_derp_clients", kind="client") == 2


def test_a_client_not_in_the_tailnet_is_refused(mesh: MeshLab) -> None:
    before = _metric(mesh, "relaymesh_derp_refused_total", reason="not_admitted")
    cp = mesh.lab.exec("a0", [sys.executable, "-c", STRANGER, _derp_url(mesh)], timeout=30)
    got = json.loads(cp.stdout)
    assert got["connected"] is False, got
    assert "not in the tailnet" in got["refused"]
    assert _metric(mesh, "relaymesh_derp_refused_total", reason="not_admitted") == before + 1


def _hold_b_key(m: MeshLab) -> LabProcess:
    """Stop b0's daemon and hold its key in a raw DERP client that ignores the tailnet.

    b's own daemon closes its DERP connection when control logs it out, so that alone would
    prove nothing about DERP: a stale or hostile b keeps its connection, and DERP must cut it by
    itself. (One connection per key: the raw client takes the daemon's place.)"""
    m.daemons.pop("b0").stop()
    holder = m.lab.spawn("b0", [sys.executable, "-c", HOLDER, _derp_url(m),
                                str(m.root / "b0-state" / "node.key")], name="holder")
    holder.wait_for("connected", 20)
    until(lambda: _metric(m, "relaymesh_derp_clients", kind="client") == 2, 5.0,
          "a0 and b's raw client on DERP")
    return holder


def _delete_and_expect_drop(m: MeshLab, holder: LabProcess, deadline: float,
                            region: str = "1") -> None:
    nodes = json.loads(m.admin("nodes", "list", "-o", "json").stdout)
    b_id = next(n["id"] for n in nodes if n["name"] == "b0")
    m.admin("nodes", "delete", str(b_id))
    t = until(lambda: "dropped" in holder.output(), deadline, "b's DERP connection dropped",
              step=0.05)
    assert t <= deadline
    assert "no longer in the tailnet" in holder.output(), holder.output()
    assert _metric(m, "relaymesh_derp_evictions_total", reason="left_tailnet") == 1
    assert _metric(m, "relaymesh_derp_clients", kind="client") == 1
    assert _derp_connected(m, "a0", region)  # a node still in the tailnet keeps its connection
    # b's key cannot come back.
    cp = m.lab.exec("b0", [sys.executable, "-c", HOLDER, _derp_url(m),
                           str(m.root / "b0-state" / "node.key")], timeout=30, check=False)
    assert "refused" in cp.stdout and "not in the tailnet" in cp.stdout, cp.stdout


def test_deleted_node_is_dropped_by_derp(mesh: MeshLab) -> None:
    assert _derp_connected(mesh, "a0")
    _delete_and_expect_drop(mesh, _hold_b_key(mesh), DROP_DEADLINE)


# -- control serve --derp ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded(
    tmp_path_factory: pytest.TempPathFactory, module_lab_factory: LabFactory
) -> Iterator[MeshLab]:
    lab = module_lab_factory(pair_topology([("udp-blocked", "udp-blocked")], name="derpemb"))
    root = tmp_path_factory.mktemp("derpemb")
    m = MeshLab(lab, root)
    m.start_control({"regions": []}, ["--derp", "--derp-host", lab.address(SERVER_HOST)])
    m.start_nodes(["a0", "b0"])
    for n in ("a0", "b0"):
        until(lambda n=n: _derp_connected(m, n, "900"), 15.0, f"{n} on the embedded DERP",
              step=0.5)
    yield m


def test_embedded_derp_relays_tailnet_nodes_with_a_pinned_key(embedded: MeshLab) -> None:
    r = embedded.echo("a0", "b0", deadline=15)
    assert r["ok"], r
    assert embedded.path("a0", "b0") == "derp" and embedded.path("b0", "a0") == "derp"
    key = PrivateKey.parse((embedded.root / "ctl" / "derp.key").read_text().strip())
    banner = embedded.ctl_output()
    assert f"embedded DERP on port {DERP_PORT}" in banner and str(key.node_public()) in banner
    # Nobody was refused: admission knew each node from the moment it registered.
    assert _metric(embedded, "relaymesh_derp_refused_total", reason="not_admitted") == 0


def test_embedded_derp_refuses_a_stranger(embedded: MeshLab) -> None:
    cp = embedded.lab.exec("a0", [sys.executable, "-c", STRANGER, _derp_url(embedded)],
                           timeout=30)
    got = json.loads(cp.stdout)
    assert got["connected"] is False and "not in the tailnet" in got["refused"], got
    assert _metric(embedded, "relaymesh_derp_refused_total", reason="not_admitted") == 1


def test_embedded_derp_drops_a_deleted_node_at_once(embedded: MeshLab) -> None:
    _delete_and_expect_drop(embedded, _hold_b_key(embedded), EMBEDDED_DROP_DEADLINE, "900")
