"""Coordination server in-process: a real aiohttp server on loopback, real SQLite in a tmp dir,
and test nodes doing the machine-key auth of control-protocol.md §1."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from relaymesh.control.auth import HEADER_AUTH, HEADER_MACHINE, auth_headers
from relaymesh.control.config import ConfigError, ServerConfig
from relaymesh.control.policy import RELAY_CAP
from relaymesh.control.server import ControlServer
from relaymesh.control.testclient import ControlHTTPError, MapStream, TestNode
from relaymesh.keys import PrivateKey

Json = dict[str, Any]
MakeServer = Callable[..., Awaitable[ControlServer]]
PROPAGATION_BUDGET_S = 1.0  # control-protocol.md: a change reaches every affected node in < 1 s


@pytest.fixture
async def make_server(tmp_path: Path) -> AsyncIterator[MakeServer]:
    servers: list[ControlServer] = []

    async def make(state_dir: Path | None = None, **kw: Any) -> ControlServer:
        kw.setdefault("ephemeral_grace", 0.3)
        cfg = ServerConfig(
            state_dir=state_dir or tmp_path / "state", listen=("127.0.0.1", 0), **kw
        )
        srv = ControlServer(cfg)
        await srv.start()
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        await srv.stop()


async def new_key(
    srv: ControlServer, user: str = "alice", *, reusable: bool = True, ephemeral: bool = False,
    expiration_s: float | None = 3600, tags: list[str] | None = None,
) -> str:
    if await srv.db.get_user(user) is None:
        await srv.db.create_user(user)
    key, _ = await srv.create_preauth_key(
        user, reusable=reusable, ephemeral=ephemeral, expiration_s=expiration_s, tags=tags or []
    )
    return key


async def join(srv: ControlServer, key: str | None, name: str, **kw: Any) -> TestNode:
    node = TestNode(srv.url, await TestNode.fetch_server_key(srv.url), name)
    await node.register(key, **kw)
    return node


async def expect(
    stream: MapStream, pred: Callable[[Json], bool], within: float = PROPAGATION_BUDGET_S
) -> Json:
    """The first message matching ``pred`` arriving within ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        left = deadline - time.monotonic()
        assert left > 0, "expected map message did not arrive in time"
        try:
            msg = await stream.next(timeout=left)
        except TimeoutError:
            raise AssertionError("expected map message did not arrive in time") from None
        if pred(msg):
            return msg


def changed_ids(msg: Json) -> set[int]:
    return {p["id"] for p in msg.get("peers_changed", [])}


def peer_ids(full: Json) -> set[int]:
    return {p["id"] for p in full["peers"]}


# -- registration and authentication -------------------------------------------------------------


async def test_register_with_auth_key_gives_stable_addresses(make_server: MakeServer) -> None:
    srv = await make_server()
    key = await new_key(srv)
    a = await join(srv, key, "Alice's Laptop")
    assert a.node is not None
    assert a.node["name"] == "alice-s-laptop"
    assert a.node["user"] == "alice"
    assert a.node["addresses"] == ["100.64.0.1/32", "fd7a:115c:a1e0::6440:1/128"]
    assert a.node["node_key"] == a.node_priv.node_public().to_text()
    # Same machine again, no key: same node.
    again = await a.register(None)
    assert again["node"]["id"] == a.id
    assert again["node"]["addresses"] == a.node["addresses"]


async def test_server_key_is_published_and_stored_0600(make_server: MakeServer) -> None:
    srv = await make_server()
    key_file = srv.config.server_key_path
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(srv.config.admin_socket_path).st_mode) == 0o600
    published = await TestNode.fetch_server_key(srv.url)
    assert srv.verifier is not None
    assert published == srv.verifier.public


@pytest.mark.parametrize(
    ("case", "error"),
    [
        ("wrong", "auth key not found"),
        ("expired", "auth key expired"),
        ("used", "auth key already used"),
        ("none", "auth key required: this machine is not registered"),
    ],
)
async def test_register_refusals(make_server: MakeServer, case: str, error: str) -> None:
    srv = await make_server()
    key: str | None
    if case == "wrong":
        await new_key(srv)
        key = "rmauth-" + "00" * 24
    elif case == "expired":
        key = await new_key(srv, expiration_s=0.05)
        await asyncio.sleep(0.1)
    elif case == "used":
        key = await new_key(srv, reusable=False)
        await join(srv, key, "first")
    else:
        key = None
    with pytest.raises(ControlHTTPError) as e:
        await join(srv, key, "b")
    assert e.value.status == 401
    assert e.value.body == {"error": error}


