"""The node's DERP connections (relaymesh.node.derpconn.DerpConns) against real DERP servers on
loopback: home region, sending by region, lazily opened and idle-closed foreign regions."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from relaymesh.derp.server import DerpServer
from relaymesh.keys import NodeKey, PrivateKey
from relaymesh.node import derpconn
from relaymesh.node.derpconn import DerpConns


def region(rid: int, *ports: int) -> dict[str, Any]:
    return {"id": rid, "code": f"r{rid}", "nodes": [
        {"name": f"{rid}{chr(97 + i)}", "host": "127.0.0.1", "derp_port": p, "tls": False}
        for i, p in enumerate(ports)]}


@pytest.fixture
async def servers() -> AsyncIterator[list[int]]:
    srvs = [DerpServer(PrivateKey.generate()) for _ in range(2)]
    ports = [(await s.start("127.0.0.1", 0))[1] for s in srvs]
    yield ports
    for s in srvs:
        await s.close(restarting=False)


class Node:
    def __init__(self) -> None:
        self.priv = PrivateKey.generate()
        self.got: list[tuple[int, NodeKey, bytes]] = []
        self.clock = 0.0
        self.conns = DerpConns(self.priv, lambda r, s, p: self.got.append((r, s, p)),
                               clock=lambda: self.clock)


async def until(pred: Any, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        assert loop.time() < end, "timed out"
        await asyncio.sleep(0.01)


async def test_home_region_carries_packets_both_ways(servers: list[int]) -> None:
    a, b = Node(), Node()
    dmap = {"regions": [region(1, servers[0]), region(2, servers[1])]}
    for n in (a, b):
        n.conns.set_map(dmap)
        n.conns.set_home(1)
    try:
        await until(lambda: a.conns.connected(1) and b.conns.connected(1))
        assert a.conns.send(b.priv.node_public().raw, 1, b"wg-bytes")
        await until(lambda: b.got)
        assert b.got == [(1, a.priv.node_public(), b"wg-bytes")]
        assert a.conns.status()["home_region"] == 1 and a.conns.sent == 1
    finally:
        await a.conns.close()
        await b.conns.close()


async def test_foreign_region_opens_on_use_and_closes_when_idle(servers: list[int]) -> None:
    a, b = Node(), Node()
    dmap = {"regions": [region(1, servers[0]), region(2, servers[1])]}
    a.conns.set_map(dmap)
    a.conns.set_home(1)
    b.conns.set_map(dmap)
    b.conns.set_home(2)  # B lives in region 2: A reaches it there
    try:
        await until(lambda: b.conns.connected(2))
        assert not a.conns.send(b.priv.node_public().raw, 2, b"early")  # dialling: dropped
        assert a.conns.dropped == 1
        await until(lambda: a.conns.connected(2))
        assert a.conns.send(b.priv.node_public().raw, 2, b"hello")
        await until(lambda: b.got)
        assert b.got[0][2] == b"hello"
        a.clock += derpconn.FOREIGN_IDLE_CLOSE + 1
        a.conns.tick()
        assert set(a.conns.status()["connections"]) == {"1"}  # home stays, region 2 closed
    finally:
        await a.conns.close()
        await b.conns.close()


async def test_pinned_server_and_map_changes(servers: list[int]) -> None:
    n = Node()
    n.conns.pinned = "1b"
    n.conns.set_map({"regions": [region(1, servers[0], servers[1])]})
    assert n.conns.url(1) == f"http://127.0.0.1:{servers[1]}/derp"
    n.conns.pinned = "nope"
    assert n.conns.url(1) == f"http://127.0.0.1:{servers[0]}/derp"  # unknown name: first node
    n.conns.set_home(1)
    try:
        await until(lambda: n.conns.connected(1))
        n.conns.set_map({"regions": [region(2, servers[1])]})  # region 1 vanished
        assert n.conns.home == 0 and n.conns.status()["connections"] == {}
        assert n.conns.url(9) is None
    finally:
        await n.conns.close()


async def test_server_key_from_the_map_is_pinned() -> None:
    srv = DerpServer(PrivateKey.generate())
    _, port = await srv.start("127.0.0.1", 0)
    good, bad = Node(), Node()
    try:
        for n, key in ((good, srv.key), (bad, PrivateKey.generate().node_public())):
            r = region(1, port)
            r["nodes"][0]["server_key"] = key.to_text()
            n.conns.set_map({"regions": [r]})
            n.conns.set_home(1)
        await until(lambda: good.conns.connected(1))
        await asyncio.sleep(0.3)  # several dial attempts for the impostor check
        assert not bad.conns.connected(1)
    finally:
        await good.conns.close()
        await bad.conns.close()
        await srv.close(restarting=False)
