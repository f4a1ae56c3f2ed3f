"""bench/anchors' Nebula and relaymesh peer relay rows, functionally: each carries a bounded TCP
transfer on its path.

Runs the benchmark's own row code (``anchors.ROWS``: lab topology, Nebula CA/configs, the relay
grant and relay daemons, the direct UDP block, the path checks) with one bounded TCP transfer
instead of timed runs, so the plumbing the benchmark depends on is tested in CI without measuring
speed. Also checks, without a lab (no root needed), that a row that cannot run is reported as not
available and never measured, how the table computes medians and ratios to wireguard-go direct,
and that a peer relay row whose bytes went through the other forwarder (or another relay, or an
unbound session) is not reported as its path.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import _nebula
import anchors
from _common import IperfResult
from relaymesh.lab import Lab, Topology

TRANSFER = 4_000_000  # bytes: enough for many full-size packets, a second or two even when slow


def _topology() -> Topology:
    topo = Topology(name="nebula-anchor")
    for h in anchors.HOSTS:
        topo.add_host(h)
    return topo


# b: accept one connection, count bytes until EOF, print the count (bounded by a timeout)
RECEIVER = textwrap.dedent("""
    import json, socket, sys
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); s.settimeout(60)
    print("ready", flush=True)
    c, _ = s.accept(); c.settimeout(60); n = 0
    while chunk := c.recv(65536):
        n += len(chunk)
    print(json.dumps({"received": n}), flush=True)
""")
# a: connect (retrying while the tunnel settles), send N bytes, close
SENDER = textwrap.dedent("""
    import socket, sys, time
    ip, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    end = time.monotonic() + 20
    while True:
        try:
            c = socket.create_connection((ip, port), timeout=5); break
        except OSError:
            if time.monotonic() > end: raise
            time.sleep(0.2)
    c.settimeout(60); buf = bytes(65536); left = n
    while left > 0:
        left -= c.send(buf[:min(left, len(buf))])
    c.shutdown(socket.SHUT_WR); c.recv(1); c.close()
""")
TRANSFER_PORT = 5299


def _transfer(lab: Lab, server_ip: str) -> int:
    """Send TRANSFER bytes a -> b's tunnel address over TCP; the bytes b counted until EOF."""
    rx = lab.spawn(anchors.SERVER, [sys.executable, "-c", RECEIVER, server_ip,
                                    str(TRANSFER_PORT)], name="tcp-recv")
    try:
        rx.wait_for("ready", 10)
        lab.exec(anchors.CLIENT, [sys.executable, "-c", SENDER, server_ip, str(TRANSFER_PORT),
                                  str(TRANSFER)], timeout=90)
        rx.wait(30)
        line = rx.output().strip().splitlines()[-1]
        return int(json.loads(line)["received"])
    finally:
        rx.stop()


def _row(key: str) -> anchors.RowSpec:
    return next(r for r in anchors.ROWS if r.key == key)


@pytest.fixture
def nebula_lab(lab_factory: object) -> Lab:
    reason = _nebula.unavailable()
    if reason is not None:
        pytest.skip(reason)
    lab: Lab = lab_factory(_topology())  # type: ignore[operator]
    anchors.ipv4_underlay(lab)  # as the benchmark does
    return lab


@pytest.mark.lab
def test_nebula_direct_row_carries_tcp_directly(nebula_lab: Lab, tmp_path: Path) -> None:
    lab = nebula_lab
    spec = _row("nebula-direct")
    assert not spec.block_direct and spec.expect == "direct"
    running = spec.start(lab, tmp_path)
    try:
        assert _transfer(lab, running.server_ip) == TRANSFER
        path, evidence = running.check_path()
        assert path == "direct", evidence
        assert f"handshake via {lab.address(anchors.SERVER)}:{_nebula.NEBULA_PORT}" in evidence
        assert set(running.pids) == {"a", "b"}
    finally:
        running.stop()


@pytest.mark.lab
def test_nebula_relay_row_carries_tcp_through_r_with_direct_udp_blocked(
        nebula_lab: Lab, tmp_path: Path) -> None:
    lab = nebula_lab
    spec = _row("nebula-relay")
    assert spec.block_direct and spec.expect == "relay" and spec.via == "r"
    _nebula.block_direct_udp(lab, anchors.CLIENT, anchors.SERVER)
    try:
        running = spec.start(lab, tmp_path)
        try:
            r_before = _nebula.rx_bytes(lab, "r")
            assert _transfer(lab, running.server_ip) == TRANSFER
            r_received = _nebula.rx_bytes(lab, "r") - r_before
            path, evidence = running.check_path()
            ev = _nebula.path_evidence(_mesh_of(running), anchors.CLIENT, anchors.SERVER)
        finally:
            running.stop()
        assert path == "relay", evidence
        assert ev.handshake_addr == "<nil>" and ev.relay_requests >= 1, ev
        assert ev.blocked_direct_packets > 0, "a never even tried the direct path"
        # every byte of the transfer reached r (twice over its one link: in from a, out to b;
        # only the inbound half is counted here)
        assert r_received >= TRANSFER, r_received
        assert "r" in running.pids
    finally:
        _nebula.unblock_direct_udp(lab)
    tables = lab.exec("inet", ["nft", "list", "tables"]).stdout
    assert _nebula.BLOCK_TABLE not in tables