async def test_reusable_key_registers_many_one_off_only_once(make_server: MakeServer) -> None:
    srv = await make_server()
    reusable = await new_key(srv, reusable=True)
    nodes = [await join(srv, reusable, f"n{i}") for i in range(3)]
    assert len({n.id for n in nodes}) == 3
    one_off = await new_key(srv, reusable=False)
    await join(srv, one_off, "x")
    with pytest.raises(ControlHTTPError, match="already used"):
        await join(srv, one_off, "y")


async def test_forged_and_stale_auth_headers_get_401(make_server: MakeServer) -> None:
    srv = await make_server()
    a = await join(srv, await new_key(srv), "a")
    good = a.headers("GET", "/api/v1/map")
    # Claim a's machine key but box with another private key.
    forged = auth_headers(PrivateKey.generate(), a.server_key, "GET", "/api/v1/map", time.time())
    forged[HEADER_MACHINE] = good[HEADER_MACHINE]
    # A box made for another path, a stale timestamp, garbage, nothing.
    other_path = a.headers("POST", "/api/v1/update")
    stale = auth_headers(a.machine, a.server_key, "GET", "/api/v1/map", time.time() - 300)
    garbage = {HEADER_MACHINE: good[HEADER_MACHINE], HEADER_AUTH: "!!notbase64"}
    for hdrs, why in [
        (forged, "does not open"),
        (other_path, "another request"),
        (stale, "timestamp"),
        (garbage, "base64"),
        ({}, "missing"),
    ]:
        with pytest.raises(ControlHTTPError) as e:
            await a.open_map(headers=hdrs)
        assert e.value.status == 401
        assert why in e.value.body["error"]
    stream = await a.open_map(headers=good)
    assert (await stream.next(1))["type"] == "full"
    stream.close()


async def test_bad_register_bodies_are_400(make_server: MakeServer) -> None:
    srv = await make_server()
    n = TestNode(srv.url, await TestNode.fetch_server_key(srv.url))
    with pytest.raises(ControlHTTPError) as e:
        await n.request("POST", "/api/v1/register", {"node_key": "nodekey:zz", "disco_key": ""})
    assert e.value.status == 400
    hdrs = n.headers("POST", "/api/v1/register")
    async with aiohttp.ClientSession() as s:
        r = await s.post(srv.url + "/api/v1/register", data=b"{nope", headers=hdrs)
        assert r.status == 400
        assert await r.json() == {"error": "request body is not JSON"}


async def test_tags_need_key_or_tag_owner(make_server: MakeServer) -> None:
    srv = await make_server()
    await srv.set_policy(
        '{"tagOwners": {"tag:relay": ["alice@"], "tag:web": ["bob@"]},'
        ' "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}'
    )
    key = await new_key(srv, "alice")
    with pytest.raises(ControlHTTPError) as e:
        await join(srv, key, "w", tags=["tag:web"])
    assert e.value.status == 403
    assert e.value.body == {"error": "tag:web not permitted for this key/user"}
    r = await join(srv, key, "r", tags=["tag:relay"])
    assert r.node is not None and r.node["tags"] == ["tag:relay"]
    tagged_key = await new_key(srv, "alice", tags=["tag:web"])
    w = await join(srv, tagged_key, "w2")
    assert w.node is not None and w.node["tags"] == ["tag:web"]


# -- persistence ---------------------------------------------------------------------------------


async def test_restart_keeps_users_keys_nodes_addresses(
    make_server: MakeServer, tmp_path: Path
) -> None:
    state = tmp_path / "persist"
    srv = await make_server(state)
    key = await new_key(srv, reusable=True)
    a = await join(srv, key, "a")
    b = await join(srv, key, "b")
    server_key = srv.verifier.public if srv.verifier else None
    await srv.set_policy('{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:22"]}]}')
    before = {n["id"]: n["addresses"] for n in srv.list_nodes()}
    await srv.stop()

    srv2 = await make_server(state)
    assert srv2.verifier is not None and srv2.verifier.public == server_key
    assert [u.name for u in await srv2.db.list_users()] == ["alice"]
    assert {n["id"]: n["addresses"] for n in srv2.list_nodes()} == before
    assert srv2.hot.policy_version == 1 and "*:22" in srv2.hot.policy.text
    # The daemon comes back with the same machine key and no auth key: same node.
    for node in (a, b):
        node.port = int(srv2.url.rsplit(":", 1)[1])
        reply = await node.register(None)
        assert reply["node"]["id"] == node.id
        assert reply["node"]["addresses"] == before[node.id]
    # The reusable key still works after the restart.
    c = await join(srv2, key, "c")
    assert c.id not in before


