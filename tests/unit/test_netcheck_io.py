"""netcheck shell against real responders on loopback: DERP servers (their STUN and /derp/probe)
on 127.0.0.1 and 127.0.0.2, a fresh or a dedicated socket, a socket shared with its owner, UDP
blocked (HTTP fallback), and a responder that maps like a hard NAT."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, cast

import pytest

from relaymesh import stun
from relaymesh.derp.server import DerpServer
from relaymesh.keys import PrivateKey
from relaymesh.magicsock.netcheck import NetcheckConfig
from relaymesh.magicsock.netcheck_io import NetcheckRunner, netcheck
from relaymesh.stunserver import start_stun_server

FAST = NetcheckConfig(stun_rto_s=0.1, stun_timeout_s=0.5, http_timeout_s=1.0)


async def no_http(node: Mapping[str, Any], timeout: float) -> float:
    raise AssertionError(f"no HTTP probe expected (asked for {node.get('name')})")


def region(rid: int, code: str, host: str, derp_port: int, stun_port: int) -> dict[str, Any]:
    return {"id": rid, "code": code, "nodes": [
        {"name": f"{rid}a", "host": host, "derp_port": derp_port, "stun_port": stun_port,
         "tls": False}]}


@pytest.fixture
async def two_derps() -> AsyncIterator[dict[str, Any]]:
    """Two DERP servers with STUN, on 127.0.0.1 and 127.0.0.2: the DERP map for them."""
    servers: list[DerpServer] = []
    regions = []
    try:
        for rid, host in ((1, "127.0.0.1"), (2, "127.0.0.2")):
            srv = DerpServer(PrivateKey.generate())
            servers.append(srv)
            _, dport = await srv.start(host, 0)
            _, sport = await srv.start_stun(host, 0)
            regions.append(region(rid, f"lo{rid}", host, dport, sport))
        yield {"regions": regions}
    finally:
        for srv in servers:
            await srv.close()


async def test_dedicated_socket_sees_its_own_mapping_and_is_left_usable(
        two_derps: dict[str, Any]) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    try:
        report = await netcheck(two_derps, sock=sock, config=FAST, http_prober=no_http)
        assert report.udp is True
        assert report.global_v4 == f"127.0.0.1:{sock.getsockname()[1]}"
        assert report.mapping_varies_by_dest is False  # no NAT: same mapping for both servers
        assert set(report.region_latency_ms) == {1, 2}
        assert report.region_latency_via == {1: "stun", 2: "stun"}
        assert report.preferred_region in (1, 2)
        assert report.region_latency_ms[report.preferred_region] == min(
            report.region_latency_ms.values())
        # the caller's socket is open, blocking again, and still works
        assert sock.getblocking()
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            peer.bind(("127.0.0.1", 0))
            peer.sendto(b"still here", sock.getsockname())
            sock.settimeout(2.0)
            assert sock.recvfrom(64)[0] == b"still here"
        finally:
            peer.close()
    finally:
        sock.close()


async def test_fresh_socket(two_derps: dict[str, Any]) -> None:
    report = await netcheck(two_derps, bind_v4=("127.0.0.1", 0), config=FAST,
                            http_prober=no_http)
    assert report.udp is True
    assert report.global_v4 is not None and report.global_v4.startswith("127.0.0.1:")
    assert int(report.global_v4.rsplit(":", 1)[1]) > 0
    assert report.mapping_varies_by_dest is False
    assert report.region_latency_via == {1: "stun", 2: "stun"}


async def test_udp_blocked_falls_back_to_derp_http_probes(two_derps: dict[str, Any]) -> None:
    # STUN goes to bound sockets that never answer (a silent drop, as a UDP-blocking firewall
    # does); the DERP ports still answer GET /derp/probe, timed with the real prober.
    holes = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
    try:
        for r, hole in zip(two_derps["regions"], holes, strict=True):
            hole.bind((r["nodes"][0]["host"], 0))
            r["nodes"][0]["stun_port"] = hole.getsockname()[1]
        report = await netcheck(two_derps, bind_v4=("127.0.0.1", 0), config=FAST)
    finally:
        for hole in holes:
            hole.close()
    assert report.udp is False
    assert report.global_v4 is None and report.mapping_varies_by_dest is None
    assert report.region_latency_via == {1: "http", 2: "http"}
    assert all(ms > 0 for ms in report.region_latency_ms.values())
    assert report.preferred_region in (1, 2)


async def test_nothing_answers_at_all() -> None:
    hole = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    hole.bind(("127.0.0.1", 0))
    dead = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    dead.bind(("127.0.0.1", 0))  # bound, not listening: the HTTP probe is refused
    try:
        dm = {"regions": [region(1, "x", "127.0.0.1", dead.getsockname()[1],
                                 hole.getsockname()[1])]}
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        report = await netcheck(dm, bind_v4=("127.0.0.1", 0), config=FAST)
        took = loop.time() - t0
    finally:
        hole.close()
        dead.close()
    assert report.udp is False and report.region_latency_ms == {}
    assert report.preferred_region is None
    assert took < FAST.stun_timeout_s + FAST.http_timeout_s + 3.0  # bounded by the deadlines


class _DifferentPortPerDestination(asyncio.DatagramProtocol):
    """A STUN responder that reports the source port shifted by ``shift``: what a server behind
    an endpoint-dependent ("hard") NAT's other mapping would report."""

    def __init__(self, shift: int) -> None:
        self.shift = shift
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # 3.11's is no subclass

    def datagram_received(self, data: bytes, addr: Any) -> None:
        msg = stun.decode(data)
        assert self.transport is not None
        self.transport.sendto(
            stun.binding_response(msg.txid, (addr[0], addr[1] + self.shift)), addr)


