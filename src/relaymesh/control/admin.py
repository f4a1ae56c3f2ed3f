"""Admin API of the coordination server (control-protocol.md §2), as an aiohttp application.

The same application is served on the unix socket (trusted by file mode 0600, no key) and, with
``--admin-listen``, on TCP where every request needs ``Authorization: Bearer <api key>``. The
handlers only translate HTTP to :class:`~.server.ControlServer` operations; errors leave as
``{"error": "..."}`` through :func:`~.server.json_error_middleware`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from relaymesh.control.models import PreauthKeyRecord, UserRecord
from relaymesh.control.policy import Policy
from relaymesh.control.server import ApiError, json_error_middleware, read_json

if TYPE_CHECKING:
    from relaymesh.control.server import ControlServer

__all__ = ["build_admin_app", "key_json", "user_json"]

Json = dict[str, Any]
DEFAULT_KEY_EXPIRATION_S = 3600.0  # a pre-auth key lives one hour unless told otherwise


def user_json(u: UserRecord) -> Json:
    return {"id": u.id, "name": u.name, "created_at": u.created_at.timestamp()}


def key_json(k: PreauthKeyRecord) -> Json:
    return {
        "id": k.id,
        "prefix": k.prefix,
        "user": k.user,
        "reusable": k.reusable,
        "ephemeral": k.ephemeral,
        "tags": list(k.tags),
        "expires_at": None if k.expires_at is None else k.expires_at.timestamp(),
        "used": k.used,
        "created_at": k.created_at.timestamp(),
    }


def _node_id(request: web.Request) -> int:
    text = request.match_info["id"]
    if not text.isdigit():
        raise ApiError(400, f"node id must be a number, got {text!r}")
    return int(text)


def _text(body: Json, key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"{key!r} must be a non-empty string")
    return value


def build_admin_app(server: ControlServer, *, require_api_key: bool) -> web.Application:
    """The admin routes bound to ``server``; ``require_api_key`` for the TCP listener."""

    @web.middleware
    async def api_key_auth(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        scheme, _, key = auth.partition(" ")
        keys = server.api_keys
        if scheme.lower() != "bearer" or not key or keys is None or not keys.check(key.strip()):
            return web.json_response({"error": "missing or invalid API key"}, status=401)
        return await handler(request)

    async def users_list(request: web.Request) -> web.Response:
        return web.json_response([user_json(u) for u in await server.db.list_users()])

    async def users_create(request: web.Request) -> web.Response:
        body = await read_json(request)
        return web.json_response(user_json(await server.db.create_user(_text(body, "name"))))

    async def keys_list(request: web.Request) -> web.Response:
        user = request.query.get("user") or None
        return web.json_response([key_json(k) for k in await server.db.list_preauth_keys(user)])

    async def keys_create(request: web.Request) -> web.Response:
        body = await read_json(request)
        exp = body.get("expiration_s", DEFAULT_KEY_EXPIRATION_S)
        if exp is not None and (not isinstance(exp, int | float) or isinstance(exp, bool)
                                or exp <= 0):
            raise ApiError(400, "'expiration_s' must be a positive number or null (never)")
        tags = body.get("tags") or []
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise ApiError(400, "'tags' must be a list of strings")
        key, rec = await server.create_preauth_key(
            _text(body, "user"),
            reusable=bool(body.get("reusable", False)),
            ephemeral=bool(body.get("ephemeral", False)),
            expiration_s=None if exp is None else float(exp),
            tags=tags,
        )
        return web.json_response({"key": key, **key_json(rec)})

    async def keys_expire(request: web.Request) -> web.Response:
        body = await read_json(request)
        rec = await server.expire_preauth_key(_text(body, "user"), _text(body, "key"))
        return web.json_response(key_json(rec))

    async def nodes_list(request: web.Request) -> web.Response:
        return web.json_response(server.list_nodes())

    async def node_rename(request: web.Request) -> web.Response:
        body = await read_json(request)
        return web.json_response(await server.rename_node(_node_id(request), _text(body, "name")))

    async def node_tag(request: web.Request) -> web.Response:
        body = await read_json(request)
        tags = body.get("tags")
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise ApiError(400, "'tags' must be a list of strings")
        return web.json_response(await server.tag_node(_node_id(request), tags))

    async def node_expire(request: web.Request) -> web.Response:
        return web.json_response(await server.expire_node(_node_id(request)))

    async def node_delete(request: web.Request) -> web.Response:
        await server.delete_node(_node_id(request))
        return web.json_response({})

    async def policy_get(request: web.Request) -> web.Response:
        hot = server.hot
        return web.json_response({"policy": hot.policy.text, "version": hot.policy_version})

    async def policy_put(request: web.Request) -> web.Response:
        body = await read_json(request)
        version = await server.set_policy(_text(body, "policy"))
        return web.json_response({"version": version})

    async def policy_check(request: web.Request) -> web.Response:
        body = await read_json(request)
        Policy.parse(_text(body, "policy"))
        return web.json_response({"ok": True})

    async def apikeys_create(request: web.Request) -> web.Response:
        assert server.api_keys is not None
        return web.json_response({"key": server.api_keys.create(server.clock())})

    middlewares = [json_error_middleware]
    if require_api_key:
        middlewares.append(api_key_auth)
    app = web.Application(middlewares=middlewares, client_max_size=1024 * 1024)
    app.add_routes(
        [
            web.get("/admin/v1/users", users_list),
            web.post("/admin/v1/users", users_create),
            web.get("/admin/v1/preauthkeys", keys_list),
            web.post("/admin/v1/preauthkeys", keys_create),
            web.post("/admin/v1/preauthkeys/expire", keys_expire),
            web.get("/admin/v1/nodes", nodes_list),
            web.post("/admin/v1/nodes/{id}/rename", node_rename),
            web.post("/admin/v1/nodes/{id}/tag", node_tag),
            web.post("/admin/v1/nodes/{id}/expire", node_expire),
            web.delete("/admin/v1/nodes/{id}", node_delete),
            web.get("/admin/v1/policy", policy_get),
            web.put("/admin/v1/policy", policy_put),
            web.post("/admin/v1/policy/check", policy_check),
            web.post("/admin/v1/apikeys", apikeys_create),
        ]
    )
    return app
