"""The coordination server: node API (control-protocol.md §1) over aiohttp, admin operations.

:class:`ControlServer` owns the store (persistence), the :class:`~.state.HotState` (everything
served), the machine-key verifier and the listeners. Every mutation follows one order: write the
database, then update the hot state, then schedule one coalesced flush (``config.coalesce``
later) that recompiles the policy at most once and fans deltas out to the map streams' queues.
Mutations are serialised by one asyncio lock so the hot state never sees records out of order.

A node is online while it holds a map stream; the server notices a closed stream at once
(handler cancellation is on), marks the node offline and, for an ephemeral node, deletes it after
``config.ephemeral_grace`` unless it reconnects. Key expiry is checked once a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import hmac
import json
import logging
import os
import signal
import ssl
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from aiohttp import web
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from relaymesh.control.auth import (
    HEADER_AUTH,
    HEADER_MACHINE,
    ApiKeys,
    AuthError,
    MachineVerifier,
    load_or_create_private_key,
)
from relaymesh.control.config import ConfigError, ServerConfig, load_derp_map
from relaymesh.control.derp import (
    EmbeddedDerp,
    TailnetKeys,
    embedded_region,
    load_or_create_token,
    merge_derp_map,
)
from relaymesh.control.models import NodeRecord, PreauthKeyRecord, PreauthKeyRow
from relaymesh.control.policy import DEFAULT_POLICY_TEXT, Policy, PolicyError
from relaymesh.control.state import HotNode, HotState, Subscription
from relaymesh.control.store import (
    AlreadyExistsError,
    NotFoundError,
    PreauthKeyExpiredError,
    PreauthKeyInvalidError,
    PreauthKeyUsedError,
    Store,
    StoreError,
)
from relaymesh.keys import DiscoKey, KeyError_, MachineKey, NodeKey

__all__ = [
    "ApiError",
    "ControlServer",
    "json_error_middleware",
    "read_json",
    "run_server",
]

log = logging.getLogger("relaymesh.control")

Json = dict[str, Any]
NDJSON = "application/x-ndjson"
KEEPALIVE_LINE = b'{"type":"keepalive"}\n'
# Upper bound of the adaptive coalescing delay: keeps a change's propagation well under 1 s.
MAX_ADAPTIVE_COALESCE_S = 0.3
HOUSEKEEPING_S = 1.0  # key-expiry sweep period: expiry is enforced within this delay
GC_FREEZE_GROWTH = 1.25  # re-freeze after the node count grew by a quarter
GC_FREEZE_MIN_NODES = 100  # below this a full GC pass is cheap: do not bother
STOP_PERSIST_S = 2.0  # at shutdown, how long we keep writing last_seen of closed streams
MAX_ENDPOINTS = 64  # an update listing more is garbage, not a node
MAX_BODY = 64 * 1024

# control-protocol.md §1 error strings (clients may show them verbatim).
ERR_KEY_NOT_FOUND = "auth key not found"
ERR_KEY_EXPIRED = "auth key expired"
ERR_KEY_USED = "auth key already used"
ERR_KEY_REQUIRED = "auth key required: this machine is not registered"
ERR_NODE_EXPIRED = "node key expired: log in again with an auth key"
ERR_NOT_REGISTERED = "machine not registered"


class ApiError(Exception):
    """An error answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