async def test_node_key_rotation_keeps_identity_and_tells_peers(make_server: MakeServer) -> None:
    srv = await make_server()
    key = await new_key(srv)
    a = await join(srv, key, "a")
    b = await join(srv, key, "b")
    stream = await a.open_map()
    await stream.next(1)
    b.node_priv = PrivateKey.generate()
    reply = await b.register(None)
    assert reply["node"]["id"] == b.id
    new_key_text = b.node_priv.node_public().to_text()
    msg = await expect(
        stream, lambda m: any(p["node_key"] == new_key_text for p in m.get("peers_changed", []))
    )
    assert msg["type"] == "delta"
    stream.close()


# -- map streaming -------------------------------------------------------------------------------


async def test_full_map_then_deltas_on_join_endpoints_and_leave(make_server: MakeServer) -> None:
    srv = await make_server()
    key = await new_key(srv)
    a = await join(srv, key, "a")
    sa = await a.open_map()
    full = await sa.next(1)
    assert full["type"] == "full"
    assert full["self"]["id"] == a.id and full["self"]["online"] is True
    assert full["peers"] == []
    assert set(full) >= {"version", "packet_filter", "derp_map", "relay"}

    b = await join(srv, key, "b")  # join
    joined = await expect(sa, lambda m: b.id in changed_ids(m))
    assert joined["version"] > full["version"]

    sb = await b.open_map()
    fb = await sb.next(1)
    assert peer_ids(fb) == {a.id}
    await expect(sa, lambda m: any(p["id"] == b.id and p["online"]
                                   for p in m.get("peers_changed", [])))

    await b.update(endpoints=["198.18.0.11:41641"], home_derp=1,
                   relay_server_port=40000, relay_endpoints=["198.18.0.11:40000"])
    upd = await expect(sa, lambda m: b.id in changed_ids(m)
                       and m["peers_changed"][0]["endpoints"] == ["198.18.0.11:41641"])
    peer = upd["peers_changed"][0]
    assert peer["home_derp"] == 1
    assert peer["relay_server_port"] == 40000
    assert peer["relay_endpoints"] == ["198.18.0.11:40000"]
    assert "packet_filter" not in upd  # endpoints do not touch the filter

    sb.close()  # leave: b goes offline
    off = await expect(sa, lambda m: any(p["id"] == b.id and not p["online"]
                                         for p in m.get("peers_changed", [])))
    assert off["type"] == "delta"
    sa.close()


async def test_policy_change_reaches_streams_with_new_filter(make_server: MakeServer) -> None:
    srv = await make_server()
    key = await new_key(srv)
    a = await join(srv, key, "a")
    await join(srv, key, "b")
    sa = await a.open_map()
    full = await sa.next(1)
    assert full["packet_filter"][0]["ports"] == [[0, 65535]]
    t0 = time.monotonic()
    await srv.set_policy('{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:443"]}]}')
    msg = await expect(sa, lambda m: "packet_filter" in m)
    assert time.monotonic() - t0 < PROPAGATION_BUDGET_S
    assert msg["packet_filter"][0]["ports"] == [[443, 443]]
    assert "peers_changed" not in msg and "peers_removed" not in msg  # visibility unchanged
    sa.close()


