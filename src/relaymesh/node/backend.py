"""The daemon's brain: control session, network map, engine, disco; what the local API calls.

Lifecycle (``backend_state``): ``NeedsLogin`` (never registered, or the server logged us out)
-> ``up`` registers and starts the engine and the control loop -> ``Running`` -> ``down`` stops
both (keys and registration kept) -> ``Stopped``. ``want_running`` is persisted, so a restarted
daemon resumes a running node by itself: the server knows its machine key, so no auth key.

The control loop re-registers, reports endpoints, and holds the map stream; when the stream
breaks it retries with exponential backoff (``BACKOFF_BASE`` doubling up to ``BACKOFF_CAP``, with
jitter so a restarted server is not hit by every node at once). The engine is untouched meanwhile:
the data plane keeps working on the last map while the control server is down. A refusal
(401/403/404: node deleted or expired) is final: the node goes to ``NeedsLogin``.

NAT traversal and DERP (issue 5, docs/magicsock.md): when the map brings a DERP map the node
connects to a home region at once (so peers reach it before anything is measured), then runs
netcheck over the shared UDP socket (STUN answers are taken off the datapath by
``TrackingDevice``), moves home to the fastest region, and reports its endpoints (local addresses
plus the STUN mapping) and ``home_derp`` to the control server. Netcheck repeats every
``NETCHECK_INTERVAL``. Each peer's route (direct, DERP, or both while mirroring) is recomputed
from the disco layer on every disco event and every ``DISCO_TICK`` and pushed into the datapath
only when it changed.

Peer relays (issue 6, docs/peer-relays.md): with ``relay_server_port`` set the daemon runs a
:class:`~relaymesh.relay.service.RelayService` on that port (in its own network namespace: it is
the daemon's process), answers allocate requests that arrive over DERP after checking the map's
``relay.serve_for`` for BOTH clients (itself counts as allowed: a relay serves traffic bound to
its own node), and announces ``relay_server_port`` and ``relay_endpoints`` (interface addresses,
the STUN-mapped address, static endpoints; refreshed with the endpoints) through
``/api/v1/update``. Client side: the peers in ``relay.may_use`` that announce a relay port are
the disco layer's candidate relays (and our own relay server, allocated in-process); a route
through a relay is pushed into the datapath as (relay ip:port, relay header).

Birthday-paradox port spray (docs/magicsock.md): each netcheck tells the disco layer our NAT
role (mapping varies by destination -> hard). The disco layer names spray sockets by id; this
shell opens them (same family as the main socket, ephemeral port) before sending the datagrams
of the same call, registers them with the datapath (WireGuard and disco are received on them
too) and closes them when the disco layer says so. A peer whose direct path lives on a spray
socket gets its WireGuard sent from that socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import os
import random
import socket
import time
from collections.abc import Callable
from typing import Any

from relaymesh.control.policy import Filter
from relaymesh.derp.client import pick_home_region
from relaymesh.disco import RelayEndpoint, is_disco
from relaymesh.keys import DiscoKey, NodeKey
from relaymesh.magicsock.netcheck import Report
from relaymesh.magicsock.netcheck_io import NetcheckRunner
from relaymesh.magicsock.pathsel import PathPolicy
from relaymesh.magicsock.route import DerpOutbox
from relaymesh.magicsock.sock import MagicSock, local_endpoints
from relaymesh.node.control import ControlClient, ControlError
from relaymesh.node.derpconn import DerpConns
from relaymesh.node.disco import (
    DERP_HOST,
    NOT_AUTHORIZED,
    DiscoManager,
    PingResult,
    RelayInfo,
    Send,
)
from relaymesh.node.engine import Engine, PeerStats
from relaymesh.node.filter import InboundFilter
from relaymesh.node.netmap import MapError, MapNode, NetMap, format_endpoint, parse_endpoint
from relaymesh.node.state import StateDir
from relaymesh.paths import Path
from relaymesh.relay.service import RelayService
from relaymesh.relay.session import RelayLimits
from relaymesh.wireguard.datapath import open_udp_socket

log = logging.getLogger("relaymesh.daemon")

BACKOFF_BASE = 0.5  # s: first retry after a failed connection
BACKOFF_CAP = 30.0  # s: the brief's cap
DISCO_TICK = 0.2  # s: disco timers, activity detection and endpoint reconciliation
ENDPOINT_REFRESH = 10.0  # s: re-read local addresses and report them when they changed
UP_WAIT_FOR_MAP = 5.0  # s: `up` returns after the first full map or this long
DEFAULT_PING_TIMEOUT = 5.0  # s, reference ping timeout
NETCHECK_INTERVAL = 30.0  # s: re-measure DERP latency and the STUN mapping (NAT rebinding,
#   roaming); the reference runs it every 20-26 s. One check is a few small datagrams per region.
NETCHECK_RETRY = 5.0  # s: after a check that got no region at all (DERP down at start)
# "0": the relay forwards in userspace only. Default: the nftables fast path where possible (its
# table is owned by this process, so the kernel removes it when the daemon dies, even by SIGKILL).
RELAY_KERNEL_ENV = "RELAYMESH_RELAY_KERNEL"
# "0": the relay's userspace forwarding is the Python loop. Default: the native loop (a small C
# file built on first use, relay/native.py) where a compiler is at hand.
RELAY_NATIVE_ENV = "RELAYMESH_RELAY_NATIVE"
RELAY_BPS_ENV = "RELAYMESH_RELAY_CLIENT_BYTES_PER_SECOND"  # per-client byte rate limit of the
#   relay (default RelayLimits: 50 MB/s); the burst is a fifth of a second of it (>= 64 KiB)
RELAY_IDLE_ENV = "RELAYMESH_RELAY_IDLE_LIFETIME"  # s; lets test configs shorten the relay's idle
#   lifetime (default 300 s, the reference value) to prove clients keep idle relay paths alive


def backoff_delay(attempt: int, uniform: Callable[[float, float], float] = random.uniform) -> float:
    """Seconds to wait before reconnect ``attempt`` (0-based): BACKOFF_BASE * 2**attempt capped
    at BACKOFF_CAP, times a jitter factor in [0.5, 1] so nodes do not reconnect in lockstep."""
    return float(min(BACKOFF_CAP, BACKOFF_BASE * 2 ** min(attempt, 16)) * uniform(0.5, 1.0))


class APIError(Exception):
    """An error for the local API: HTTP status and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