@pytest.fixture
def anchor_lab(lab_factory: object) -> Lab:
    lab: Lab = lab_factory(_topology())  # type: ignore[operator]
    anchors.ipv4_underlay(lab)  # as the benchmark does
    return lab


@pytest.mark.lab
@pytest.mark.parametrize("key", ["relaymesh-peer-relay", "relaymesh-peer-relay-kernel"])
def test_peer_relay_row_carries_tcp_through_its_relay_with_direct_udp_blocked(
        anchor_lab: Lab, tmp_path: Path, key: str) -> None:
    lab = anchor_lab
    spec = _row(key)
    assert spec.block_direct and spec.expect == "peer_relay"
    relay = anchors.KERNEL_RELAY if key.endswith("kernel") else anchors.USER_RELAY
    assert spec.via == relay
    _nebula.block_direct_udp(lab, anchors.CLIENT, anchors.SERVER)
    try:
        running = spec.start(lab, tmp_path)
        try:
            before = _nebula.rx_bytes(lab, relay)
            assert _transfer(lab, running.server_ip) == TRANSFER
            received = _nebula.rx_bytes(lab, relay) - before
            path, evidence = running.check_path()
            assert "r" in running.pids
        finally:
            running.stop()
        # the row's own check: status on both ends, the relay's bound session and the forwarder
        # the row claims (nftables counters for the kernel row, the userspace loop otherwise)
        assert path == "peer_relay", evidence
        assert f"via peer-relay {relay} ({lab.address(relay)}:" in evidence, evidence
        assert "a<->b bound" in evidence, evidence
        assert f"relay kernel path {relay == anchors.KERNEL_RELAY}" in evidence, evidence
        assert received >= TRANSFER, received  # every byte crossed the relay host
    finally:
        _nebula.unblock_direct_udp(lab)


class _FakeMesh:
    """What ``anchors.check_peer_relay`` reads from a MeshLab: both ends' status and the
    relay's ``debug peer-relay-sessions --json``."""

    def __init__(self, via: str, sessions: list[dict[str, Any]], metrics: dict[str, Any]):
        self.via, self.sessions, self.metrics = via, sessions, metrics

    def peer(self, name: str, peer: str) -> dict[str, Any]:
        return {"path": "peer_relay", "via": self.via}

    def path(self, name: str, peer: str) -> str:
        return "peer_relay"

    def cli(self, name: str, *args: str) -> Any:
        assert args == ("debug", "peer-relay-sessions", "--json")

        class Out:
            stdout = json.dumps({"sessions": self.sessions, "metrics": self.metrics})
        return Out()


def _session(sid: int = 7, kernel: bool = True, state: str = "bound") -> dict[str, Any]:
    return {"session_id": sid, "names": ["b", "a"], "state": state, "kernel": kernel}


VIA_RK = "peer-relay rk (198.18.3.2:40000, session 7)"
KERNEL_BEFORE = {"kernel": True, "forwarded_bytes": 1000, "userspace_forwarded_bytes": 1000,
                 "kernel_forwarded_bytes": 0}


def _check(mesh: _FakeMesh, relay: str = "rk", kernel: bool = True,
           before: dict[str, Any] | None = None) -> str:
    return anchors.check_peer_relay(mesh, relay, kernel,  # type: ignore[arg-type]
                                    before or KERNEL_BEFORE)[0]


def test_peer_relay_check_accepts_the_kernel_row_only_when_nftables_carried_the_bytes() -> None:
    kernel_did = {"kernel": True, "forwarded_bytes": 101_000,
                  "userspace_forwarded_bytes": 2_000, "kernel_forwarded_bytes": 99_000}
    assert _check(_FakeMesh(VIA_RK, [_session()], kernel_did)) == "peer_relay"
    # same relay, same session, but the Python loop forwarded most of it: not the kernel row
    loop_did = {"kernel": True, "forwarded_bytes": 101_000,
                "userspace_forwarded_bytes": 60_000, "kernel_forwarded_bytes": 41_000}
    assert _check(_FakeMesh(VIA_RK, [_session()], loop_did)) != "peer_relay"
    # the kernel path fell back (no nft): nothing counted by nftables
    fell_back = {"kernel": False, "kernel_unavailable": "nft missing",
                 "forwarded_bytes": 101_000, "userspace_forwarded_bytes": 101_000}
    assert _check(_FakeMesh(VIA_RK, [_session(kernel=False)], fell_back)) != "peer_relay"