async def test_peers_are_filtered_by_policy(make_server: MakeServer) -> None:
    srv = await make_server()
    await srv.set_policy(
        """{
          "tagOwners": {"tag:b": ["alice@"], "tag:c": ["alice@"]},
          // only A may reach B; C is alone
          "acls": [{"action": "accept", "src": ["alice@"], "dst": ["tag:b:*"]}],
        }"""
    )
    a = await join(srv, await new_key(srv), "a")
    b = await join(srv, await new_key(srv, tags=["tag:b"]), "b")
    c = await join(srv, await new_key(srv, tags=["tag:c"]), "c")
    fulls = {}
    streams = {}
    for n in (a, b, c):
        streams[n.id] = await n.open_map()
        fulls[n.id] = await streams[n.id].next(1)
    assert peer_ids(fulls[a.id]) == {b.id}
    assert peer_ids(fulls[b.id]) == {a.id}
    assert peer_ids(fulls[c.id]) == set()
    assert fulls[a.id]["packet_filter"] == []  # nobody may open connections to A
    assert fulls[b.id]["packet_filter"][0]["src"] == ["100.64.0.1/32", "fd7a:115c:a1e0::6440:1/128"]
    # Widen the policy: C now sees A and B via a delta.
    await srv.set_policy(
        """{"tagOwners": {"tag:b": ["alice@"], "tag:c": ["alice@"]},
           "acls": [{"action": "accept", "src": ["alice@"], "dst": ["tag:b:*"]},
                    {"action": "accept", "src": ["tag:c"], "dst": ["*:*"]}]}"""
    )
    msg = await expect(streams[c.id], lambda m: changed_ids(m) == {a.id, b.id})
    assert msg["type"] == "delta"
    # And deny everything: A loses both peers in one delta.
    await srv.set_policy('{"tagOwners": {"tag:b": ["alice@"], "tag:c": ["alice@"]}, "acls": []}')
    gone = await expect(streams[a.id], lambda m: "peers_removed" in m)
    assert gone["peers_removed"] == sorted([b.id, c.id])
    for s in streams.values():
        s.close()


async def test_relay_capability_in_both_directions(make_server: MakeServer) -> None:
    srv = await make_server()
    await srv.set_policy(
        '{"tagOwners": {"tag:relay": ["alice@"]},'
        ' "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],'
        ' "grants": [{"src": ["alice@"], "dst": ["tag:relay"], "app": {"'
        + RELAY_CAP + '": [{}]}}]}'
    )
    a = await join(srv, await new_key(srv), "a")
    r = await join(srv, await new_key(srv, tags=["tag:relay"]), "r")
    sr = await r.open_map()
    sa = await a.open_map()
    fr = await sr.next(1)
    fa = await sa.next(1)
    assert fr["relay"]["serve_for"] == [a.node_priv.node_public().to_text()]
    assert fa["relay"]["may_use"] == [r.id]
    assert fa["relay"]["serve_for"] == []
    sr.close()
    sa.close()


async def test_bad_policy_refused_with_position_old_stays(make_server: MakeServer) -> None:
    srv = await make_server()
    a = await join(srv, await new_key(srv), "a")
    sa = await a.open_map()
    await sa.next(1)
    ssh_only = '{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:22"]}]}'
    version = await srv.set_policy(ssh_only)
    await expect(sa, lambda m: "packet_filter" in m)
    bad = '{\n  "acls": [\n    {"action": "accept", "src": ["*"], "dst": ["*:99999"]}\n  ]\n}'
    async with aiohttp.ClientSession(
        connector=aiohttp.UnixConnector(path=str(srv.config.admin_socket_path))
    ) as s:
        r = await s.put("http://x/admin/v1/policy", json={"policy": bad})
        assert r.status == 400
        err = (await r.json())["error"]
        assert err.startswith("line 3, column ")
        r = await s.get("http://x/admin/v1/policy")
        body = await r.json()
    assert body["version"] == version and "*:22" in body["policy"]
    # No delta was sent for the refused policy.
    with pytest.raises(TimeoutError):
        await sa.next(timeout=0.3)
    sa.close()


async def test_policy_file_bad_at_start_is_refused(make_server: MakeServer, tmp_path: Path) -> None:
    pfile = tmp_path / "policy.hujson"
    pfile.write_text('{\n  "acls": [\n    {"action": "drop", "src": ["*"], "dst": ["*:*"]},\n]}')
    with pytest.raises(ConfigError) as e:
        await make_server(policy_file=pfile)
    assert str(e.value).startswith(f"{pfile}:3:")
    assert "accept" in str(e.value)


async def test_sighup_reload_applies_good_file_keeps_old_on_bad(
    make_server: MakeServer, tmp_path: Path
) -> None:
    pfile = tmp_path / "policy.hujson"
    pfile.write_text('{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:22"]}]}')
    srv = await make_server(policy_file=pfile)
    a = await join(srv, await new_key(srv), "a")
    sa = await a.open_map()
    assert (await sa.next(1))["packet_filter"][0]["ports"] == [[22, 22]]
    pfile.write_text('{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:80"]}]}')
    await srv.reload()
    assert (await expect(sa, lambda m: "packet_filter" in m))["packet_filter"][0]["ports"] == [
        [80, 80]
    ]
    pfile.write_text('{"acls": [ oops ]}')
    await srv.reload()
    assert '"*:80"' in srv.hot.policy.text
    with pytest.raises(TimeoutError):
        await sa.next(timeout=0.3)
    sa.close()