async def test_different_mappings_per_server_report_a_hard_nat() -> None:
    loop = asyncio.get_running_loop()
    honest = await start_stun_server("127.0.0.1", 0)
    tr, _ = await loop.create_datagram_endpoint(lambda: _DifferentPortPerDestination(7),
                                                local_addr=("127.0.0.2", 0))
    try:
        dm = {"regions": [region(1, "a", "127.0.0.1", 1, honest.address[1]),
                          region(2, "b", "127.0.0.2", 1, tr.get_extra_info("sockname")[1])]}
        report = await netcheck(dm, bind_v4=("127.0.0.1", 0), config=FAST, http_prober=no_http)
    finally:
        honest.close()
        tr.close()
    assert report.udp is True
    assert report.mapping_varies_by_dest is True


async def test_runner_on_a_socket_owned_by_someone_else(two_derps: dict[str, Any]) -> None:
    """The daemon's case: the owner reads the socket, hands STUN to the runner, keeps the rest."""
    loop = asyncio.get_running_loop()
    kept: list[bytes] = []
    runner: NetcheckRunner | None = None

    class Owner(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: Any) -> None:
            if stun.is_stun(data) and runner is not None and runner.feed(data, addr):
                return
            kept.append(data)

    tr, _ = await loop.create_datagram_endpoint(Owner, local_addr=("127.0.0.1", 0))
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        runner = NetcheckRunner(two_derps, lambda data, addr: tr.sendto(data, addr),
                                config=FAST, http_prober=no_http)
        peer.bind(("127.0.0.1", 0))
        peer.sendto(b"wireguard or disco", tr.get_extra_info("sockname"))
        report = await runner.run()
        for _ in range(100):  # bounded: let the peer's datagram arrive if it has not yet
            if kept:
                break
            await asyncio.sleep(0.01)
    finally:
        tr.close()
        peer.close()
    assert report.global_v4 == f"127.0.0.1:{tr.get_extra_info('sockname')[1]}"
    assert report.mapping_varies_by_dest is False
    assert kept == [b"wireguard or disco"]


async def test_host_names_are_resolved(two_derps: dict[str, Any]) -> None:
    two_derps["regions"][0]["nodes"][0]["host"] = "localhost"
    report = await netcheck({"regions": two_derps["regions"][:1]}, bind_v4=("127.0.0.1", 0),
                            bind_v6=None, config=FAST, http_prober=no_http)
    assert report.udp is True and report.region_latency_via == {1: "stun"}


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback on this host")
async def test_ipv6_stun_server_gives_a_global_v6() -> None:
    v4 = await start_stun_server("127.0.0.1", 0)
    v6 = await start_stun_server("::1", 0)
    try:
        dm = {"regions": [{"id": 1, "code": "dual", "nodes": [
            {"name": "v4", "host": "127.0.0.1", "derp_port": 1, "stun_port": v4.address[1]},
            {"name": "v6", "host": "::1", "derp_port": 1, "stun_port": v6.address[1]}]}]}
        report = await netcheck(dm, bind_v4=("127.0.0.1", 0), bind_v6=("::1", 0), config=FAST,
                                http_prober=no_http)
    finally:
        v4.close()
        v6.close()
    assert report.global_v4 is not None and report.global_v4.startswith("127.0.0.1:")
    assert report.global_v6 is not None and report.global_v6.startswith("[::1]:")


async def test_module_entry_point_prints_the_report(two_derps: dict[str, Any],
                                                    tmp_path: Path) -> None:
    path = tmp_path / "derp.json"
    path.write_text(json.dumps(two_derps))
    outs = []
    for extra in (["--json"], []):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relaymesh.magicsock.netcheck_io", str(path),
            "--bind", "127.0.0.1:0", *extra,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()
        outs.append(out.decode())
    d = json.loads(outs[0])
    assert d["udp"] is True and d["global_v4"].startswith("127.0.0.1:")
    assert d["region_latency_via"] == {"1": "stun", "2": "stun"}
    assert "UDP: true" in outs[1] and "- lo1: " in outs[1] and "- lo2: " in outs[1]


async def test_malformed_map_entries_are_skipped_by_the_shell(two_derps: dict[str, Any]) -> None:
    good = two_derps["regions"][0]
    dm = {"regions": ["junk", {"id": 7, "nodes": ["x", 3]}, good]}
    report = await netcheck(dm, bind_v4=("127.0.0.1", 0), config=FAST, http_prober=no_http)
    assert report.region_latency_via == {1: "stun"}