def test_peer_relay_check_accepts_the_userspace_row_only_without_a_kernel_path() -> None:
    via = "peer-relay r (198.18.2.2:40000, session 7)"
    before = {"kernel": False, "forwarded_bytes": 0, "userspace_forwarded_bytes": 0}
    user = {"kernel": False, "forwarded_bytes": 50_000, "userspace_forwarded_bytes": 50_000}
    assert _check(_FakeMesh(via, [_session(kernel=False)], user), "r", False,
                  before) == "peer_relay"
    kern = {"kernel": True, "forwarded_bytes": 50_000, "userspace_forwarded_bytes": 0,
            "kernel_forwarded_bytes": 50_000}
    assert _check(_FakeMesh(via, [_session()], kern), "r", False, before) != "peer_relay"
    # nothing forwarded during the runs: the bytes did not cross this relay
    assert _check(_FakeMesh(via, [_session(kernel=False)], before), "r", False,
                  before) != "peer_relay"


def test_peer_relay_check_wants_the_right_relay_and_a_bound_session_for_a_and_b() -> None:
    did = {"kernel": True, "forwarded_bytes": 101_000, "userspace_forwarded_bytes": 1_000,
           "kernel_forwarded_bytes": 100_000}
    # status says another relay
    assert _check(_FakeMesh(VIA_RK.replace("rk", "r"), [_session()], did)) != "peer_relay"
    # the relay lists no such session, or it is only half bound
    assert _check(_FakeMesh(VIA_RK, [_session(sid=8)], did)) != "peer_relay"
    assert _check(_FakeMesh(VIA_RK, [_session(state="half_bound")], did)) != "peer_relay"


def _mesh_of(running: anchors.Running) -> _nebula.NebulaMesh:
    assert isinstance(running.handle, _nebula.NebulaMesh)
    return running.handle


def test_unavailable_row_is_reported_not_measured() -> None:
    started: list[str] = []

    def start(lab: Lab, tmp: Path) -> anchors.Running:
        started.append("yes")
        raise AssertionError("an unavailable row must not be started")

    spec = anchors.RowSpec("x", "row x", "direct", False, start, lambda: "no x here")
    res = anchors.run_row(None, spec, 1.0, 1)  # type: ignore[arg-type]  # never touches the lab
    assert res.reason == "not available: no x here" and res.runs == [] and started == []
    text = anchors.table([res])
    assert "| row x | – |" in text and "not available: no x here" in text


def test_every_row_has_a_unique_key_and_the_baseline_is_wireguard_go() -> None:
    keys = [r.key for r in anchors.ROWS]
    assert len(keys) == len(set(keys))
    assert anchors.BASELINE in keys
    # the rows, in order: relaymesh (direct, peer relay x2, DERP), wireguard-go, Nebula x2
    assert [k.split("-")[0] for k in keys] == ["relaymesh"] * 4 + ["wireguard"] + ["nebula"] * 2
    # every row that goes through a third host blocks the direct path and names that host
    for r in anchors.ROWS:
        assert r.block_direct == (r.expect != "direct"), r.key
        assert (r.via is not None) == r.block_direct, r.key


def test_table_ratios_are_to_wireguard_go_direct_and_medians_of_the_runs() -> None:
    def runs(*mbits: float) -> list[IperfResult]:
        return [IperfResult(m, 10, {"a": m / 10, "b": m / 20}) for m in mbits]

    base = anchors.RowResult(anchors.BASELINE, "wireguard-go direct", runs=runs(300, 100, 200),
                             mtu=1420, path="direct", machine_busy=[90.0, 95.0, 100.0])
    neb = anchors.RowResult("nebula-relay", "Nebula via its relay", runs=runs(50, 150, 100),
                            mtu=1300, path="relay", machine_busy=[99.0, 99.0, 99.0])
    lines = anchors.table([neb, base]).splitlines()
    # median 100 of (50, 150, 100) over median 200 of (300, 100, 200); CPU medians of a and b
    assert lines[2] == ("| Nebula via its relay | 100 | 50 / 150 / 100 | 0.50x | 10% | 5% | – "
                        "| 99% | 10 | 1300 | relay |")
    assert lines[3].startswith("| wireguard-go direct | 200 | 300 / 100 / 200 | 1.00x |")


def test_relay_ratios_are_the_peer_relay_medians_over_wireguard_go_direct_and_derp() -> None:
    def row(key: str, *mbits: float) -> anchors.RowResult:
        return anchors.RowResult(key, key, runs=[IperfResult(m, 0, {}) for m in mbits])

    rows = [row("relaymesh-direct", 500, 400, 600), row("relaymesh-peer-relay", 300, 200, 100),
            row("relaymesh-derp", 100, 50, 150), row(anchors.BASELINE, 400, 400, 400)]
    text = anchors.relay_ratios(rows)
    # medians: relay 200, direct 500, DERP 100, wireguard-go 400; no kernel row -> no line
    assert text == ("- relaymesh-peer-relay: 0.50x wireguard-go direct, 0.40x relaymesh direct, "
                    "2.00x relaymesh via DERP")