async def test_delete_node_logs_it_out_and_removes_it_from_peers(make_server: MakeServer) -> None:
    srv = await make_server()
    key = await new_key(srv)
    a = await join(srv, key, "a")
    b = await join(srv, key, "b")
    sa, sb = await a.open_map(), await b.open_map()
    await sa.next(1)
    await sb.next(1)
    await srv.delete_node(b.id)
    assert await expect(sb, lambda m: m["type"] == "logout") == {
        "type": "logout", "reason": "node deleted"
    }
    with pytest.raises(EOFError):
        await sb.next(1)
    removed = await expect(sa, lambda m: "peers_removed" in m)
    assert removed["peers_removed"] == [b.id]
    # The deleted machine must authenticate with a key again.
    with pytest.raises(ControlHTTPError, match="auth key required"):
        await b.register(None)
    sa.close()


async def test_expired_node_is_logged_out_and_needs_a_key(make_server: MakeServer) -> None:
    srv = await make_server()
    key = await new_key(srv)
    a = await join(srv, key, "a")
    b = await join(srv, key, "b")
    sa, sb = await a.open_map(), await b.open_map()
    await sa.next(1)
    await sb.next(1)
    await srv.expire_node(b.id)
    assert (await expect(sb, lambda m: m["type"] == "logout"))["reason"] == "node key expired"
    assert (await expect(sa, lambda m: "peers_removed" in m))["peers_removed"] == [b.id]
    with pytest.raises(ControlHTTPError) as e:
        await b.register(None)
    assert e.value.status == 401 and "expired" in e.value.body["error"]
    again = await b.register(key)  # re-authenticate: same node, same address
    assert again["node"]["id"] == b.id and again["node"]["key_expiry"] is None
    await expect(sa, lambda m: b.id in changed_ids(m))
    sa.close()


async def test_logout_of_ephemeral_node_deletes_it(make_server: MakeServer) -> None:
    srv = await make_server()
    key = await new_key(srv)
    a = await join(srv, key, "a", ephemeral=True)
    await a.logout()
    assert a.id not in srv.hot.nodes
    assert await srv.db.get_node(a.id) is None


async def test_ephemeral_node_removed_after_grace(make_server: MakeServer) -> None:
    srv = await make_server(ephemeral_grace=0.3)
    key = await new_key(srv)
    eph = await new_key(srv, ephemeral=True)
    a = await join(srv, key, "a")
    e = await join(srv, eph, "e")
    sa, se = await a.open_map(), await e.open_map()
    await sa.next(1)
    await se.next(1)
    se.close()
    offline_at = time.monotonic()
    removed = await expect(sa, lambda m: "peers_removed" in m, within=3.0)
    assert removed["peers_removed"] == [e.id]
    assert time.monotonic() - offline_at >= 0.3
    assert await srv.db.get_node(e.id) is None
    sa.close()


async def test_ephemeral_node_that_reconnects_in_grace_stays(make_server: MakeServer) -> None:
    srv = await make_server(ephemeral_grace=0.5)
    e = await join(srv, await new_key(srv, ephemeral=True), "e")
    s1 = await e.open_map()
    await s1.next(1)
    s1.close()
    await asyncio.sleep(0.2)
    s2 = await e.open_map()
    await s2.next(1)
    await asyncio.sleep(0.6)
    assert e.id in srv.hot.nodes
    s2.close()


async def test_keepalive_on_idle_stream(make_server: MakeServer) -> None:
    srv = await make_server(keepalive=0.2)
    a = await join(srv, await new_key(srv), "a")
    sa = await a.open_map()
    await sa.next(1)
    assert await sa.next(timeout=1.0, skip_keepalive=False) == {"type": "keepalive"}
    sa.close()