@web.middleware
async def json_error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every error leaves as ``{"error": "..."}`` with a 4xx/5xx status, never as HTML."""
    try:
        return await handler(request)
    except ApiError as e:
        return web.json_response({"error": e.message}, status=e.status)
    except PolicyError as e:
        return web.json_response({"error": str(e)}, status=400)
    except NotFoundError as e:
        return web.json_response({"error": str(e)}, status=404)
    except AlreadyExistsError as e:
        return web.json_response({"error": str(e)}, status=409)
    except (ValueError, StoreError) as e:
        return web.json_response({"error": str(e)}, status=400)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return web.json_response({"error": e.reason}, status=e.status)


async def read_json(request: web.Request) -> Json:
    """The request body as a JSON object, or a 400."""
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "request body is not JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


def _str_list(body: Json, key: str, limit: int = MAX_ENDPOINTS) -> list[str]:
    value = body.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ApiError(400, f"{key!r} must be a list of strings")
    if len(value) > limit:
        raise ApiError(400, f"{key!r} lists more than {limit} entries")
    return list(value)


def _opt_port(body: Json, key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 65535:
        raise ApiError(400, f"{key!r} must be a port number or null")
    return value


def _hash_key(key: str) -> str:
    # Same digest as relaymesh.control.store (SHA-256 hex of the full key text).
    return hashlib.sha256(key.encode()).hexdigest()


class ControlServer:
    """One coordination server. ``await start()``, then ``await stop()``."""

    def __init__(self, config: ServerConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.store: Store | None = None
        self.state: HotState | None = None
        self.verifier: MachineVerifier | None = None
        self.api_keys: ApiKeys | None = None
        self.url = ""
        self.admin_url = ""
        self._runners: list[web.AppRunner] = []
        self._lock = asyncio.Lock()
        self._flush_handle: asyncio.TimerHandle | None = None
        self._ephemeral_timers: dict[int, asyncio.TimerHandle] = {}
        self._expired: set[int] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._housekeeper: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._offline_pending: dict[int, None] = {}  # ordered set of node ids to persist
        self._offline_wakeup = asyncio.Event()
        self._stopping = False
        self._gc_frozen_at = GC_FREEZE_MIN_NODES
        self._last_flush_end = 0.0
        self.last_flush_s = 0.0  # wall time of the last fan-out (recompile + deltas)
        self.last_flush_cpu_s = 0.0  # its CPU time (differs from wall when the host is busy)
        self.derp: EmbeddedDerp | None = None  # `--derp`: the embedded DERP+STUN server
        self.derp_keys = TailnetKeys(clock())  # what GET /derp/v1/nodes answers
        self._derp_region: Json | None = None
        self._derp_token = ""
        self._derp_membership_rev = -1

    # -- lifecycle --------------------------------------------------------------------------------

    @property
    def hot(self) -> HotState:
        assert self.state is not None, "server not started"
        return self.state

    @property
    def db(self) -> Store:
        assert self.store is not None, "server not started"
        return self.store

    async def start(self) -> None:
        """Open the state dir and database, load the policy and nodes, start listening.

        Raises :class:`ConfigError` (one line: ``FILE:LINE:COL: reason`` for a bad policy file).
        """
        cfg = self.config
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(cfg.state_dir, 0o700)
        server_key = load_or_create_private_key(cfg.server_key_path)
        self.verifier = MachineVerifier(server_key, cfg.auth_max_skew)
        self.api_keys = ApiKeys(cfg.api_keys_path)
        self._derp_token = load_or_create_token(cfg.derp_token_path)
        log.info("DERP admission token (GET /derp/v1/nodes) in %s", cfg.derp_token_path)
        derp_map = load_derp_map(cfg.derp_map_file)
        file_policy = self._read_policy_file() if cfg.policy_file is not None else None
        try:
            self.store = await Store.open(cfg.database_url)
        except Exception as e:
            raise ConfigError(f"cannot open database {cfg.database_url}: {e}") from e
        try:
            if cfg.derp_embedded:
                await self._start_embedded_derp()
                derp_map = merge_derp_map(derp_map, self._derp_region)
            await self._load(file_policy, derp_map)
            self._refresh_derp_keys()
            await self._listen()
        except BaseException:
            await self.stop()
            raise
        self._housekeeper = asyncio.create_task(self._housekeeping())
        self._writer = asyncio.create_task(self._offline_writer())

    def _tls_context(self) -> ssl.SSLContext | None:
        cfg = self.config
        if cfg.tls_cert is None and cfg.tls_key is None:
            return None
        if cfg.tls_cert is None or cfg.tls_key is None:
            raise ConfigError("--tls-cert and --tls-key go together")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
        return ctx

    async def _start_embedded_derp(self) -> None:
        """`--derp`: DERP (same TLS as the node API) + STUN on the listen host, key pinned."""
        cfg = self.config
        advertised = cfg.embedded_derp_host()
        ssl_ctx = self._tls_context()
        self.derp = EmbeddedDerp(cfg.state_dir)
        await self.derp.start(cfg.listen[0], cfg.derp_port, cfg.stun_port, ssl_ctx)
        assert self.derp.derp_address is not None and self.derp.stun_address is not None
        self._derp_region = embedded_region(
            advertised, self.derp.derp_address[1], self.derp.stun_address[1],
            tls=ssl_ctx is not None, server_key=self.derp.key)
        log.info("embedded DERP on port %d, STUN on udp port %d, key %s",
                 self.derp.derp_address[1], self.derp.stun_address[1], self.derp.key)

    def _refresh_derp_keys(self) -> None:
        """Recompute the admitted node keys; on a change, push them to the embedded DERP."""
        if self.state is None:
            return
        now = self.clock()
        self._derp_membership_rev = self.state.membership_rev
        keys = (n.rec.node_key for n in self.state.nodes.values() if not n.expired(now))
        if self.derp_keys.update(keys, now):
            log.info("DERP admission: %d node keys, version %d", len(self.derp_keys.keys),
                     self.derp_keys.version)
            if self.derp is not None:
                self.derp.admit(self.derp_keys.keys)

    def _read_policy_file(self) -> Policy:
        path = self.config.policy_file
        assert path is not None
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError(f"{path}: {e.strerror}") from e
        try:
            return Policy.parse(text)
        except PolicyError as e:
            raise ConfigError(f"{path}:{e.line}:{e.column}: {e.reason}") from e

    async def _load(self, file_policy: Policy | None, derp_map: Json) -> None:
        store = self.db
        stored = await store.get_policy()
        if file_policy is not None:
            if stored is None or stored.text != file_policy.text:
                stored = await store.set_policy(file_policy.text)
            policy = file_policy
        elif stored is not None:
            try:
                policy = Policy.parse(stored.text)
            except PolicyError as e:
                raise ConfigError(f"stored policy (version {stored.version}): {e}") from e
        else:
            policy = Policy.parse(DEFAULT_POLICY_TEXT)
        version = 0 if stored is None else stored.version
        now = self.clock()
        state = HotState(policy, version, derp_map, now=now)
        for rec in await store.list_nodes():
            node = state.upsert(rec)
            node.online = False  # nobody holds a stream yet, whatever the database says
        self.state = state
        state.flush(now)
        for nid, node in state.nodes.items():
            if node.expired(now):
                self._expired.add(nid)
            elif node.rec.ephemeral:
                # It was offline when we stopped (or is now): give it the grace to come back.
                self._arm_ephemeral(nid)

    async def _listen(self) -> None:
        cfg = self.config
        api = web.Application(middlewares=[json_error_middleware], client_max_size=MAX_BODY)
        api.add_routes(
            [
                web.get("/key", self._h_key),
                web.get("/health", self._h_health),
                web.post("/api/v1/register", self._h_register),
                web.get("/api/v1/map", self._h_map),
                web.post("/api/v1/update", self._h_update),
                web.post("/api/v1/logout", self._h_logout),
                web.get("/derp/v1/nodes", self._h_derp_nodes),
            ]
        )
        runner = web.AppRunner(api, handler_cancellation=True, access_log=None)
        await runner.setup()
        self._runners.append(runner)
        ssl_ctx = self._tls_context()
        host, port = cfg.listen
        site = web.TCPSite(runner, host, port, ssl_context=ssl_ctx)
        await site.start()
        self.url = self._site_url(site, "https" if ssl_ctx else "http")

        from relaymesh.control.admin import build_admin_app  # admin imports this module

        sock = cfg.admin_socket_path
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
        unix_runner = web.AppRunner(build_admin_app(self, require_api_key=False), access_log=None)
        await unix_runner.setup()
        self._runners.append(unix_runner)
        old_umask = os.umask(0o177)  # the socket is born 0600: no window where others connect
        try:
            await web.UnixSite(unix_runner, str(sock)).start()
        finally:
            os.umask(old_umask)
        os.chmod(sock, 0o600)
        if cfg.admin_listen is not None:
            tcp_runner = web.AppRunner(
                build_admin_app(self, require_api_key=True), access_log=None
            )
            await tcp_runner.setup()
            self._runners.append(tcp_runner)
            admin_site = web.TCPSite(tcp_runner, *cfg.admin_listen, ssl_context=ssl_ctx)
            await admin_site.start()
            self.admin_url = self._site_url(admin_site, "https" if ssl_ctx else "http")

    @staticmethod
    def _site_url(site: web.TCPSite, scheme: str) -> str:
        server = site._server
        assert server is not None
        sockets = getattr(server, "sockets", None) or []
        host, port = sockets[0].getsockname()[:2]
        if ":" in host:
            host = f"[{host}]"
        return f"{scheme}://{host}:{port}"

    async def stop(self) -> None:
        """Close streams and listeners, cancel timers, close the database."""
        if self._housekeeper is not None:
            self._housekeeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeper
            self._housekeeper = None
        for h in self._ephemeral_timers.values():
            h.cancel()
        self._ephemeral_timers.clear()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self.state is not None:
            for subs in list(self.state.subs.values()):
                for sub in list(subs):
                    sub.deliver({"type": "__close__"})
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        if self.derp is not None:
            await self.derp.close()
            self.derp = None
        if self._writer is not None:
            # Streams just closed: let the writer store their last_seen and exit by itself
            # (cancelling it inside a database call would leave the connection half reset).
            self._stopping = True
            self._offline_wakeup.set()
            try:
                async with asyncio.timeout(STOP_PERSIST_S):
                    await self._writer
            except TimeoutError:
                pass  # the timeout cancelled it: some last_seen values are not stored
            self._writer = None
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.store is not None:
            await self.store.close()
            self.store = None
        with contextlib.suppress(FileNotFoundError):
            self.config.admin_socket_path.unlink()

    # -- change propagation -----------------------------------------------------------------------

    def _changed(self) -> None:
        """Schedule one flush for everything changed within the coalescing window.

        DERP admission is not coalesced: a membership change reaches the embedded DERP server
        (and the next ``GET /derp/v1/nodes``) at once, so a node may use DERP as soon as its
        registration is answered, and a deleted one is cut without waiting for the flush.
        """
        if self.state is not None and self.state.membership_rev != self._derp_membership_rev:
            self._refresh_derp_keys()
        if self._flush_handle is None:
            loop = asyncio.get_running_loop()
            # Under a stream of changes (a registration storm: the last flush ended less than
            # its own duration ago) wait twice as long as that flush took, capped, so fan-out
            # uses at most about a third of the CPU and each recompile folds in everything that
            # arrived meanwhile. An isolated change only waits the short coalescing window.
            delay = self.config.coalesce
            if time.monotonic() - self._last_flush_end < self.last_flush_s:
                delay = max(delay, min(2 * self.last_flush_s, MAX_ADAPTIVE_COALESCE_S))
            self._flush_handle = loop.call_later(delay, self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        if self.state is not None:
            t0, c0 = time.perf_counter(), time.process_time()
            self.state.flush(self.clock())
            self.last_flush_s = time.perf_counter() - t0
            self.last_flush_cpu_s = time.process_time() - c0
            self._last_flush_end = time.monotonic()

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed: %s", task.exception())

    def _arm_ephemeral(self, nid: int) -> None:
        self._disarm_ephemeral(nid)
        loop = asyncio.get_running_loop()
        self._ephemeral_timers[nid] = loop.call_later(
            self.config.ephemeral_grace, lambda: self._spawn(self._ephemeral_due(nid))
        )

    def _disarm_ephemeral(self, nid: int) -> None:
        h = self._ephemeral_timers.pop(nid, None)
        if h is not None:
            h.cancel()

    async def _ephemeral_due(self, nid: int) -> None:
        self._ephemeral_timers.pop(nid, None)
        if self.hot.stream_count(nid) == 0 and nid in self.hot.nodes:
            log.info("deleting ephemeral node %d after %.1f s offline", nid,
                     self.config.ephemeral_grace)
            await self.delete_node(nid, reason="ephemeral node went offline")

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(HOUSEKEEPING_S)
            self.check_expiry()
            if self.config.gc_freeze:
                self._gc_tune()

    def _gc_tune(self) -> None:
        """Move the hot state out of the cyclic GC's reach once it has grown.

        Every node brings dozens of long-lived objects; a full GC pass walks all of them and, at
        thousands of nodes, lands in the middle of a fan-out as a pause of hundreds of ms. After
        the node count grew by GC_FREEZE_GROWTH (and no flush is pending) we collect once and
        freeze the survivors, so later passes only see young objects.
        """
        nodes = len(self.hot.nodes)
        if nodes < self._gc_frozen_at * GC_FREEZE_GROWTH or self._flush_handle is not None:
            return
        gc.collect()
        gc.freeze()
        self._gc_frozen_at = max(nodes, GC_FREEZE_MIN_NODES)

    def check_expiry(self) -> None:
        """Log out nodes whose key expiry has passed (called every second)."""
        now = self.clock()
        hot = self.hot
        for nid, node in hot.nodes.items():
            if nid not in self._expired and node.expired(now):
                self._expired.add(nid)
                hot.expire(nid)
                self._changed()

    # -- node authentication ----------------------------------------------------------------------

    def _machine(self, request: web.Request) -> MachineKey:
        assert self.verifier is not None
        try:
            return self.verifier.verify(
                request.headers.get(HEADER_MACHINE),
                request.headers.get(HEADER_AUTH),
                request.method,
                request.path,
                self.clock(),
            )
        except AuthError as e:
            raise ApiError(401, str(e)) from None

    def _node_for(self, request: web.Request) -> HotNode:
        node = self.hot.node_by_machine(self._machine(request))
        if node is None:
            raise ApiError(401, ERR_NOT_REGISTERED)
        return node

    # -- node API handlers ------------------------------------------------------------------------

    async def _h_key(self, request: web.Request) -> web.Response:
        assert self.verifier is not None
        return web.json_response({"server_key": self.verifier.public.to_text()})

    async def _h_health(self, request: web.Request) -> web.Response:
        hot = self.hot
        return web.json_response(
            {
                "nodes": len(hot.nodes),
                "streams": sum(len(s) for s in hot.subs.values()),
                "policy_version": hot.policy_version,
                "compiles": hot.compiles,
                "flushes": hot.flushes,
                "messages": hot.messages,
                "last_flush_s": self.last_flush_s,
                "last_flush_cpu_s": self.last_flush_cpu_s,
            }
        )

    async def _h_derp_nodes(self, request: web.Request) -> web.Response:
        """control-protocol.md §4: the node keys DERP servers admit (bearer token)."""
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), self._derp_token.encode()
        ):
            raise ApiError(401, "DERP admission needs the bearer token of --derp-token-file")
        self._refresh_derp_keys()  # exact even inside the coalescing window or between sweeps
        return web.json_response(self.derp_keys.json())

    async def _h_register(self, request: web.Request) -> web.Response:
        machine = self._machine(request)
        body = await read_json(request)
        try:
            node_key = NodeKey.parse(str(body.get("node_key", "")))
            disco_key = DiscoKey.parse(str(body.get("disco_key", "")))
        except KeyError_ as e:
            raise ApiError(400, str(e)) from None
        hostname = body.get("hostname") or "node"
        if not isinstance(hostname, str):
            raise ApiError(400, "'hostname' must be a string")
        auth_key = body.get("auth_key")
        if auth_key is not None and not isinstance(auth_key, str):
            raise ApiError(400, "'auth_key' must be a string or null")
        tags = _str_list(body, "tags") if body.get("tags") else []
        ephemeral = bool(body.get("ephemeral", False))
        rec = await self.register(
            machine=machine, node_key=node_key, disco_key=disco_key, hostname=hostname,
            auth_key=auth_key or None, tags=tags, ephemeral=ephemeral,
        )
        node = self.hot.nodes[rec.id]
        return web.json_response({"node": node.json(), "user": rec.user})

    async def register(
        self, *, machine: MachineKey, node_key: NodeKey, disco_key: DiscoKey, hostname: str,
        auth_key: str | None, tags: list[str], ephemeral: bool,
    ) -> NodeRecord:
        """Register a new node with an auth key, or re-register a known machine (§1)."""
        store, hot = self.db, self.hot
        async with self._lock:
            existing = hot.node_by_machine(machine)
            now = self.clock()
            if auth_key is None:
                if existing is None:
                    raise ApiError(401, ERR_KEY_REQUIRED)
                if existing.expired(now):
                    raise ApiError(401, ERR_NODE_EXPIRED)
                r = existing.rec
                rec = await store.register_node(
                    node_key=node_key, machine_key=machine, disco_key=disco_key,
                    hostname=hostname, user=r.user_id, tags=r.tags, ephemeral=r.ephemeral,
                    endpoints=r.endpoints, home_derp=r.home_derp,
                    relay_server_port=r.relay_server_port, key_expiry=r.key_expiry,
                )
            else:
                node_tags: list[str] | None = None  # None: the key's tags apply
                if tags:
                    # Check the requested tags against the key before it is consumed.
                    key = await self._peek_preauth_key(auth_key)
                    for t in tags:
                        if t not in key.tags and not hot.policy.may_own_tag(key.user, t):
                            raise ApiError(403, f"{t} not permitted for this key/user")
                    node_tags = sorted(set(tags))
                try:
                    rec = await store.register_node(
                        node_key=node_key, machine_key=machine, disco_key=disco_key,
                        hostname=hostname, preauth_key=auth_key, tags=node_tags,
                        ephemeral=ephemeral,
                        endpoints=existing.rec.endpoints if existing else (),
                        home_derp=existing.rec.home_derp if existing else 0,
                        relay_server_port=existing.rec.relay_server_port if existing else None,
                    )
                except PreauthKeyInvalidError:
                    raise ApiError(401, ERR_KEY_NOT_FOUND) from None
                except PreauthKeyExpiredError:
                    raise ApiError(401, ERR_KEY_EXPIRED) from None
                except PreauthKeyUsedError:
                    raise ApiError(401, ERR_KEY_USED) from None
            if existing is not None and existing.rec.id != rec.id:
                hot.remove(existing.rec.id)  # the node key belonged to another node: replaced
            self._expired.discard(rec.id)
            hot.upsert(rec)
            self._changed()
            log.info("registered node %d %s (%s) for %s", rec.id, rec.name, rec.ipv4, rec.user)
            return rec

    async def _peek_preauth_key(self, key: str) -> PreauthKeyRecord:
        """Look an auth key up without consuming it (to check tags before registering)."""
        async with AsyncSession(self.db.engine) as s:
            q = select(PreauthKeyRow).where(PreauthKeyRow.key_hash == _hash_key(key))
            row = (await s.execute(q)).scalar_one_or_none()
            if row is None:
                raise ApiError(401, ERR_KEY_NOT_FOUND)
            rec = PreauthKeyRecord.from_row(row)
        if rec.expired(self.db.now()):
            raise ApiError(401, ERR_KEY_EXPIRED)
        if rec.used and not rec.reusable:
            raise ApiError(401, ERR_KEY_USED)
        return rec

    async def _h_map(self, request: web.Request) -> web.StreamResponse:
        node = self._node_for(request)
        nid = node.rec.id
        hot = self.hot
        resp = web.StreamResponse(headers={"Content-Type": NDJSON, "Cache-Control": "no-store"})
        if node.expired(self.clock()):
            await resp.prepare(request)
            await resp.write(_dumps({"type": "logout", "reason": "node key expired"}))
            return resp
        queue: asyncio.Queue[Json | None] = asyncio.Queue()
        limit = self.config.stream_queue_max

        cut = False

        def deliver(msg: Json) -> None:
            nonlocal cut
            if cut:
                return
            if queue.qsize() >= limit:
                # Drop the backlog and end the stream: the client reconnects to a full map.
                log.warning("node %d reads its map too slowly: cutting the stream", nid)
                cut = True
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait(None)
                return
            queue.put_nowait(msg)

        self._stream_opened(nid)  # first, so the full map already says online
        sub, full = hot.subscribe(nid, deliver, self.clock())
        try:
            await resp.prepare(request)
            await resp.write(_dumps(full))
            while True:
                try:
                    async with asyncio.timeout(self.config.keepalive):
                        msg = await queue.get()
                except TimeoutError:
                    await resp.write(KEEPALIVE_LINE)
                    continue
                if msg is None or msg["type"] == "__close__":
                    break
                await resp.write(_dumps(msg))
                if msg["type"] == "logout":
                    break
        except (ConnectionError, RuntimeError):
            pass  # the client went away; RuntimeError: aiohttp writing on a closed transport
        finally:
            self._stream_closed(sub)
        return resp

    def _stream_opened(self, nid: int) -> None:
        hot = self.hot
        self._disarm_ephemeral(nid)
        node = hot.nodes[nid]
        if not node.online:
            hot.touch(nid, online=True, last_seen=self.clock())
            self._changed()

    def _stream_closed(self, sub: Subscription) -> None:
        hot = self.hot
        nid = sub.node_id
        was_open = not sub.closed
        remaining = hot.unsubscribe(sub)
        if remaining or nid not in hot.nodes or not was_open:
            return  # still connected elsewhere, deleted, or logged out by the server
        node = hot.nodes[nid]
        hot.touch(nid, online=False, last_seen=self.clock())
        self._changed()
        self._persist_offline(nid)
        if node.rec.ephemeral:
            self._arm_ephemeral(nid)

    def _persist_offline(self, nid: int) -> None:
        """Queue the node's last_seen for the one writer task (SQLite wants one writer)."""
        self._offline_pending[nid] = None
        self._offline_wakeup.set()

    async def _offline_writer(self) -> None:
        """Write last_seen of nodes that went offline, one at a time, under the store lock."""
        while not self._stopping or self._offline_pending:
            await self._offline_wakeup.wait()
            self._offline_wakeup.clear()
            while self._offline_pending:
                nid = next(iter(self._offline_pending))
                del self._offline_pending[nid]
                if self.hot.stream_count(nid):
                    continue  # back online meanwhile
                async with self._lock:
                    try:
                        await self.db.set_online(nid, False)
                    except NotFoundError:
                        pass
                    except Exception as e:  # never let a DB hiccup kill the writer
                        log.warning("last_seen of node %d not stored: %s", nid, e)

    async def _h_update(self, request: web.Request) -> web.Response:
        node = self._node_for(request)
        body = await read_json(request)
        await self.update_node(node.rec.id, body)
        return web.json_response({})

    async def update_node(self, nid: int, body: Json) -> None:
        """Apply a node's ``/api/v1/update``: persist, then tell the peers that see it."""
        store, hot = self.db, self.hot
        endpoints = _str_list(body, "endpoints") if "endpoints" in body else None
        relay_eps = _str_list(body, "relay_endpoints") if "relay_endpoints" in body else None
        home_derp = body.get("home_derp")
        if home_derp is not None and (
            not isinstance(home_derp, int) or isinstance(home_derp, bool)
        ):
            raise ApiError(400, "'home_derp' must be an integer")
        async with self._lock:
            node = hot.nodes.get(nid)
            if node is None:
                raise ApiError(401, ERR_NOT_REGISTERED)
            rec = node.rec
            if endpoints is not None or home_derp is not None:
                rec = await store.update_endpoints(
                    nid, endpoints if endpoints is not None else rec.endpoints,
                    home_derp=home_derp,
                )
            if "relay_server_port" in body:
                rec = await store.set_relay_server_port(nid, _opt_port(body, "relay_server_port"))
            if nid not in hot.nodes:
                return  # deleted while we wrote
            hot.upsert(rec, recompile=False)
            live: Json = {"last_seen": self.clock()}
            if relay_eps is not None:
                live["relay_endpoints"] = tuple(relay_eps)
            hot.touch(nid, **live)
            self._changed()

    async def _h_logout(self, request: web.Request) -> web.Response:
        node = self._node_for(request)
        nid = node.rec.id
        if node.rec.ephemeral:
            await self.delete_node(nid, reason="logged out")
        else:
            await self.expire_node(nid, reason="logged out")
        return web.json_response({})

    # -- operations shared with the admin API -----------------------------------------------------

    def node_view(self, nid: int) -> Json:
        """A Node object for the admin API (adds ``hostname`` and ``created_at``)."""
        node = self.hot.nodes.get(nid)
        if node is None:
            raise NotFoundError(f"no node with id {nid}")
        return {
            **node.json(),
            "hostname": node.rec.hostname,
            "created_at": node.rec.created_at.timestamp(),
            "expired": node.expired(self.clock()),
        }

    def list_nodes(self) -> list[Json]:
        return [self.node_view(nid) for nid in sorted(self.hot.nodes)]

    async def rename_node(self, nid: int, name: str) -> Json:
        async with self._lock:
            rec = await self.db.rename_node(nid, name)
            self.hot.upsert(rec)
            self._changed()
        return self.node_view(nid)

    async def tag_node(self, nid: int, tags: list[str]) -> Json:
        async with self._lock:
            rec = await self.db.tag_node(nid, tags)
            self.hot.upsert(rec)
            self._changed()
        return self.node_view(nid)

    async def expire_node(self, nid: int, reason: str = "node key expired") -> Json:
        async with self._lock:
            rec = await self.db.expire_node(nid)
            self.hot.upsert(rec)
            self._expired.add(nid)
            self.hot.expire(nid, reason)
            self._changed()
        return self.node_view(nid)

    async def delete_node(self, nid: int, reason: str = "node deleted") -> None:
        async with self._lock:
            if not await self.db.delete_node(nid):
                raise NotFoundError(f"no node with id {nid}")
            self._disarm_ephemeral(nid)
            self._expired.discard(nid)
            self.hot.remove(nid, reason)
            self._changed()

    async def set_policy(self, text: str) -> int:
        """Validate, store and apply a policy; a bad one raises and changes nothing."""
        policy = Policy.parse(text)
        async with self._lock:
            rec = await self.db.set_policy(text)
            self.hot.set_policy(policy, rec.version)
            self._changed()
        log.info("policy version %d in force", rec.version)
        return rec.version

    async def reload(self) -> None:
        """SIGHUP: re-read ``--policy FILE`` (same rules as PUT) and ``--derp-map``."""
        cfg = self.config
        if cfg.derp_map_file is not None:
            try:
                self.hot.set_derp_map(
                    merge_derp_map(load_derp_map(cfg.derp_map_file), self._derp_region))
                self._changed()
            except ConfigError as e:
                log.error("DERP map not reloaded: %s", e)
        if cfg.policy_file is None:
            return
        try:
            policy = self._read_policy_file()
        except ConfigError as e:
            log.error("policy not reloaded, the old one stays in force: %s", e)
            return
        if policy.text == self.hot.policy.text:
            return
        await self.set_policy(policy.text)

    async def create_preauth_key(
        self, user: str, *, reusable: bool, ephemeral: bool, expiration_s: float | None,
        tags: list[str],
    ) -> tuple[str, PreauthKeyRecord]:
        for t in tags:
            if not t.startswith("tag:") or len(t) <= len("tag:"):
                raise ValueError(f"bad tag {t!r} (expected 'tag:<name>')")
        expires = None if expiration_s is None else timedelta(seconds=expiration_s)
        return await self.db.create_preauth_key(
            user, reusable=reusable, ephemeral=ephemeral, tags=tags, expires_in=expires
        )

    async def expire_preauth_key(self, user: str, key: str) -> PreauthKeyRecord:
        """Expire a key given in full or by the prefix that ``preauthkeys list`` shows."""
        now = self.db.now()
        async with AsyncSession(self.db.engine, expire_on_commit=False) as s:
            q = select(PreauthKeyRow).join(PreauthKeyRow.user)
            rows = [
                r for r in (await s.execute(q)).scalars().unique().all()
                if r.user.name == user
                and (r.key_hash == _hash_key(key) or (len(key) >= 10 and r.prefix.startswith(key)))
            ]
            if not rows:
                raise NotFoundError(f"no pre-auth key {key!r} for user {user!r}")
            if len(rows) > 1:
                raise ValueError(f"{key!r} matches {len(rows)} keys: give the full key")
            rows[0].expires_at = now
            await s.commit()
            return PreauthKeyRecord.from_row(rows[0])


async def run_server(config: ServerConfig, *, ready: Callable[[ControlServer], None] | None = None
                     ) -> None:
    """Run until SIGINT/SIGTERM; SIGHUP reloads the policy file and DERP map."""
    config.gc_freeze = True
    server = ControlServer(config)
    await server.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: server._spawn(server.reload()))
    if ready is not None:
        ready(server)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        await server.stop()

