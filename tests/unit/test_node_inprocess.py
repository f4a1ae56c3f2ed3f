"""Two node backends and the real coordination server in one process, on loopback, no root.

MemoryTun stands in for the kernel TUN; everything else is real: machine-key auth, the map
stream, WireGuard over UDP, disco ping/pong on the same socket, the inbound filter.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import struct
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from relaymesh.control.config import ServerConfig
from relaymesh.control.server import ControlServer
from relaymesh.node.backend import APIError, Backend
from relaymesh.node.engine import Engine
from relaymesh.node.state import StateDir
from relaymesh.wireguard.datapath import open_udp_socket
from relaymesh.wireguard.tun import MemoryTun


@dataclass
class Node:
    backend: Backend
    tuns: list[MemoryTun]

    @property
    def tun(self) -> MemoryTun:
        return self.tuns[-1]

    def ipv4(self) -> str:
        return str(self.backend.ip()["ipv4"])


async def start_node(tmp: Path, name: str) -> Node:
    st = StateDir(tmp / name)
    sock = open_udp_socket(0, "127.0.0.1")
    tuns: list[MemoryTun] = []

    def factory(sock: Any, flt: Any, divert: Any) -> Engine:
        t = MemoryTun()
        tuns.append(t)
        return Engine(st.node_key, sock, t, None, flt, divert)

    b = Backend(st, engine_factory=factory, endpoints_fn=lambda p: [f"127.0.0.1:{p}"],
                sock=sock, tun_name="memtun0")
    await b.start()
    return Node(b, tuns)


@pytest.fixture
async def control(tmp_path: Path) -> AsyncIterator[tuple[ControlServer, str]]:
    cfg = ServerConfig(state_dir=tmp_path / "ctl", listen=("127.0.0.1", 0))
    srv = ControlServer(cfg)
    await srv.start()
    await srv.db.create_user("alice")
    key, _ = await srv.create_preauth_key("alice", reusable=True, ephemeral=False,
                                          expiration_s=None, tags=[])
    yield srv, key
    await srv.stop()


@pytest.fixture
async def pair(tmp_path: Path, control: tuple[ControlServer, str]
               ) -> AsyncIterator[tuple[Node, Node]]:
    srv, key = control
    nodes = [await start_node(tmp_path, n) for n in ("a", "b")]
    try:
        for n, name in zip(nodes, ("a", "b"), strict=True):
            await n.backend.up({"login_server": srv.url, "auth_key": key, "hostname": name})
        yield nodes[0], nodes[1]
    finally:
        for n in nodes:
            await n.backend.close()


async def until(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


def udp_packet(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                       ipaddress.IPv4Address(src).packed,
                       ipaddress.IPv4Address(dst).packed) + udp


async def deliver(tun: MemoryTun, timeout: float = 3.0) -> bytes | None:
    return await asyncio.to_thread(tun.delivered, timeout)


def peers_by_name(b: Backend) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in b.status()["peers"]}


async def test_nodes_find_each_other_direct_and_pass_packets(pair: tuple[Node, Node]) -> None:
    a, b = pair
    await until(lambda: peers_by_name(a.backend).get("b", {}).get("path") == "direct")
    await until(lambda: peers_by_name(b.backend).get("a", {}).get("path") == "direct")
    res = (await a.backend.ping("b", 2, 2.0))["results"]
    port_b = b.backend.port
    assert [r["path"] for r in res] == ["direct", "direct"]
    assert res[0]["detail"] == f"127.0.0.1:{port_b}" and res[0]["ip"] == b.ipv4()
    # a packet into A's TUN comes out of B's TUN, and B's answer comes back
    a.tun.inject(udp_packet(a.ipv4(), b.ipv4(), 5000, 7, b"hello"))
    got = await deliver(b.tun)
    assert got is not None and got.endswith(b"hello")
    b.tun.inject(udp_packet(b.ipv4(), a.ipv4(), 7, 5000, b"olleh"))
    got = await deliver(a.tun)
    assert got is not None and got.endswith(b"olleh")
    st = peers_by_name(a.backend)["b"]
    assert st["tx_bytes"] > 0 and st["rx_bytes"] > 0 and st["last_handshake"] is not None
    assert st["endpoint"] == f"127.0.0.1:{port_b}" and st["online"] is True


async def test_policy_filters_new_flows_but_not_replies(
        pair: tuple[Node, Node], control: tuple[ControlServer, str]) -> None:
    a, b = pair
    srv, _ = control
    ia, ib = a.ipv4(), b.ipv4()
    acl = {"action": "accept", "src": [ia], "dst": [f"{ib}:*"]}
    await srv.set_policy(json.dumps({"acls": [acl]}))
    await until(lambda: len(b.backend.netmap.packet_filter) == 1
                and not a.backend.netmap.packet_filter)
    # B may not open a flow to A
    b.tun.inject(udp_packet(ib, ia, 6000, 9, b"unsolicited"))
    assert await deliver(a.tun, 1.0) is None
    assert a.backend.engine is not None
    await until(lambda: a.backend.engine is not None
                and a.backend.engine.stats().get("drop_filtered", 0) >= 1)
    # A may open one to B, and B's reply gets back in through A's conntrack
    a.tun.inject(udp_packet(ia, ib, 5001, 9, b"request"))
    got = await deliver(b.tun)
    assert got is not None and got.endswith(b"request")
    b.tun.inject(udp_packet(ib, ia, 9, 5001, b"reply"))
    got = await deliver(a.tun)
    assert got is not None and got.endswith(b"reply")


async def test_restart_is_the_same_node_without_an_auth_key(
        tmp_path: Path, control: tuple[ControlServer, str]) -> None:
    srv, key = control
    n = await start_node(tmp_path, "r")
    try:
        st = await n.backend.up({"login_server": srv.url, "auth_key": key, "hostname": "r"})
        first = (st["self"]["id"], st["self"]["addresses"])
    finally:
        await n.backend.close()
    n = await start_node(tmp_path, "r")  # same state dir: resumes by itself
    try:
        await until(lambda: n.backend.control_connected)
        st = n.backend.status()
        assert st["backend_state"] == "Running"
        assert (st["self"]["id"], st["self"]["addresses"]) == first
    finally:
        await n.backend.close()


async def test_wrong_auth_key_is_refused_with_the_server_message(
        tmp_path: Path, control: tuple[ControlServer, str]) -> None:
    srv, _ = control
    n = await start_node(tmp_path, "w")
    try:
        with pytest.raises(APIError) as ei:
            await n.backend.up({"login_server": srv.url, "auth_key": "rmauth-wrong"})
        assert ei.value.status == 401 and ei.value.message == "auth key not found"
        assert n.backend.status()["backend_state"] == "NeedsLogin"
    finally:
        await n.backend.close()


async def test_deleted_node_loses_its_peers(
        pair: tuple[Node, Node], control: tuple[ControlServer, str]) -> None:
    a, b = pair
    srv, _ = control
    await until(lambda: "b" in peers_by_name(a.backend))
    bid = b.backend.status()["self"]["id"]
    await srv.delete_node(bid)
    await until(lambda: b.backend.status()["backend_state"] == "NeedsLogin", 2.0)
    assert b.backend.status()["peers"] == [] and b.backend.engine is None
    await until(lambda: "b" not in peers_by_name(a.backend), 2.0)


async def test_logs_never_contain_keys(
        tmp_path: Path, control: tuple[ControlServer, str], caplog: pytest.LogCaptureFixture
) -> None:
    srv, key = control
    caplog.set_level(logging.DEBUG)
    nodes = [await start_node(tmp_path, n) for n in ("k1", "k2", "k3")]
    try:
        for n, name in zip(nodes[:2], ("k1", "k2"), strict=True):
            await n.backend.up({"login_server": srv.url, "auth_key": key, "hostname": name})
        await until(lambda: peers_by_name(nodes[0].backend).get("k2", {}).get("path") == "direct")
        await nodes[0].backend.ping("k2", 1, 2.0)
        with pytest.raises(APIError):
            await nodes[2].backend.up({"login_server": srv.url, "auth_key": "rmauth-secret-x"})
    finally:
        for n in nodes:
            await n.backend.close()
    text = "\n".join(r.getMessage() for r in caplog.records
                     if r.name.startswith(("relaymesh.daemon", "relaymesh.node", "relaymesh.magic",
                                           "relaymesh.wireguard", "aiohttp")))
    assert "map v" in text  # the daemon did log
    secrets = [key, "rmauth-secret-x"]
    for n in nodes:
        st = n.backend.st
        for k in (st.node_key, st.disco_key, st.machine_key):
            secrets += [k.raw.hex(), k.to_base64()]
    leaked = [s[:8] for s in secrets if s in text]
    assert leaked == []


async def test_down_then_up_needs_no_auth_key(
        tmp_path: Path, control: tuple[ControlServer, str]) -> None:
    srv, key = control
    n = await start_node(tmp_path, "d")
    try:
        st = await n.backend.up({"login_server": srv.url, "auth_key": key, "hostname": "d"})
        st = await n.backend.down()
        assert st["backend_state"] == "Stopped" and n.backend.engine is None
        assert n.backend.st.state.want_running is False
        st2 = await n.backend.up({})  # login server remembered, machine known
        assert st2["backend_state"] == "Running" and n.backend.engine is not None
        assert st2["self"]["id"] == st["self"]["id"]
        assert st2["self"]["addresses"] == st["self"]["addresses"]
    finally:
        await n.backend.close()