async def test_burst_of_changes_is_coalesced_into_one_compile(make_server: MakeServer) -> None:
    srv = await make_server(coalesce=0.05)
    key = await new_key(srv)
    a = await join(srv, key, "a")
    sa = await a.open_map()
    await sa.next(1)
    compiles = srv.hot.compiles
    nodes = [TestNode(srv.url, a.server_key, f"n{i}") for i in range(5)]
    await asyncio.gather(*(n.register(key) for n in nodes))
    want = {n.id for n in nodes}
    seen: set[int] = set()
    while seen != want:
        seen |= changed_ids(await expect(sa, lambda m: bool(changed_ids(m))))
    # Five joins in one burst: far fewer compiles than joins (the lock serialises the DB
    # writes, so a burst may straddle a window or two).
    assert srv.hot.compiles - compiles < len(nodes)
    sa.close()


async def test_update_from_unknown_machine_is_401(make_server: MakeServer) -> None:
    srv = await make_server()
    n = TestNode(srv.url, await TestNode.fetch_server_key(srv.url))
    with pytest.raises(ControlHTTPError) as e:
        await n.update(endpoints=["1.2.3.4:5"])
    assert e.value.status == 401 and e.value.body == {"error": "machine not registered"}


# -- admin API over TCP --------------------------------------------------------------------------


async def test_admin_tcp_needs_api_key(make_server: MakeServer) -> None:
    srv = await make_server(admin_listen=("127.0.0.1", 0))
    assert srv.api_keys is not None
    key = srv.api_keys.create(time.time())
    assert stat.S_IMODE(os.stat(srv.config.api_keys_path).st_mode) == 0o600
    assert key not in srv.config.api_keys_path.read_text()  # stored hashed
    async with aiohttp.ClientSession() as s:
        r = await s.get(srv.admin_url + "/admin/v1/users")
        assert r.status == 401
        r = await s.get(srv.admin_url + "/admin/v1/users",
                        headers={"Authorization": "Bearer rmapi-wrong"})
        assert r.status == 401
        r = await s.post(srv.admin_url + "/admin/v1/users", json={"name": "bob"},
                         headers={"Authorization": f"Bearer {key}"})
        assert r.status == 200
        assert (await r.json())["name"] == "bob"
        r = await s.post(srv.admin_url + "/admin/v1/users", json={"name": "bob"},
                         headers={"Authorization": f"Bearer {key}"})
        assert r.status == 409
        assert "already exists" in json.loads(await r.text())["error"]


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(1)
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))
    return cert_file, key_file


async def test_tls_listener(make_server: MakeServer, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    srv = await make_server(tls_cert=cert, tls_key=key)
    assert srv.url.startswith("https://")
    async with aiohttp.ClientSession() as s:
        r = await s.get(srv.url + "/key", ssl=False)
        assert r.status == 200
        assert (await r.json())["server_key"].startswith("mkey:")
    with pytest.raises(ConfigError, match="go together"):
        await make_server(state_dir=tmp_path / "other", tls_cert=cert)


async def test_gc_freeze_after_growth_only_when_enabled(make_server: MakeServer) -> None:
    import gc
    from dataclasses import replace
    from ipaddress import IPv4Address, IPv6Address

    srv = await make_server(gc_freeze=True)
    a = await join(srv, await new_key(srv), "a")
    base = srv.hot.nodes[a.id].rec
    await asyncio.sleep(0.2)  # the registration's flush has run: nothing pending
    gc.unfreeze()
    try:
        srv._gc_tune()
        assert gc.get_freeze_count() == 0  # one node: nothing worth freezing
        for i in range(2, 200):
            srv.hot.upsert(replace(
                base, id=i, machine_key=PrivateKey.generate().machine_public(),
                ipv4=IPv4Address(0x64400000 + i), ipv6=IPv6Address((0xFD7A115CA1E0 << 80) + i),
            ), recompile=False)
        srv._gc_tune()
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


async def test_stream_over_its_queue_limit_is_cut_and_reconnect_gets_full(
    make_server: MakeServer,
) -> None:
    # A limit of 0 makes every delta overflow: the cut path without depending on socket buffers.
    srv = await make_server(stream_queue_max=0)
    key = await new_key(srv)
    a = await join(srv, key, "a")
    sa = await a.open_map()
    assert (await sa.next(1))["type"] == "full"
    b = await join(srv, key, "b")
    with pytest.raises(EOFError):
        await sa.next(2)
    again = await a.open_map()
    full = await again.next(1)
    assert full["type"] == "full" and peer_ids(full) == {b.id}
    again.close()