EngineFactory = Callable[..., Engine]  # (sock, filter, divert, on_stun) -> Engine


class Backend:
    def __init__(
        self,
        state: StateDir,
        *,
        port: int = 41641,
        tun_name: str = "relaymesh0",
        engine_factory: EngineFactory | None = None,
        endpoints_fn: Callable[[int], list[str]] | None = None,
        sock: socket.socket | None = None,
        derp_node: str | None = None,
    ) -> None:
        self.st = state
        self.port = port
        self.tun_name = tun_name
        self._engine_factory = engine_factory or self._real_engine
        self._endpoints_fn = endpoints_fn or (
            lambda p: local_endpoints(p, exclude_ifnames=[self.tun_name])
        )
        self.sock = sock
        self.netmap = NetMap()
        self.flt = InboundFilter()
        self.engine: Engine | None = None
        self.magic: MagicSock | None = None
        self.disco = DiscoManager(
            state.disco_key, state.node_key.node_public(), random_bytes=os.urandom
        )
        self.control_connected = False
        self.last_error: str | None = None
        self._client: ControlClient | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._first_map: asyncio.Event = asyncio.Event()
        self._ping_waiters: dict[bytes, asyncio.Future[PingResult]] = {}
        self._last_tx: dict[int, int] = {}
        self._reported_endpoints: list[str] | None = None
        self._up_lock = asyncio.Lock()
        self._bg: set[asyncio.Task[None]] = set()
        self._engine_fresh = False  # the next map's peers get a handshake right away
        self.derp = DerpConns(state.node_key, self._on_derp_packet, pinned=derp_node)
        self.netcheck_report: Report | None = None
        self._netcheck_runner: NetcheckRunner | None = None
        self._netcheck_lock = asyncio.Lock()
        self._next_netcheck = 0.0
        self._stun_endpoint: str | None = None
        self._reported_home = 0
        self.relay_service: RelayService | None = None
        self._reported_relay: tuple[int | None, list[str]] | None = None
        self._relay_inbound: dict[tuple[tuple[str, int], int], bytes] = {}
        self._logged_route: dict[int, str] = {}  # peer id -> last route logged (changes only)
        self._spray_socks: dict[int, socket.socket] = {}  # spray socket id -> socket
        self._spray_inbound: dict[tuple[int, tuple[str, int]], bytes] = {}
        self.spray_counters: dict[str, int] = {}
        if not state.state.node_id:
            self.backend_state = "NeedsLogin"
        else:
            self.backend_state = "Running" if state.state.want_running else "Stopped"

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the UDP socket; resume the session if the node was up before a restart."""
        loop = asyncio.get_running_loop()
        if self.sock is None:
            try:
                self.sock = open_udp_socket(self.port)
            except OSError as e:
                raise APIError(500, f"cannot bind UDP port {self.port}: {e.strerror}") from None
        self.port = int(self.sock.getsockname()[1])
        self.magic = MagicSock(self.sock, loop, self._on_disco)
        s = self.st.state
        if s.want_running and s.node_id and s.login_server:
            log.info("resuming as node %s (id %s) on %s", s.name, s.node_id, s.login_server)
            await self._start_engine(s.addresses)
            self._start_session(ControlClient(s.login_server, self.st.machine_key))
            self.backend_state = "Running"

    async def close(self) -> None:
        await self._stop_session()
        await self._stop_relay_server()
        await self._stop_engine()
        await self.derp.close()
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _real_engine(
        self,
        sock: socket.socket,
        flt: InboundFilter,
        divert: Callable[[bytes, tuple[str, int]], bool],
        on_stun: Callable[[bytes, Any], None] | None = None,
    ) -> Engine:
        from relaymesh.wireguard.netconf import NetConf
        from relaymesh.wireguard.tun import Tun

        tun = Tun(self.tun_name)
        try:
            net = NetConf(tun.name)
        except Exception:
            tun.close()
            raise
        return Engine(self.st.node_key, sock, tun, net, flt, divert, on_stun=on_stun)

    async def _start_engine(self, addresses: list[str]) -> None:
        """Netlink (pyroute2) runs its own event loop, so interface work goes to a thread."""
        if self.engine is not None:
            await asyncio.to_thread(self.engine.set_addresses, addresses)
            return
        assert self.sock is not None and self.magic is not None
        sock, divert = self.sock, self.magic.divert
        loop = asyncio.get_running_loop()

        def on_stun(data: bytes, src: Any) -> None:  # datapath thread
            with contextlib.suppress(RuntimeError):  # loop closed at shutdown
                loop.call_soon_threadsafe(self._on_stun, data, src)

        def build() -> Engine:
            try:
                eng = self._engine_factory(sock, self.flt, divert, on_stun)
            except TypeError:  # a test factory of the older (sock, flt, divert) shape
                eng = self._engine_factory(sock, self.flt, divert)
            try:
                eng.start(addresses)
            except BaseException:
                eng.stop()
                raise
            return eng

        try:
            eng = await asyncio.to_thread(build)
        except APIError:
            raise
        except Exception as e:
            raise APIError(500, f"cannot bring up the tunnel {self.tun_name}: {e}") from None
        self.engine = eng
        if hasattr(eng, "set_derp_outbox"):
            eng.set_derp_outbox(DerpOutbox(loop, self.derp.send))
        self._engine_fresh = True
        log.info("tunnel %s up with %s", self.tun_name, ", ".join(addresses))

    async def _stop_engine(self) -> None:
        self.disco.close_spray_sockets()
        self._apply_socket_changes()
        if self.engine is not None:
            eng, self.engine = self.engine, None
            await asyncio.to_thread(eng.stop)
            log.info("tunnel %s down", self.tun_name)

    def _start_session(self, client: ControlClient) -> None:
        self._sync_relay_server()
        self._client = client
        self._first_map = asyncio.Event()
        self._tasks = [
            asyncio.create_task(self._control_loop(client), name="control"),
            asyncio.create_task(self._disco_loop(), name="disco"),
        ]

    async def _stop_session(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks = []
        if self._client is not None:
            await self._client.close()
            self._client = None
        self.control_connected = False

    # -- peer relay server --------------------------------------------------------------------

    def _sync_relay_server(self) -> None:
        """Start, restart or stop the relay server to match ``prefs.relay_server_port``."""
        want = self.st.prefs.relay_server_port
        svc = self.relay_service
        running = svc is not None and svc.running
        if svc is not None and (want is None or (want != 0 and want != svc.port) or not running):
            self._stop_relay_now()
            svc = None
        if want is None or svc is not None:
            return
        statics = []
        for e in self.st.prefs.relay_server_static_endpoints:
            with contextlib.suppress(ValueError):
                ip, port = parse_endpoint(e)
                statics.append((ipaddress.ip_address(ip), port))
        limits = RelayLimits()
        idle = os.environ.get(RELAY_IDLE_ENV)
        if idle:
            with contextlib.suppress(ValueError):
                limits = dataclasses.replace(limits, idle_lifetime=max(1.0, float(idle)))
        bps = os.environ.get(RELAY_BPS_ENV)
        if bps:
            with contextlib.suppress(ValueError):
                rate = max(1.0, float(bps))
                limits = dataclasses.replace(limits, bytes_per_second=rate,
                                             byte_burst=max(65536.0, rate / 5))
        # candidates come from _apply_relay_candidates: the service's own discovery would also
        # list the TUN's tailnet address (relaying through the tunnel itself)
        svc = RelayService(self.st.disco_key, self._relay_allowed, resolver=self._relay_name,
                           limits=limits, static_endpoints=statics, discover_candidates=False,
                           kernel=os.environ.get(RELAY_KERNEL_ENV) != "0",
                           native=os.environ.get(RELAY_NATIVE_ENV) != "0")
        try:
            port = svc.start(want)
        except OSError as e:
            raise APIError(500, f"cannot open relay port {want}: {e.strerror}") from None
        self.relay_service = svc  # candidates follow with the next endpoint report (a thread:
        #   netlink must not run on the event loop); until then allocations are refused
        self.disco.on_allocate = svc.handle_allocate_packet
        self.disco.set_local_relay(self._local_allocate)
        log.info("peer relay: serving on UDP port %d", port)

    def _stop_relay_now(self) -> None:
        svc, self.relay_service = self.relay_service, None
        self.disco.on_allocate = None
        self.disco.set_local_relay(None)
        if svc is not None:
            svc.stop()
            log.info("peer relay: stopped")

    async def _stop_relay_server(self) -> None:
        if self.relay_service is not None:
            svc, self.relay_service = self.relay_service, None
            self.disco.on_allocate = None
            self.disco.set_local_relay(None)
            await asyncio.to_thread(svc.stop)

    def _apply_relay_candidates(self) -> None:
        """Relay candidates: static endpoints (set at start), the STUN-mapped address with the
        relay port (a relay behind a port-preserving 1:1 NAT), then the host's underlay
        addresses (never the TUN's or any tailnet address). Blocking (netlink): call it from
        a thread or at start."""
        svc = self.relay_service
        if svc is None or svc.port is None:
            return
        texts = []
        if self._stun_endpoint:
            texts.append(self._stun_endpoint)
        texts += self._endpoints_fn(svc.port)
        extra: list[Any] = []
        for t in texts:
            with contextlib.suppress(ValueError):
                ip, _ = parse_endpoint(t)
                cand = (ipaddress.ip_address(ip), svc.port)
                if cand not in extra:
                    extra.append(cand)
        svc.set_candidates(extra)

    def _node_by_disco(self, key: DiscoKey) -> MapNode | None:
        for n in self.netmap.peers.values():
            if n.disco_key == key:
                return n
        return None

    def _relay_allowed(self, requester: DiscoKey, other: DiscoKey) -> bool:
        """Policy for an allocation: both clients must be in ``relay.serve_for`` (node keys),
        except this node itself, which may always be one end of its own relay's sessions."""
        serve_for = {str(k) for k in self.netmap.relay.get("serve_for") or []}
        me = self.st.disco_key.disco_public()

        def ok(key: DiscoKey) -> bool:
            if key == me:
                return True
            n = self._node_by_disco(key)
            return n is not None and n.node_key.to_text() in serve_for

        return ok(requester) and ok(other)

    def _relay_name(self, key: DiscoKey) -> str | None:
        if key == self.st.disco_key.disco_public():
            me = self.netmap.self_node
            return me.name if me else self.st.state.name
        n = self._node_by_disco(key)
        return n.name if n else None

    def _local_allocate(self, peer: DiscoKey) -> RelayEndpoint | None:
        svc = self.relay_service
        if svc is None:
            return None
        res = svc.allocate(self.st.disco_key.disco_public(), peer)
        return None if res is None else res.endpoint

    def _update_relays(self) -> None:
        """Candidate relays for the disco layer: peers announcing a relay port that the map's
        ``relay.may_use`` lets us use; the others are shown by ``debug path`` with the reason."""
        may_use = set()
        for v in self.netmap.relay.get("may_use") or []:
            with contextlib.suppress(TypeError, ValueError):
                may_use.add(int(v))
        usable: list[RelayInfo] = []
        refused: dict[str, str] = {}
        for n in self.netmap.peers.values():
            if n.raw.get("relay_server_port") is None or n.disco_key is None:
                continue
            if n.id in may_use:
                usable.append(RelayInfo(n.name, n.disco_key, n.node_key, n.home_derp))
            else:
                refused[n.name] = NOT_AUTHORIZED
        me = self.netmap.self_node
        self.disco.self_name = me.name if me else self.st.state.name or ""
        self.disco.set_relays(usable, refused)

    def _relay_fields(self) -> tuple[int | None, list[str]]:
        svc = self.relay_service
        if svc is None or svc.port is None:
            return None, []
        eps = [format_endpoint((str(ip), port)) for ip, port in svc.candidates]
        return svc.port, eps

    # -- local API ------------------------------------------------------------------------------

    async def up(self, req: dict[str, Any]) -> dict[str, Any]:
        login_server = req.get("login_server") or self.st.state.login_server
        if not login_server:
            raise APIError(400, "--login-server is required the first time")
        if not str(login_server).startswith(("http://", "https://")):
            raise APIError(400, f"login server must be an http(s) URL, got {login_server!r}")
        auth_key = req.get("auth_key") or None
        prefs = self.st.prefs
        if req.get("hostname"):
            prefs.hostname = str(req["hostname"])
        if req.get("advertise_tags") is not None:
            prefs.advertise_tags = [str(t) for t in req["advertise_tags"]]
        if "relay_server_port" in req and req["relay_server_port"] is not None:
            prefs.relay_server_port = int(req["relay_server_port"])
        async with self._up_lock:
            await self._stop_session()
            client = ControlClient(str(login_server), self.st.machine_key)
            known = bool(self.st.state.node_id) and self.st.state.login_server == login_server
            try:
                try:
                    # A known machine re-registers without spending the key (like `tailscale up`
                    # on a logged-in node); the key is used only if the server forgot us.
                    res = await self._register(client, None if known else auth_key)
                except ControlError as e:
                    if not (known and auth_key and e.refused):
                        raise
                    res = await self._register(client, auth_key)
            except ControlError as e:
                await client.close()
                if self.engine is not None and self.st.state.want_running:
                    self._start_session(ControlClient(  # keep the old session going
                        self.st.state.login_server or str(login_server), self.st.machine_key))
                raise APIError(401 if e.refused else 502, str(e)) from None
            s = self.st.state
            s.login_server = str(login_server)
            s.want_running = True
            self.st.save_state()
            self.st.save_prefs()
            await self._start_engine(s.addresses)
            self._start_session(client)
            self.backend_state = "Running"
            log.info("up: node %s (id %s, user %s)", s.name, s.node_id, res.get("user"))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._first_map.wait(), UP_WAIT_FOR_MAP)
        return self.status()

    async def down(self) -> dict[str, Any]:
        async with self._up_lock:
            await self._stop_session()
            await self._stop_relay_server()
            await self._stop_engine()
            await self.derp.close()
            self.st.state.want_running = False
            self.st.save_state()
            self.netmap = NetMap()
            self.disco.set_peers([], time.monotonic())
            if self.st.state.node_id:
                self.backend_state = "Stopped"
        return self.status()

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        stats: dict[bytes, PeerStats] = self.engine.peer_stats() if self.engine else {}
        me = self.netmap.self_node
        s = self.st.state
        peers = []
        for n in sorted(self.netmap.peers.values(), key=lambda n: n.name):
            ps = stats.get(n.node_key.raw)
            path = self.disco.path(n.id, now)
            best = self.disco.best_endpoint(n.id, now)
            ep = best or (ps.endpoint if ps else None)
            via = self.disco.describe(n.id, now)
            if path is Path.NONE and ep is not None:
                via = f"direct {format_endpoint(ep)} (unconfirmed)"
            endpoint = format_endpoint(ep) if ep else None
            if path in (Path.DERP, Path.PEER_RELAY):
                endpoint = via
            peers.append({
                "id": n.id,
                "name": n.name,
                "addresses": n.addresses,
                "node_key": n.node_key.to_text(),
                "path": str(path),
                "via": via,
                "route": self.disco.route_descriptions(n.id, now),
                "endpoint": endpoint,
                "home_derp": n.home_derp or None,
                "tx_bytes": ps.tx_bytes if ps else 0,
                "rx_bytes": ps.rx_bytes if ps else 0,
                "last_handshake": ps.last_handshake if ps else None,
                "online": n.online,
            })
        return {
            "backend_state": self.backend_state,
            "control": {
                "login_server": s.login_server,
                "connected": self.control_connected,
                "last_error": self.last_error,
            },
            "self": {
                "id": s.node_id,
                "name": me.name if me else s.name,
                "user": s.user,
                "addresses": me.addresses if me else s.addresses,
                "node_key": self.st.node_key.node_public().to_text(),
                "online": self.control_connected,
                "endpoints": self._reported_endpoints or [],
                "port": self.port,
                "home_derp": self.derp.home or None,
                "relay_server_port": self.relay_service.port if self.relay_service else None,
            },
            "derp": self.derp.status(),
            "peers": peers,
        }

    def ip(self) -> dict[str, Any]:
        me = self.netmap.self_node
        addrs = me.addresses if me else self.st.state.addresses
        if not addrs or self.backend_state == "NeedsLogin":
            raise APIError(409, "no tailnet address yet: run `relaymesh up` first")
        out: dict[str, Any] = {"ipv4": None, "ipv6": None}
        for a in addrs:
            ip = ipaddress.ip_interface(a).ip
            out["ipv4" if ip.version == 4 else "ipv6"] = out["ipv4" if ip.version == 4
                                                             else "ipv6"] or str(ip)
        return out

    async def ping(self, peer: str, count: int, timeout: float) -> dict[str, Any]:
        if self.engine is None or self.backend_state != "Running":
            raise APIError(409, "the node is not up: run `relaymesh up` first")
        node = self.netmap.find_peer(peer)
        if node is None:
            raise APIError(404, f"no peer {peer!r} in the network map")
        ip = node.ipv4 or node.ipv6
        results: list[dict[str, Any]] = []
        loop = asyncio.get_running_loop()
        for _ in range(count):
            txids, sends = self.disco.cli_ping(node.id, time.monotonic())
            if not sends:
                results.append({"peer": node.name, "ip": ip,
                                "error": f"no path known to {node.name} (no endpoint, no DERP)"})
                continue
            futs = [loop.create_future() for _ in txids]
            for t, f in zip(txids, futs, strict=True):
                self._ping_waiters[t] = f
            self._send(sends)
            done, _ = await asyncio.wait(futs, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
            for t in txids:
                self._ping_waiters.pop(t, None)
            self.disco.forget_pings(txids)
            if not done:
                results.append({"peer": node.name, "ip": ip,
                                "error": f"no pong from {node.name} ({ip}) within {timeout:g} s"})
                continue
            r = next(iter(done)).result()
            if r.path is Path.PEER_RELAY:
                ep_s = format_endpoint(r.addr)
                detail = f"{r.relay} {ep_s} session {r.session}"
                via = f"peer-relay {r.relay} ({ep_s}, session {r.session})"
            elif r.addr[0] == DERP_HOST:
                detail, via = str(r.addr[1]), f"derp({r.addr[1]})"
            else:
                detail = format_endpoint(r.addr)
                via = f"direct {detail}"
            results.append({
                "peer": node.name,
                "ip": ip,
                "path": str(r.path),
                "detail": detail,
                "via": via,
                "latency_ms": round(r.latency * 1e3, 3),
            })
        return {"results": results}

    def get_prefs(self) -> dict[str, Any]:
        return self.st.prefs.to_json()

    async def patch_prefs(self, patch: dict[str, Any]) -> dict[str, Any]:
        p = self.st.prefs
        hostname_changed = False
        for k, v in patch.items():
            if k == "hostname":
                p.hostname = None if v in (None, "") else str(v)
                hostname_changed = True
            elif k == "relay_server_port":
                if v is not None and (not isinstance(v, int) or not 0 <= v <= 65535):
                    raise APIError(400, "relay_server_port must be 0..65535 or null")
                p.relay_server_port = v
            elif k == "relay_server_static_endpoints":
                if not isinstance(v, list):
                    raise APIError(400, "relay_server_static_endpoints must be a list")
                p.relay_server_static_endpoints = [str(x) for x in v]
            elif k == "path_policy":
                if not isinstance(v, dict):
                    raise APIError(400, "path_policy must be an object {peer: policy}")
                for name, pol in v.items():
                    if pol is None:
                        p.path_policy.pop(str(name), None)
                        continue
                    try:
                        PathPolicy(str(pol))
                    except ValueError:
                        raise APIError(400, f"path policy for {name}: {pol!r} is not one of "
                                       "auto, no-direct, no-relay") from None
                    p.path_policy[str(name)] = str(pol)
            elif k == "advertise_tags":
                if not isinstance(v, list):
                    raise APIError(400, "advertise_tags must be a list")
                p.advertise_tags = [str(t) for t in v]
            else:
                raise APIError(400, f"unknown pref {k!r}")
        self.st.save_prefs()
        self._apply_path_policies()
        if ("relay_server_port" in patch or "relay_server_static_endpoints" in patch) and (
                self.engine is not None):
            if "relay_server_static_endpoints" in patch and self.relay_service is not None:
                await self._stop_relay_server()  # statics are fixed at start: restart
            self._sync_relay_server()
            if self._client is not None and self.control_connected:
                try:
                    await self._report_endpoints(self._client)
                except ControlError as e:
                    log.warning("relay server update: %s", e)
        if hostname_changed and self._client is not None and self.control_connected:
            try:
                await self._client.update(hostname=self._hostname())
            except ControlError as e:
                log.warning("hostname update: %s", e)
        return self.get_prefs()

    async def netcheck(self) -> dict[str, Any]:
        """Run a check now over the node's own UDP socket (the mapping peers see)."""
        if not self.derp.regions():
            raise APIError(409, "no DERP map from the coordination server yet "
                           "(run `relaymesh up`, or the server has no --derp-map)")
        if self.engine is None:
            raise APIError(409, "the node is not up: run `relaymesh up` first")
        report = await self._run_netcheck()
        return report.to_dict()

    def debug_path(self, peer: str) -> list[dict[str, Any]]:
        node = self.netmap.find_peer(peer)
        if node is None:
            raise APIError(404, f"no peer {peer!r} in the network map")
        return [
            {"candidate": r.candidate, "kind": str(r.kind), "state": r.state,
             "latency_ms": r.latency_ms, "reason": r.reason}
            for r in self.disco.report(node.id, time.monotonic())
        ]

    def debug_peer_relay_sessions(self) -> dict[str, Any]:
        svc = self.relay_service
        if svc is None:
            raise APIError(409, "this node runs no peer relay "
                           "(relaymesh set --relay-server-port N)")
        return {"port": svc.port, "candidates": self._relay_fields()[1],
                "sessions": [v.as_dict() for v in svc.sessions()], "metrics": svc.metrics()}

    def metrics(self) -> dict[str, Any]:
        """Per-path traffic (engine) and, on a relay, the relay server's counters."""
        out: dict[str, Any] = {"paths": self.engine.path_stats() if self.engine is not None
                               and hasattr(self.engine, "path_stats") else {}}
        if self.relay_service is not None:
            out["relay"] = self.relay_service.metrics()
        out["disco_relay"] = dict(self.disco.relay_counters)
        out["spray"] = {**self.disco.spray.counters, **self.spray_counters,
                        "open_sockets": len(self._spray_socks)}
        return out

    # -- control --------------------------------------------------------------------------------

    def _hostname(self) -> str:
        return self.st.prefs.hostname or socket.gethostname()

    async def _register(self, client: ControlClient, auth_key: str | None) -> dict[str, Any]:
        res = await client.register(
            auth_key=auth_key,
            node_key=self.st.node_key.node_public().to_text(),
            disco_key=self.st.disco_key.disco_public().to_text(),
            hostname=self._hostname(),
            tags=list(self.st.prefs.advertise_tags),
        )
        node = res["node"]
        s = self.st.state
        try:
            s.node_id = int(node["id"])
            s.name = str(node.get("name") or "")
            s.addresses = [str(a) for a in node.get("addresses") or []]
        except (KeyError, TypeError, ValueError):
            raise ControlError("register answer: malformed node") from None
        s.user = str(res.get("user") or "") or None
        self.st.save_state()
        return res

    async def _report_endpoints(self, client: ControlClient, force: bool = False) -> None:
        """Local addresses plus the STUN-observed mapping, and the home DERP region."""
        eps = list(await asyncio.to_thread(self._endpoints_fn, self.port))  # netlink: off loop
        if self._stun_endpoint and self._stun_endpoint not in eps:
            eps.insert(0, self._stun_endpoint)  # the public mapping first: most peers need it
        home = self.derp.home
        self._set_disco_endpoints(eps)
        if self.relay_service is not None:
            await asyncio.to_thread(self._apply_relay_candidates)  # `ip addr`: off the loop
        relay = self._relay_fields()
        if (force or eps != self._reported_endpoints or home != self._reported_home
                or relay != self._reported_relay):
            fields: dict[str, Any] = {"endpoints": eps, "hostname": self._hostname(),
                                      "relay_server_port": relay[0], "relay_endpoints": relay[1]}
            if home:
                fields["home_derp"] = home
            await client.update(**fields)
            self._reported_endpoints = eps
            self._reported_home = home
            self._reported_relay = relay

    def _set_disco_endpoints(self, eps: list[str]) -> None:
        parsed: list[tuple[str, int]] = []
        for e in eps:
            with contextlib.suppress(ValueError):
                parsed.append(parse_endpoint(e))
        self.disco.set_endpoints(parsed)

    async def _control_loop(self, client: ControlClient) -> None:
        attempt = 0
        registered = self._first_map.is_set() or bool(self.st.state.node_id)
        first = True
        while True:
            try:
                if not first or not registered:
                    await self._register(client, None)
                first = False
                await self._report_endpoints(client, force=True)
                async for msg in client.map_stream():
                    if not self.control_connected:
                        self.control_connected = True
                        self.last_error = None
                        log.info("control: connected to %s", client.base)
                    if msg.get("type") == "full":
                        attempt = 0
                    self._on_map(msg)
                    if self.netmap.logged_out is not None:
                        await self._logged_out(self.netmap.logged_out)
                        return
                raise ControlError("map stream ended")
            except ControlError as e:
                self.control_connected = False
                self.last_error = str(e)
                if e.refused:
                    log.warning("control: refused: %s", e)
                    await self._logged_out(str(e))
                    return
                delay = backoff_delay(attempt)
                attempt += 1
                log.warning("control: %s; retrying in %.1f s", e, delay)
            except MapError as e:
                self.control_connected = False
                self.last_error = f"bad map: {e}"
                log.warning("control: bad map message (%s); reconnecting", e)
                delay = backoff_delay(attempt)
                attempt += 1
            await asyncio.sleep(delay)

    async def _logged_out(self, reason: str) -> None:
        log.warning("control: logged out: %s", reason)
        self.backend_state = "NeedsLogin"
        self.control_connected = False
        self.last_error = reason
        self.netmap = NetMap()
        self.disco.set_peers([], time.monotonic())
        await self._stop_relay_server()
        await self._stop_engine()
        await self.derp.close()
        s = self.st.state
        s.node_id = None
        s.want_running = False
        s.addresses = []
        self.st.save_state()
        self._first_map.set()
        for t in self._tasks:
            if t is not asyncio.current_task():
                t.cancel()

    def _on_map(self, msg: dict[str, Any]) -> None:
        if not self.netmap.apply(msg):
            return
        if self.netmap.logged_out is not None:
            return
        me = self.netmap.self_node
        s = self.st.state
        if me is not None and (me.addresses != s.addresses or me.name != s.name):
            s.addresses, s.name = list(me.addresses), me.name
            self.st.save_state()
        if me is not None and self.engine is not None and not self.engine.has_addresses(
                me.addresses):
            task = asyncio.create_task(asyncio.to_thread(self.engine.set_addresses,
                                                         list(me.addresses)))
            self._bg.add(task)
            task.add_done_callback(self._bg.discard)
        try:
            self.flt.set_policy(Filter.from_json(self.netmap.packet_filter))
        except (KeyError, TypeError, ValueError) as e:
            log.warning("packet filter from the map is malformed (%s); keeping the old one", e)
        if self.netmap.derp_map != self.derp.derp_map:
            self.derp.set_map(self.netmap.derp_map)
            regions = self.derp.regions()
            if regions and not self.derp.home:
                # reachable at once over DERP; netcheck moves home to the fastest region later
                self.derp.set_home(min(regions))
                self._next_netcheck = 0.0
            self.disco.set_home_region(self.derp.home)
        now = time.monotonic()
        peers = list(self.netmap.peers.values())
        self._last_tx = {pid: v for pid, v in self._last_tx.items() if pid in self.netmap.peers}
        self._send(self.disco.set_peers(peers, now))
        self._update_relays()
        self._apply_path_policies()
        if self.engine is not None:
            kwargs: dict[str, Any] = {"initiate_new": self._engine_fresh}
            if hasattr(self.engine, "set_route"):
                kwargs["routes"] = {n.node_key.raw: self._route_for(n, now) for n in peers}
            self.engine.set_peers(
                [(n.node_key, n.host_routes(), self._endpoint_for(n, now)) for n in peers],
                **kwargs,
            )
            self._engine_fresh = False
            self._reconcile_endpoints()
        if msg.get("type") == "full":
            self._first_map.set()
        log.info("map v%d: %d peer(s), %d filter rule(s)", self.netmap.version, len(peers),
                 len(self.netmap.packet_filter))

    def _endpoint_for(self, n: MapNode, now: float) -> tuple[str, int] | None:
        """Disco's chosen path, else the first advertised endpoint (IPv4 first) to start with."""
        best = self.disco.best_endpoint(n.id, now)
        if best is not None:
            return best
        eps = sorted(n.endpoints, key=lambda e: ":" in e[0])
        return eps[0] if eps else None

    def _route_for(self, n: MapNode, now: float) -> tuple[tuple[str, int] | None, int]:
        """Disco's route; with neither a direct path nor DERP (no DERP map), the first
        advertised endpoint, as before DERP existed."""
        direct, region = self.disco.route(n.id, now)
        if direct is None and not region:
            direct = self._endpoint_for(n, now)
        return direct, region

    def _apply_path_policies(self) -> None:
        pol = self.st.prefs.path_policy
        now = time.monotonic()
        for n in self.netmap.peers.values():
            self._send(self.disco.set_path_policy(n.id, PathPolicy(pol.get(n.name, "auto")), now))
        self._reconcile_endpoints()

    # -- disco ----------------------------------------------------------------------------------

    def _apply_socket_changes(self) -> None:
        """Open and close the spray sockets the disco layer named (see the module docstring)."""
        opened, closed = self.disco.take_socket_changes()
        eng, magic, main = self.engine, self.magic, self.sock
        for sid in opened:
            if eng is None or magic is None or main is None or not hasattr(
                    eng, "add_spray_socket"):
                self._count_spray("open_skipped")
                continue
            try:
                s = socket.socket(main.family, socket.SOCK_DGRAM)
                if main.family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                s.bind(("::" if main.family == socket.AF_INET6 else "0.0.0.0", 0))
            except OSError as e:
                self._count_spray("open_error")
                if self.spray_counters["open_error"] == 1:
                    log.warning("cannot open a spray socket: %s", e)
                continue
            self._spray_socks[sid] = s
            eng.add_spray_socket(sid, s, magic.divert_for(sid))
        if opened:
            log.info("spray: opened %d socket(s) (%d open)", len(opened), len(self._spray_socks))
        for sid in closed:
            old = self._spray_socks.pop(sid, None)
            if old is None:
                continue
            if eng is not None and hasattr(eng, "remove_spray_socket"):
                eng.remove_spray_socket(old)
            old.close()
        if closed:
            log.info("spray: closed %d socket(s) (%d open)", len(closed), len(self._spray_socks))

    def _count_spray(self, key: str) -> None:
        self.spray_counters[key] = self.spray_counters.get(key, 0) + 1

    def _send(self, sends: list[Send]) -> None:
        self._apply_socket_changes()
        for s in sends:
            if s.derp is not None:
                self.derp.send(s.derp.raw, s.addr[1], s.data)
            elif s.sock:
                spray = self._spray_socks.get(s.sock)
                if spray is None or self.magic is None:
                    self._count_spray("send_no_socket")
                    continue
                self.magic.send(s.data, s.addr, spray)
            elif self.magic is not None:
                self.magic.send(s.data, s.addr)

    def _on_derp_packet(self, region: int, src: NodeKey, pkt: bytes) -> None:
        """Event loop: disco to the disco layer, everything else is WireGuard for the datapath."""
        try:
            if is_disco(pkt):
                sends, results = self.disco.handle(pkt, (DERP_HOST, region), time.monotonic(),
                                                   via_derp=region)
                self._send(sends)
                self._finish_pings(results)
                self._reconcile_endpoints()
            elif self.engine is not None and not self.engine.inject(src.raw, pkt):
                self.disco.drops["derp_unknown_peer"] += 1
        except Exception:
            self.disco.drops["derp_handler_error"] += 1
            if self.disco.drops["derp_handler_error"] == 1:
                log.exception("DERP packet handler error (counted; logged once)")

    def _on_stun(self, data: bytes, src: Any) -> None:
        runner = self._netcheck_runner
        if runner is None or not runner.feed(data, src):
            self.disco.drops["stray_stun"] += 1

    async def _run_netcheck(self) -> Report:
        """One netcheck over the shared socket; then home region and endpoints follow it."""
        async with self._netcheck_lock:
            magic = self.magic
            assert magic is not None

            def send(data: bytes, addr: Any) -> None:
                magic.send(data, (str(addr[0]), int(addr[1])))

            runner = NetcheckRunner(self.derp.derp_map, send)
            self._netcheck_runner = runner
            try:
                report = await runner.run()
            finally:
                self._netcheck_runner = None
        self.netcheck_report = report
        self._stun_endpoint = report.global_v4 if report.udp else None
        public_ip = (report.global_v4 or "").rsplit(":", 1)[0] if report.udp else ""
        self.disco.set_nat(report.udp, report.mapping_varies_by_dest, public_ip)
        lat = {int(r): v / 1e3 for r, v in report.region_latency_ms.items()}
        home = pick_home_region(lat, self.derp.home or None)
        if home:
            self.derp.set_home(home)
            self.disco.set_home_region(home)
        log.info("netcheck: %s", report.summary().replace("\n", "; "))
        return report

    def _on_disco(self, data: bytes, src: tuple[str, int], sock: int = 0) -> None:
        try:
            self._handle_disco(data, src, sock)
        except Exception:  # a bug must not surface as an unhandled loop-callback error per packet
            self.disco.drops["handler_error"] += 1
            if self.disco.drops["handler_error"] == 1:
                log.exception("disco handler error (counted; logged once)")

    def _handle_disco(self, data: bytes, src: tuple[str, int], sock: int = 0) -> None:
        sends, results = self.disco.handle(data, src, time.monotonic(), sock=sock)
        self._send(sends)
        self._finish_pings(results)
        self._reconcile_endpoints()

    def _finish_pings(self, results: list[PingResult]) -> None:
        for r in results:
            fut = self._ping_waiters.pop(r.txid, None)
            if fut is not None and not fut.done():
                fut.set_result(r)

    def _reconcile_endpoints(self) -> None:
        """Push each peer's current route into the datapath (a no-op when unchanged)."""
        if self.engine is None:
            return
        now = time.monotonic()
        has_route = hasattr(self.engine, "set_route")
        for n in self.netmap.peers.values():
            desc = " + ".join(self.disco.route_descriptions(n.id, now)) or "none"
            if self._logged_route.get(n.id) != desc:
                self._logged_route[n.id] = desc
                log.info("path to %s: %s", n.name, desc)
            relay = self.disco.relay_route(n.id, now)
            if relay is not None and has_route:
                _, region = self.disco.route(n.id, now)  # DERP too while the relay is suspect
                self.engine.set_route(n.node_key, relay[0], region, relay[1])
                continue
            direct, region = self._route_for(n, now)
            if direct is None and not region:
                continue
            if has_route:
                sid = self.disco.route_socket(n.id, now) if direct is not None else 0
                spray = self._spray_socks.get(sid) if sid else None
                if spray is not None:
                    self.engine.set_route(n.node_key, direct, region, None, spray)
                else:
                    self.engine.set_route(n.node_key, direct, region)
            elif direct is not None:
                self.engine.set_endpoint(n.node_key, direct)
        sprayin = self.disco.spray_inbound()
        if sprayin != self._spray_inbound and hasattr(self.engine, "set_spray_inbound"):
            self._spray_inbound = sprayin
            self.engine.set_spray_inbound(sprayin)
        inbound = self.disco.relay_inbound()
        if inbound != self._relay_inbound and hasattr(self.engine, "set_relay_inbound"):
            self._relay_inbound = inbound
            self.engine.set_relay_inbound(inbound)

    async def _disco_loop(self) -> None:
        last_refresh = time.monotonic()
        while True:
            await asyncio.sleep(DISCO_TICK)
            now = time.monotonic()
            try:
                if self.engine is not None:
                    stats = self.engine.peer_stats()
                    for n in self.netmap.peers.values():
                        ps = stats.get(n.node_key.raw)
                        if ps is not None and ps.tx_bytes != self._last_tx.get(n.id, 0):
                            self._last_tx[n.id] = ps.tx_bytes
                            self._send(self.disco.note_activity(n.id, now))
                        if ps is not None and ps.data_at is not None:
                            self.disco.note_data(n.id, ps.data_at)
                self._send(self.disco.tick(now))
                self._reconcile_endpoints()
                self.derp.tick()
                if (self.derp.regions() and self.engine is not None
                        and now >= self._next_netcheck and not self._netcheck_lock.locked()):
                    self._next_netcheck = now + NETCHECK_INTERVAL
                    self._spawn(self._periodic_netcheck())
                if (now - last_refresh >= ENDPOINT_REFRESH and self._client is not None
                        and self.control_connected):
                    last_refresh = now
                    await self._report_endpoints(self._client)
            except ControlError as e:
                log.warning("endpoint update failed: %s", e)
            except Exception:  # a bug here must not stop disco for good
                log.exception("disco loop error")

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    async def _periodic_netcheck(self) -> None:
        try:
            report = await self._run_netcheck()
        except Exception:
            log.exception("netcheck failed")
            self._next_netcheck = time.monotonic() + NETCHECK_RETRY
            return
        if not report.region_latency_ms:
            self._next_netcheck = time.monotonic() + NETCHECK_RETRY
        if self._client is not None and self.control_connected:
            try:
                await self._report_endpoints(self._client)
            except ControlError as e:
                log.warning("endpoint update failed: %s", e)

    def path_of(self, peer_id: int) -> Path:
        return self.disco.path(peer_id, time.monotonic())
