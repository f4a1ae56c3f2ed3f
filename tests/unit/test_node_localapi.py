"""Local API over a real unix socket with a fake backend: routes, validation, error shape, 0600."""

from __future__ import annotations

import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from relaymesh.node.backend import APIError
from relaymesh.node.localapi import SocketInUse, bind_unix, close, make_app, serve


class FakeBackend:
    """Records calls; answers like a running node with one peer."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.fail_up: APIError | None = None

    async def up(self, req: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("up", req))
        if self.fail_up is not None:
            raise self.fail_up
        return self.status()

    async def down(self) -> dict[str, Any]:
        self.calls.append(("down", None))
        return {"backend_state": "Stopped", "self": {}, "peers": []}

    def status(self) -> dict[str, Any]:
        return {"backend_state": "Running",
                "self": {"name": "a", "addresses": ["100.64.0.1/32"], "node_key": "nodekey:00",
                         "online": True},
                "peers": [{"name": "b", "addresses": ["100.64.0.2/32"], "node_key": "nodekey:11",
                           "path": "direct", "endpoint": "198.18.0.11:41641", "tx_bytes": 1,
                           "rx_bytes": 2, "last_handshake": None, "online": True}]}

    def ip(self) -> dict[str, Any]:
        return {"ipv4": "100.64.0.1", "ipv6": "fd7a:115c:a1e0::1"}

    async def ping(self, peer: str, count: int, timeout: float) -> dict[str, Any]:
        self.calls.append(("ping", (peer, count, timeout)))
        if peer != "b":
            raise APIError(404, f"no peer {peer!r} in the network map")
        return {"results": [{"peer": "b", "ip": "100.64.0.2", "path": "direct",
                             "detail": "198.18.0.11:41641", "latency_ms": 0.42}] * count}

    def get_prefs(self) -> dict[str, Any]:
        return {"relay_server_port": 40000, "hostname": None, "path_policy": {}}

    async def patch_prefs(self, patch: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("patch", patch))
        return self.get_prefs()

    def netcheck(self) -> dict[str, Any]:
        raise APIError(501, "not available yet: needs DERP (next issue)")

    def debug_path(self, peer: str) -> list[dict[str, Any]]:
        return []

    def debug_peer_relay_sessions(self) -> list[dict[str, Any]]:
        raise RuntimeError("boom")


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[FakeBackend, aiohttp.ClientSession, Path]]:
    fake = FakeBackend()
    path = tmp_path / "d.sock"
    runner = await serve(make_app(fake), path)
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path))) as s:
        yield fake, s, path
    await close(runner, path)


U = "http://local"


async def test_socket_is_private(api: tuple[FakeBackend, aiohttp.ClientSession, Path]) -> None:
    _, _, path = api
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_up_passes_validated_fields(
        api: tuple[FakeBackend, aiohttp.ClientSession, Path]) -> None:
    fake, s, _ = api
    body = {"login_server": "http://x:8080", "auth_key": "rmauth-1", "hostname": "a",
            "advertise_tags": ["tag:relay"], "relay_server_port": 40000}
    async with s.post(U + "/local/v1/up", json=body) as r:
        assert r.status == 200
        assert (await r.json())["backend_state"] == "Running"
    assert fake.calls == [("up", body)]


@pytest.mark.parametrize("body,needle", [
    ({"advertise_tags": ["relay"]}, "tag:NAME"),
    ({"relay_server_port": 70000}, "0..65535"),
    ({"auth_key": 5}, "auth_key must be a string"),
])
async def test_up_rejects_bad_fields_with_one_line(
        api: tuple[FakeBackend, aiohttp.ClientSession, Path], body: dict[str, Any],
        needle: str) -> None:
    fake, s, _ = api
    async with s.post(U + "/local/v1/up", json=body) as r:
        assert r.status == 400
        err = (await r.json())["error"]
    assert needle in err and "\n" not in err
    assert fake.calls == []


async def test_backend_error_keeps_status_and_message(
        api: tuple[FakeBackend, aiohttp.ClientSession, Path]) -> None:
    fake, s, _ = api
    fake.fail_up = APIError(401, "auth key expired")
    async with s.post(U + "/local/v1/up", json={"auth_key": "k"}) as r:
        assert r.status == 401
        assert await r.json() == {"error": "auth key expired"}


async def test_ping_validates_count_and_forwards(
        api: tuple[FakeBackend, aiohttp.ClientSession, Path]) -> None:
    fake, s, _ = api
    async with s.post(U + "/local/v1/ping", json={"peer": "b", "count": 0}) as r:
        assert r.status == 400
    async with s.post(U + "/local/v1/ping", json={"peer": "b", "count": 2, "timeout": 1}) as r:
        assert r.status == 200
        assert len((await r.json())["results"]) == 2
    assert fake.calls == [("ping", ("b", 2, 1.0))]
    async with s.post(U + "/local/v1/ping", json={"peer": "zz"}) as r:
        assert r.status == 404


async def test_unexpected_backend_exception_is_a_500_line(
        api: tuple[FakeBackend, aiohttp.ClientSession, Path]) -> None:
    _, s, _ = api
    async with s.get(U + "/local/v1/debug/peer-relay-sessions") as r:
        assert r.status == 500
        assert (await r.json())["error"] == "internal error: RuntimeError: boom"


async def test_non_json_body_and_unknown_route(
        api: tuple[FakeBackend, aiohttp.ClientSession, Path]) -> None:
    _, s, _ = api
    async with s.post(U + "/local/v1/ping", data=b"{nope") as r:
        assert r.status == 400
        assert (await r.json())["error"] == "request body is not JSON"
    async with s.get(U + "/local/v1/nothing") as r:
        assert r.status == 404
        assert "error" in await r.json()


async def test_second_daemon_on_a_live_socket_is_refused(
        api: tuple[FakeBackend, aiohttp.ClientSession, Path]) -> None:
    _, _, path = api
    with pytest.raises(SocketInUse):
        bind_unix(path)


def test_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    bind_unix(path).close()  # leaves the file, nobody listening
    s = bind_unix(path)
    s.close()
