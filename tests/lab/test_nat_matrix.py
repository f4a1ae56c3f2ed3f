"""Issue 5 acceptance 1 and 2, real processes: the NAT matrix and the DERP -> direct switch.

One lab for the module (relaymesh.lab.grid.MeshLab): control + DERP (+ STUN) on ``srv`` on the lab
internet, and per matrix cell two nodes, each behind its own NAT router of the cell's kinds, all
in one tailnet. IPv4 underlay only (see MeshLab.start_node: over the lab's routed IPv6 every pair
punches through). Each cell is asserted with ``status --json`` on both sides, ``ping`` (disco)
and a TCP echo through the tunnel.

Expectations follow ``expected_path`` (the NAT behaviour), the issue's list. easy/hard and
firewall/hard need the birthday-paradox port spray (relaymesh.magicsock.spray): the lab's
``easy`` NAT filters by address AND port (conntrack) and the ``hard`` side's mapping toward it
gets a fresh random port, so the ordinary punch cannot meet; the hard side opens 256 spray
sockets and the easy side probes 2048 random ports of its public ip. Those cells also assert
that the hard side's direct path lives on a spray socket (``via`` says so) and that the spray
counters in the daemon's metrics show one spray and one hit.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator

import pytest

from relaymesh.lab import LabFactory
from relaymesh.lab.grid import (
    SINK_PORT,
    SINK_SERVER,
    STREAM_CLIENT,
    UNFILTERED,
    MeshLab,
    expected_path,
    pair_topology,
    start_mesh,
    until,
)
from relaymesh.lab.scenario import ScenarioError
from relaymesh.magicsock.spray import SPRAY_WINDOW

pytestmark = pytest.mark.lab

CELLS = [
    ("none", "none"),
    ("easy", "easy"),
    ("easy", "hard"),
    ("firewall", "hard"),
    ("firewall", "firewall"),
    ("hard", "hard"),
    ("udp-blocked", "easy"),
    ("udp-blocked", "none"),
    ("easy", "easy"),  # the DERP -> direct switch test's own pair (no traffic before it)
]
SWITCH = len(CELLS) - 1
SWITCH_DEADLINE = 5.0  # issue 5: direct within 5 s where direct is possible


@pytest.fixture(scope="module")
def mesh(
    tmp_path_factory: pytest.TempPathFactory, module_lab_factory: LabFactory
) -> Iterator[MeshLab]:
    lab = module_lab_factory(pair_topology(CELLS, name="natmatrix"))
    yield start_mesh(lab, tmp_path_factory.mktemp("natmatrix"),
                     [h for i in range(len(CELLS)) for h in (f"a{i}", f"b{i}")])


@pytest.mark.parametrize("cell", range(SWITCH), ids=[f"{a}-{b}" for a, b in CELLS[:SWITCH]])
def test_nat_matrix_cell(mesh: MeshLab, cell: int) -> None:
    ka, kb = CELLS[cell]
    a, b = f"a{cell}", f"b{cell}"
    want = expected_path(ka, kb)
    first = mesh.echo(a, b, deadline=15)
    assert first["ok"], f"{ka}/{kb}: no echo through the tunnel: {first}"
    seen = mesh.settle(a, b, timeout=6.0 if want == "direct" else 4.0)
    assert seen == (want, want), f"{ka}/{kb}: paths {seen}, expected {want} both ways"
    for src, dst in ((a, b), (b, a)):
        via = str((mesh.peer(src, dst) or {}).get("via"))
        assert via.startswith("direct " if want == "direct" else "derp(1)"), via
    ping = mesh.cli(a, "ping", "-c", "1", b).stdout
    assert (f"via {'direct(' if want == 'direct' else 'derp(1)'}") in ping, ping
    again = mesh.echo(a, b, deadline=10)
    assert again["ok"], again
    if "hard" in (ka, kb) and want == "direct" and not {ka, kb} & UNFILTERED:
        hard, other = (a, b) if ka == "hard" else (b, a)
        via = str((mesh.peer(hard, other) or {}).get("via"))
        assert "(spray socket " in via, via  # the path lives on the winning spray socket
        spray = mesh.metrics(hard)["spray"]
        assert spray.get("sprays", 0) >= 1 and spray.get("hits", 0) >= 1, spray
        # the losing sockets close after the spray window; the winner stays while it is used
        with contextlib.suppress(ScenarioError):
            until(lambda: mesh.metrics(hard)["spray"]["open_sockets"] == 1, SPRAY_WINDOW + 3,
                  "only the winning spray socket left open")
        spray = mesh.metrics(hard)["spray"]
        assert spray["open_sockets"] == 1, spray
        assert "(spray socket " in str((mesh.peer(hard, other) or {}).get("via"))
        assert mesh.echo(a, b, deadline=10)["ok"]


def test_starts_on_derp_and_switches_to_direct_under_a_tcp_stream(mesh: MeshLab) -> None:
    """Both sides forced to DERP (path policy no-direct) while a paced TCP stream runs; the
    policy goes back to auto and the pair must be direct within 5 s; the stream completes with
    the sender's sha256 at the receiver and no reset."""
    a, b = f"a{SWITCH}", f"b{SWITCH}"
    mesh.cli(a, "set", "--path-policy", f"{b}=no-direct")
    mesh.cli(b, "set", "--path-policy", f"{a}=no-direct")
    sink = mesh.lab.spawn(b, [sys.executable, "-c", SINK_SERVER, str(SINK_PORT)], name="sink")
    sink.wait_for("ready", 10)
    total, seconds = 6 << 20, 8.0
    stream = mesh.lab.spawn(a, [sys.executable, "-c", STREAM_CLIENT, mesh.ipv4(b),
                                str(SINK_PORT), str(total), str(seconds)], name="stream")
    until(lambda: mesh.path(a, b) == "derp" and mesh.path(b, a) == "derp", 5,
          "both sides on DERP")
    time.sleep(2.0)  # the stream is running over DERP
    assert stream.alive, stream.output()
    t0 = time.monotonic()
    mesh.cli(a, "set", "--path-policy", f"{b}=auto")
    mesh.cli(b, "set", "--path-policy", f"{a}=auto")
    took = until(lambda: mesh.path(a, b) == "direct" and mesh.path(b, a) == "direct",
                 SWITCH_DEADLINE, "direct after the policy went back to auto", step=0.2)
    assert time.monotonic() - t0 < SWITCH_DEADLINE, took
    assert stream.alive, "the stream ended before the switch: make it longer"
    stream.wait(60)
    sink.wait(30)
    sent = json.loads(stream.output().strip().splitlines()[-1])
    got = json.loads(sink.output().strip().splitlines()[-1])
    assert sent["error"] is None and got["error"] is None, (sent, got)
    assert sent["bytes"] == got["bytes"] == total
    assert sent["sha256"] == got["sha256"]


def test_netcheck_and_debug_path_report_what_the_node_sees(mesh: MeshLab) -> None:
    hard = CELLS.index(("hard", "hard"))
    a, b = f"a{hard}", f"b{hard}"
    r = json.loads(mesh.cli(a, "netcheck", "--json").stdout)
    assert r["udp"] is True and r["preferred_region"] == 1
    assert r["global_v4"].rsplit(":", 1)[0] == mesh.lab.public_address(a)  # the NAT's address
    blocked = CELLS.index(("udp-blocked", "easy"))
    rb = json.loads(mesh.cli(f"a{blocked}", "netcheck", "--json").stdout)
    assert rb["udp"] is False and rb["region_latency_ms"].get("1") is not None  # via HTTP
    rows = json.loads(mesh.cli(a, "debug", "path", b, "--json").stdout)
    derp = [x for x in rows if x["kind"] == "derp"]
    assert derp and derp[0]["state"] == "active", rows
    assert any(x["kind"] == "direct" for x in rows), rows
