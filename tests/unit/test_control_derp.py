"""DERP on the control side (issue 5): GET /derp/v1/nodes with a real ControlAdmission, and the
embedded DERP+STUN server of ``control serve --derp``. Real servers on loopback, real SQLite."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import stat
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from asyncwait import wait_for
from click.testing import CliRunner

from relaymesh import stun
from relaymesh.cli.control import command as control_command
from relaymesh.control.config import ConfigError, ServerConfig
from relaymesh.control.derp import (
    EMBEDDED_REGION_ID,
    TailnetKeys,
    load_or_create_token,
    merge_derp_map,
)
from relaymesh.control.server import ControlServer
from relaymesh.control.testclient import TestNode
from relaymesh.derp.admission import ControlAdmission
from relaymesh.derp.client import DerpClient, DerpRefusedError
from relaymesh.derp.metrics import EvictReason, RefuseReason
from relaymesh.derp.server import DerpServer
from relaymesh.keys import NodeKey, PrivateKey

Json = dict[str, Any]
MakeServer = Callable[..., Awaitable[ControlServer]]
POLL_S = 0.2  # admission poll interval in these tests (the default is 2 s)


@pytest.fixture
async def make_server(tmp_path: Path) -> AsyncIterator[MakeServer]:
    servers: list[ControlServer] = []

    async def make(state_dir: Path | None = None, **kw: Any) -> ControlServer:
        cfg = ServerConfig(state_dir=state_dir or tmp_path / "state",
                           listen=("127.0.0.1", 0), **kw)
        srv = ControlServer(cfg)
        await srv.start()
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        await srv.stop()


async def join(srv: ControlServer, name: str) -> TestNode:
    if await srv.db.get_user("alice") is None:
        await srv.db.create_user("alice")
    key, _ = await srv.create_preauth_key("alice", reusable=True, ephemeral=False,
                                          expiration_s=3600, tags=[])
    node = TestNode(srv.url, await TestNode.fetch_server_key(srv.url), name)
    await node.register(key)
    return node



async def get_nodes(srv: ControlServer, auth: str | None) -> tuple[int, Json]:
    headers = {} if auth is None else {"Authorization": auth}
    async with aiohttp.ClientSession() as s, s.get(srv.url + "/derp/v1/nodes",
                                                   headers=headers) as r:
        return r.status, await r.json()


async def admin_delete(srv: ControlServer, nid: int) -> None:
    """What `relaymesh control nodes delete NID` does: DELETE over the admin socket."""
    conn = aiohttp.UnixConnector(path=str(srv.config.admin_socket_path))
    async with aiohttp.ClientSession(connector=conn) as s, \
            s.delete(f"http://x/admin/v1/nodes/{nid}") as r:
        assert r.status == 200, await r.text()


# -- the token -------------------------------------------------------------------------------------


def test_token_file_is_created_0600_and_reused(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "sub" / "derp.token"
    with caplog.at_level(logging.INFO):
        token = load_or_create_token(path)
    assert len(token) == 64 and int(token, 16) >= 0
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert str(path) in caplog.text and token not in caplog.text
    assert load_or_create_token(path) == token
    assert load_or_create_token(tmp_path / "other") != token


def test_empty_token_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t"
    path.write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        load_or_create_token(path)


def test_tailnet_keys_version_grows_only_on_a_change() -> None:
    tk = TailnetKeys(now=1000.0)
    k1, k2 = PrivateKey.generate().node_public(), PrivateKey.generate().node_public()
    v0 = tk.version
    assert tk.update([k1], now=1000.0) and tk.version > v0
    v1 = tk.version
    assert not tk.update([k1], now=2000.0) and tk.version == v1
    assert tk.update([k1, k2], now=1000.0) and tk.version == v1 + 1  # clock behind: +1
    assert tk.json()["node_keys"] == sorted([k1.to_text(), k2.to_text()])


def test_embedded_region_id_clash_with_the_derp_map_is_refused() -> None:
    region = {"id": EMBEDDED_REGION_ID, "nodes": []}
    assert merge_derp_map({"regions": [{"id": 1}]}, region)["regions"] == [{"id": 1}, region]
    with pytest.raises(ConfigError, match="region 900"):
        merge_derp_map({"regions": [{"id": EMBEDDED_REGION_ID}]}, region)


# -- GET /derp/v1/nodes ----------------------------------------------------------------------------


async def test_nodes_endpoint_needs_the_bearer_token(make_server: MakeServer) -> None:
    srv = await make_server()
    token = srv.config.derp_token_path.read_text().strip()
    assert stat.S_IMODE(os.stat(srv.config.derp_token_path).st_mode) == 0o600
    for auth in (None, "Bearer wrong", f"Basic {token}", "Bearer "):
        status, body = await get_nodes(srv, auth)
        assert status == 401, auth
        assert "error" in body and "node_keys" not in body
    status, body = await get_nodes(srv, f"Bearer {token}")
    assert status == 200 and body["node_keys"] == []


async def test_nodes_endpoint_lists_live_nodes_and_version_follows_changes(
    make_server: MakeServer, tmp_path: Path
) -> None:
    token_file = tmp_path / "given.token"
    token_file.write_text("s3cret-token\n")
    srv = await make_server(derp_token_file=token_file)
    auth = "Bearer s3cret-token"
    a = await join(srv, "a")
    b = await join(srv, "b")
    _, body = await get_nodes(srv, auth)
    keys_ab = {a.node_priv.node_public().to_text(), b.node_priv.node_public().to_text()}
    assert set(body["node_keys"]) == keys_ab
    v1 = body["version"]
    _, again = await get_nodes(srv, auth)
    assert again["version"] == v1  # nothing changed
    await srv.expire_node(b.id)  # expired (or logged out): no longer in the tailnet
    _, body = await get_nodes(srv, auth)
    assert body["node_keys"] == [a.node_priv.node_public().to_text()]
    assert body["version"] > v1
    await srv.delete_node(a.id)
    _, body = await get_nodes(srv, auth)
    assert body["node_keys"] == []


async def test_control_admission_admits_registered_and_drops_deleted_node(
    make_server: MakeServer
) -> None:
    srv = await make_server()
    token = srv.config.derp_token_path.read_text().strip()
    a = await join(srv, "a")
    b = await join(srv, "b")
    adm = ControlAdmission(srv.url, token, poll_interval=POLL_S)
    derp = DerpServer(PrivateKey.generate(), admission=adm)
    await derp.start("127.0.0.1", 0)
    assert derp.address is not None
    url = f"http://127.0.0.1:{derp.address[1]}/derp"
    ca, cb = DerpClient(url, a.node_priv), DerpClient(url, b.node_priv)
    stranger = DerpClient(url, PrivateKey.generate())
    try:
        assert adm.have_answer and adm.poll_errors == 0
        await ca.connect()
        await cb.connect()
        with pytest.raises(DerpRefusedError, match="not in the tailnet"):
            await stranger.connect()
        assert derp.metrics.refused[RefuseReason.NOT_ADMITTED] == 1
        await admin_delete(srv, b.id)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await wait_for(lambda: not cb.connected, 3 * POLL_S, "b disconnected by DERP")
        assert loop.time() - t0 <= 3 * POLL_S
        assert derp.metrics.evictions[EvictReason.LEFT_TAILNET] == 1
        assert ca.connected and derp.client_keys == [a.node_priv.node_public()]
        with pytest.raises(DerpRefusedError, match="not in the tailnet"):
            await cb.connect()
    finally:
        for c in (ca, cb, stranger):
            await c.close()
        await derp.close()


async def test_control_admission_with_a_wrong_token_admits_nobody(
    make_server: MakeServer
) -> None:
    srv = await make_server()
    a = await join(srv, "a")
    adm = ControlAdmission(srv.url, "not-the-token", poll_interval=POLL_S)
    derp = DerpServer(PrivateKey.generate(), admission=adm)
    await derp.start("127.0.0.1", 0)
    assert derp.address is not None
    ca = DerpClient(f"http://127.0.0.1:{derp.address[1]}/derp", a.node_priv)
    try:
        assert not adm.have_answer and adm.poll_errors == 1
        with pytest.raises(DerpRefusedError, match="not in the tailnet"):
            await ca.connect()
    finally:
        await ca.close()
        await derp.close()


# -- control serve --derp --------------------------------------------------------------------------


def embedded_node(derp_map: Json) -> Json:
    regions = {r["id"]: r for r in derp_map["regions"]}
    node: Json = regions[EMBEDDED_REGION_ID]["nodes"][0]
    return node


async def test_embedded_derp_admits_registered_refuses_others_drops_deleted(
    make_server: MakeServer
) -> None:
    srv = await make_server(derp_embedded=True, derp_port=0, stun_port=0)
    assert srv.derp is not None
    a = await join(srv, "a")
    b = await join(srv, "b")
    stream = await b.open_map()
    full = await stream.next(2)
    node = embedded_node(full["derp_map"])
    assert node["host"] == "127.0.0.1" and node["tls"] is False
    assert srv.derp.derp_address is not None and srv.derp.stun_address is not None
    assert node["derp_port"] == srv.derp.derp_address[1]
    assert node["stun_port"] == srv.derp.stun_address[1]
    assert NodeKey.parse(node["server_key"]) == srv.derp.key
    ca = DerpClient.for_map_node(node, a.node_priv)
    cb = DerpClient.for_map_node(node, b.node_priv)
    stranger = DerpClient.for_map_node(node, PrivateKey.generate())
    try:
        await ca.connect()
        await cb.connect()
        assert cb.server_key == srv.derp.key  # pinned key proven by the server
        with pytest.raises(DerpRefusedError, match="not in the tailnet"):
            await stranger.connect()
        # The two registered nodes really relay through it.
        assert await ca.send(b.node_priv.node_public(), b"hello b")
        got = await asyncio.wait_for(cb.recv(), 2)
        assert got.src == a.node_priv.node_public() and got.packet == b"hello b"
        await admin_delete(srv, b.id)
        # No polling: the flush after the delete (coalescing window, 20 ms) evicts b.
        await wait_for(lambda: not cb.connected, 1.0, "b disconnected by the embedded DERP")
        assert srv.derp.server.metrics.evictions[EvictReason.LEFT_TAILNET] == 1
        assert ca.connected
        with pytest.raises(DerpRefusedError, match="not in the tailnet"):
            await cb.connect()
    finally:
        stream.close()
        for c in (ca, cb, stranger):
            await c.close()


async def test_embedded_derp_drops_the_old_key_after_a_node_key_rotation(
    make_server: MakeServer
) -> None:
    srv = await make_server(derp_embedded=True, derp_port=0, stun_port=0)
    a = await join(srv, "a")
    node = embedded_node(srv.hot.derp_map)
    old = DerpClient.for_map_node(node, a.node_priv)
    try:
        await old.connect()
        a.node_priv = PrivateKey.generate()
        await a.register(None)  # same machine, new node key (control-protocol.md §1)
        await wait_for(lambda: not old.connected, 1.0, "old node key disconnected")
        async with DerpClient.for_map_node(node, a.node_priv) as new:
            await new.connect()
            assert new.connected
    finally:
        await old.close()


async def test_embedded_derp_key_persists_0600_and_map_keeps_file_regions(
    make_server: MakeServer, tmp_path: Path
) -> None:
    dmap = tmp_path / "derp.json"
    dmap.write_text(json.dumps({"regions": [{"id": 1, "code": "r1", "name": "r1", "nodes": [
        {"name": "1a", "host": "192.0.2.1", "derp_port": 3340, "stun_port": 3478,
         "tls": False}]}]}))
    state = tmp_path / "st"
    srv = await make_server(state_dir=state, derp_embedded=True, derp_port=0, stun_port=0,
                            derp_map_file=dmap, derp_host="127.0.0.2")
    assert srv.derp is not None
    key1 = srv.derp.key
    assert [r["id"] for r in srv.hot.derp_map["regions"]] == [1, EMBEDDED_REGION_ID]
    assert embedded_node(srv.hot.derp_map)["host"] == "127.0.0.2"
    assert stat.S_IMODE(os.stat(state / "derp.key").st_mode) == 0o600
    await srv.reload()  # SIGHUP re-reads --derp-map: the embedded region stays
    assert [r["id"] for r in srv.hot.derp_map["regions"]] == [1, EMBEDDED_REGION_ID]
    await srv.stop()
    srv2 = await make_server(state_dir=state, derp_embedded=True, derp_port=0, stun_port=0)
    assert srv2.derp is not None and srv2.derp.key == key1
    assert embedded_node(srv2.hot.derp_map)["server_key"] == key1.to_text()


async def test_embedded_stun_answers(make_server: MakeServer) -> None:
    srv = await make_server(derp_embedded=True, derp_port=0, stun_port=0)
    assert srv.derp is not None and srv.derp.stun_address is not None
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[bytes] = loop.create_future()

    class Proto(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            if not fut.done():
                fut.set_result(data)

    transport, _ = await loop.create_datagram_endpoint(Proto, local_addr=("127.0.0.1", 0))
    try:
        txid, request = stun.binding_request()
        transport.sendto(request, srv.derp.stun_address)
        mapped = stun.parse_binding_response(await asyncio.wait_for(fut, 2), txid)
        assert mapped[1] == transport.get_extra_info("sockname")[1]
    finally:
        transport.close()


def test_serve_derp_with_a_wildcard_listen_needs_derp_host(tmp_path: Path) -> None:
    r = CliRunner().invoke(control_command, ["serve", "--state-dir", str(tmp_path),
                                             "--listen", "0.0.0.0:0", "--derp"])
    assert r.exit_code == 2
    assert "--derp-host" in r.output


async def test_serve_derp_process_prints_paths_not_the_token(tmp_path: Path) -> None:
    """`control serve --derp` as a real process: banner lines, the token never printed."""
    state = tmp_path / "s"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relaymesh", "control", "serve", "--state-dir", str(state),
        "--listen", "127.0.0.1:0", "--derp", "--derp-port", "0", "--stun-port", "0",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(20):
            while not any("embedded DERP on port" in ln for ln in lines):
                line = await proc.stderr.readline()
                assert line, f"server exited early: {lines}"
                lines.append(line.decode())
        token = (state / "derp-admission.token").read_text().strip()
        derp_key = (state / "derp.key").read_text().strip()
        text = "".join(lines)
        assert f"DERP admission token in {state / 'derp-admission.token'}" in text
        assert token not in text and derp_key not in text
        assert str(PrivateKey.parse(derp_key).node_public()) in text  # the public key only
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
