"""DERP admission: only tailnet nodes get in, and nodes that leave are disconnected."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from aiohttp import web
from asyncwait import wait_for

from relaymesh.derp.admission import (
    AdmissionError,
    ControlAdmission,
    StaticAllowList,
    parse_key_list,
    parse_nodes_answer,
)
from relaymesh.derp.client import DerpClient, DerpRefusedError
from relaymesh.derp.metrics import EvictReason, RefuseReason
from relaymesh.derp.server import DerpServer
from relaymesh.keys import PrivateKey


def url_of(srv: DerpServer) -> str:
    assert srv.address is not None
    return f"http://127.0.0.1:{srv.address[1]}/derp"


def write_list(path: Path, *keys: PrivateKey, extra: str = "") -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("# tailnet\n" + "".join(f"{k.node_public()}\n" for k in keys) + extra)
    os.replace(tmp, path)  # atomic, like an operator's editor or a config manager


async def test_allow_list_admits_listed_refuses_others_and_evicts_removed(tmp_path: Path) -> None:
    alice, bob = PrivateKey.generate(), PrivateKey.generate()
    path = tmp_path / "allow.txt"
    write_list(path, alice)
    adm = StaticAllowList(path, poll_interval=0.05)
    srv = DerpServer(PrivateKey.generate(), admission=adm)
    await srv.start("127.0.0.1", 0)
    a = DerpClient(url_of(srv), alice)
    b = DerpClient(url_of(srv), bob)
    try:
        await a.connect()
        with pytest.raises(DerpRefusedError, match="not in the tailnet"):
            await b.connect()
        assert srv.metrics.refused[RefuseReason.NOT_ADMITTED] == 1
        assert srv.client_keys == [alice.node_public()]
        # Bob joins the tailnet: he gets in without a server restart.
        write_list(path, alice, bob)
        await wait_for(lambda: adm.allowed(bob.node_public()), what="reload")
        await b.connect()
        # Alice leaves: her live connection is closed, with the reason.
        write_list(path, bob)
        await wait_for(lambda: not a.connected, what="alice disconnected")
        assert srv.metrics.evictions[EvictReason.LEFT_TAILNET] == 1
        assert srv.client_keys == [bob.node_public()]
        assert isinstance(a.last_error, DerpRefusedError)
        assert b.connected
    finally:
        await a.close()
        await b.close()
        await srv.close()


async def test_broken_allow_list_edit_keeps_the_last_good_list(tmp_path: Path) -> None:
    alice = PrivateKey.generate()
    path = tmp_path / "allow.txt"
    write_list(path, alice)
    adm = StaticAllowList(path)
    adm.reload()
    write_list(path, extra="not-a-key\n")
    assert adm.reload() is False
    assert adm.reload_errors == 1
    assert adm.allowed(alice.node_public())


def test_allow_list_parsing() -> None:
    k = PrivateKey.generate().node_public()
    keys = parse_key_list(f"  {k}  # alice\n\n# comment\n{k.to_base64()}\n")
    assert keys == frozenset({k})
    with pytest.raises(AdmissionError, match="line 2"):
        parse_key_list(f"{k}\ndiscokey:{'00' * 32}\n")


def test_nodes_answer_parsing() -> None:
    k = PrivateKey.generate().node_public()
    assert parse_nodes_answer({"node_keys": [str(k)], "version": 3}) == (frozenset({k}), 3)
    for bad in ([], {"node_keys": [str(k)]}, {"node_keys": "x", "version": 1},
                {"node_keys": [1], "version": 1}, {"node_keys": ["nodekey:zz"], "version": 1},
                {"node_keys": [], "version": True}):
        with pytest.raises(AdmissionError):
            parse_nodes_answer(bad)


class FakeControl:
    """Serves GET /derp/v1/nodes like the coordination server (docs/control-protocol.md)."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.keys: list[str] = []
        self.version = 1
        self.requests = 0
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def nodes(self, request: web.Request) -> web.Response:
        self.requests += 1
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response({"error": "unauthorized"}, status=401)
        return web.json_response({"node_keys": self.keys, "version": self.version})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/derp/v1/nodes", self.nodes)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


async def test_control_admission_follows_the_tailnet() -> None:
    ctl = FakeControl("shared-token")
    await ctl.start()
    alice, bob = PrivateKey.generate(), PrivateKey.generate()
    ctl.keys = [str(alice.node_public())]
    adm = ControlAdmission(ctl.url, "shared-token", poll_interval=0.05)
    srv = DerpServer(PrivateKey.generate(), admission=adm)
    await srv.start("127.0.0.1", 0)
    a = DerpClient(url_of(srv), alice)
    try:
        assert adm.version == 1
        await a.connect()
        with pytest.raises(DerpRefusedError):
            await DerpClient(url_of(srv), bob).connect()
        ctl.keys, ctl.version = [str(bob.node_public())], 2
        await wait_for(lambda: not a.connected, what="alice evicted")
        assert adm.version == 2
        b = DerpClient(url_of(srv), bob)
        await b.connect()
        await b.close()
    finally:
        await a.close()
        await srv.close()
        await ctl.close()


async def test_control_admission_fails_closed_and_keeps_last_answer() -> None:
    ctl = FakeControl("right")
    await ctl.start()
    alice = PrivateKey.generate()
    ctl.keys = [str(alice.node_public())]
    wrong = ControlAdmission(ctl.url, "wrong", poll_interval=60)
    try:
        await wrong.start()
        assert wrong.poll_errors == 1 and not wrong.have_answer
        assert not wrong.allowed(alice.node_public())  # no answer yet: nobody gets in
    finally:
        await wrong.close()
    right = ControlAdmission(ctl.url, "right", poll_interval=60)
    try:
        await right.start()
        assert right.allowed(alice.node_public())
        await ctl.close()  # control goes down: DERP keeps serving the known tailnet
        with pytest.raises(OSError):
            await right.poll_once()
        assert right.allowed(alice.node_public())
    finally:
        await right.close()
