"""The local API (docs/control-protocol.md section 3): aiohttp on a unix socket, mode 0600.

Only the CLI talks to it. Request bodies are validated here (types, ranges) so the backend sees
clean values; every failure is ``{"error": "one line"}`` with a 4xx/5xx status, never a traceback.
The backend is a protocol so tests drive the API with a fake.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from relaymesh.node.backend import APIError

log = logging.getLogger(__name__)

SOCKET_MODE = 0o600  # root's CLI only: the API can bring the tunnel up and down
MAX_PING_COUNT = 1000  # bounds one request's duration together with MAX_PING_TIMEOUT
MAX_PING_TIMEOUT = 60.0  # s per probe


class LocalBackend(Protocol):
    async def up(self, req: dict[str, Any]) -> dict[str, Any]: ...

    async def down(self) -> dict[str, Any]: ...

    def status(self) -> dict[str, Any]: ...

    def ip(self) -> dict[str, Any]: ...

    async def ping(self, peer: str, count: int, timeout: float) -> dict[str, Any]: ...

    def get_prefs(self) -> dict[str, Any]: ...

    async def patch_prefs(self, patch: dict[str, Any]) -> dict[str, Any]: ...

    async def netcheck(self) -> dict[str, Any]: ...

    def debug_path(self, peer: str) -> list[dict[str, Any]]: ...

    def debug_peer_relay_sessions(self) -> dict[str, Any]: ...

    def metrics(self) -> dict[str, Any]: ...


def _err(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        obj = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "request body is not JSON") from None
    if not isinstance(obj, dict):
        raise APIError(400, "request body must be a JSON object")
    return obj


def _str_or_none(obj: dict[str, Any], key: str) -> str | None:
    v = obj.get(key)
    if v is None or isinstance(v, str):
        return v
    raise APIError(400, f"{key} must be a string")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except APIError as e:
        return _err(e.status, e.message)
    except web.HTTPException as e:
        return _err(e.status, e.reason)
    except Exception as e:  # one line to the CLI; the traceback stays in the daemon's log
        log.exception("local API %s %s failed", request.method, request.path)
        return _err(500, f"internal error: {type(e).__name__}: {e}")


def make_app(backend: LocalBackend) -> web.Application:
    app = web.Application(middlewares=[_errors])
    r = app.router

    async def up(request: web.Request) -> web.Response:
        b = await _body(request)
        req: dict[str, Any] = {
            "login_server": _str_or_none(b, "login_server"),
            "auth_key": _str_or_none(b, "auth_key"),
            "hostname": _str_or_none(b, "hostname"),
        }
        tags = b.get("advertise_tags")
        if tags is not None:
            if not isinstance(tags, list) or not all(
                isinstance(t, str) and t.startswith("tag:") and len(t) > 4 for t in tags
            ):
                raise APIError(400, "advertise_tags must be a list of tag:NAME strings")
            req["advertise_tags"] = tags
        port = b.get("relay_server_port")
        if port is not None and (isinstance(port, bool) or not isinstance(port, int)
                                 or not 0 <= port <= 65535):
            raise APIError(400, "relay_server_port must be 0..65535")
        req["relay_server_port"] = port
        return web.json_response(await backend.up(req))

    async def down(request: web.Request) -> web.Response:
        return web.json_response(await backend.down())

    async def status(request: web.Request) -> web.Response:
        return web.json_response(backend.status())

    async def ip(request: web.Request) -> web.Response:
        return web.json_response(backend.ip())

    async def ping(request: web.Request) -> web.Response:
        b = await _body(request)
        peer = b.get("peer")
        if not isinstance(peer, str) or not peer:
            raise APIError(400, "peer (a name or tailnet IP) is required")
        count = b.get("count", 1)
        if isinstance(count, bool) or not isinstance(count, int) or not (
            1 <= count <= MAX_PING_COUNT
        ):
            raise APIError(400, f"count must be 1..{MAX_PING_COUNT}")
        timeout = b.get("timeout", 5)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not (
            0 < timeout <= MAX_PING_TIMEOUT
        ):
            raise APIError(400, f"timeout must be in (0, {MAX_PING_TIMEOUT:g}] seconds")
        return web.json_response(await backend.ping(peer, count, float(timeout)))

    async def get_prefs(request: web.Request) -> web.Response:
        return web.json_response(backend.get_prefs())

    async def patch_prefs(request: web.Request) -> web.Response:
        return web.json_response(await backend.patch_prefs(await _body(request)))

    async def netcheck(request: web.Request) -> web.Response:
        return web.json_response(await backend.netcheck())

    async def debug_path(request: web.Request) -> web.Response:
        peer = request.query.get("peer")
        if not peer:
            raise APIError(400, "peer query parameter is required")
        return web.json_response(backend.debug_path(peer))

    async def relay_sessions(request: web.Request) -> web.Response:
        return web.json_response(backend.debug_peer_relay_sessions())

    async def metrics(request: web.Request) -> web.Response:
        return web.json_response(backend.metrics())

    r.add_post("/local/v1/up", up)
    r.add_post("/local/v1/down", down)
    r.add_get("/local/v1/status", status)
    r.add_get("/local/v1/ip", ip)
    r.add_post("/local/v1/ping", ping)
    r.add_get("/local/v1/prefs", get_prefs)
    r.add_patch("/local/v1/prefs", patch_prefs)
    r.add_get("/local/v1/netcheck", netcheck)
    r.add_get("/local/v1/debug/path", debug_path)
    r.add_get("/local/v1/debug/peer-relay-sessions", relay_sessions)
    r.add_get("/local/v1/metrics", metrics)
    return app


class SocketInUse(RuntimeError):
    pass


def bind_unix(path: Path) -> socket.socket:
    """A listening unix socket at ``path`` with mode 0600 from the start (umask, then chmod).

    A stale socket file (nobody answers) is replaced; a live one means another daemon runs.
    """
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()
        else:
            raise SocketInUse(f"{path} is in use: another `relaymesh daemon` is running")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, SOCKET_MODE)
    sock.listen(64)
    sock.setblocking(False)
    return sock


async def serve(app: web.Application, path: Path) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = bind_unix(path)
    site = web.SockSite(runner, sock)
    await site.start()
    return runner


async def close(runner: web.AppRunner, path: Path) -> None:
    await runner.cleanup()
    with contextlib.suppress(OSError):
        path.unlink()
