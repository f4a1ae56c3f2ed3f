"""RelayService: the peer relay server as the node daemon owns it.

It ties together the sans-IO core (:class:`RelayServer`), the UDP shell (:class:`RelayUDP`, the hot
path on its own thread) and, when asked for and possible, the nftables fast path
(:class:`KernelPath`, kept in step by a sync thread every ``sync_interval`` seconds and right after
every bind). The daemon calls:

- ``start(port)`` / ``stop()`` (``relaymesh set --relay-server-port N``; 0 = any free port);
- ``handle_allocate_packet(sealed)`` for an allocate request that arrived over DERP; the answer goes
  back over DERP to the returned key. Policy is the daemon's ``is_allowed(requester, other)``
  callback (the relay capability for both keys), consulted for every well-formed request;
- ``set_candidates(...)`` when its discovered addresses change (interfaces, STUN, static);
- ``metrics()`` and ``sessions()`` for Prometheus, ``status`` and ``debug peer-relay-sessions``;
  sessions are shown by node name through the ``resolver(disco key) -> name`` callback;
- ``load()``: 0..1, for the allocate response (clients rank relays by latency * (1 + load)).

All core access holds the shell's lock, so control calls from any thread are safe.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address

from relaymesh.disco import codec as disco
from relaymesh.keys import DiscoKey, PrivateKey
from relaymesh.relay.kernel import KernelPath, KernelPathError
from relaymesh.relay.session import Addr, RelayLimits, RelayServer
from relaymesh.relay.udp import RelayUDP

log = logging.getLogger(__name__)

SYNC_INTERVAL = 1.0  # s between kernel-path syncs (counter credit, rule updates)
MIN_SYNC_GAP = 0.25  # s: a flood of control packets triggers at most 4 nft runs per second
# With the kernel fast path on, a relay has about this much more forwarding headroom than the
# userspace loop (docs/peer-relays.md, figures: ~1.07M vs ~220k pkt/s): load() scales capacity.
KERNEL_CAPACITY_FACTOR = 5.0

IsAllowed = Callable[[DiscoKey, DiscoKey], bool]
Resolver = Callable[[DiscoKey], str | None]


@dataclass(frozen=True, slots=True)
class SessionView:
    """One session for ``debug peer-relay-sessions``: names, addresses, traffic each way.

    Direction 0 is ``names[0]`` -> ``names[1]``; ``kernel`` says the kernel forwards it now.
    """

    session_id: int
    allocation_id: int
    state: str
    names: tuple[str, str]
    keys: tuple[str, str]
    addrs: tuple[Addr | None, Addr | None]
    packets: tuple[int, int]
    bytes: tuple[int, int]
    kernel: bool

    def as_dict(self) -> dict[str, object]:
        return {
            "session_id": self.session_id, "allocation_id": self.allocation_id,
            "state": self.state, "names": list(self.names), "keys": list(self.keys),
            "addrs": [None if a is None else f"{_fmt(a)}" for a in self.addrs],
            "packets": list(self.packets), "bytes": list(self.bytes), "kernel": self.kernel,
        }


def _fmt(a: Addr) -> str:
    return f"[{a[0]}]:{a[1]}" if ":" in a[0] else f"{a[0]}:{a[1]}"


def local_candidates(port: int) -> list[disco.AddrPort]:
    """Global-scope interface addresses (IPv4 first) with ``port``, from ``ip -j addr``."""
    try:
        cp = subprocess.run(["ip", "-j", "addr", "show", "scope", "global"], capture_output=True,
                            text=True, timeout=5, check=False)
        data = json.loads(cp.stdout or "[]")
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return []
    v4: list[disco.AddrPort] = []
    v6: list[disco.AddrPort] = []
    for link in data:
        for info in link.get("addr_info", []):
            try:
                ip = ip_address(info["local"])
            except (KeyError, ValueError):
                continue
            if isinstance(ip, IPv4Address):
                v4.append((ip, port))
            elif isinstance(ip, IPv6Address) and not ip.is_link_local:
                v6.append((ip, port))
    return (v4 + v6)[: disco.MAX_ENDPOINTS]


class RelayService:
    """The relay server of one node: see the module docstring."""

    def __init__(
        self,
        private: PrivateKey,
        is_allowed: IsAllowed,
        *,
        resolver: Resolver | None = None,
        limits: RelayLimits | None = None,
        static_endpoints: Sequence[disco.AddrPort] = (),
        discover_candidates: bool = True,
        kernel: bool = False,
        kernel_netns: str | None = None,
        native: bool = True,
        host: str = "",
        offload: bool = True,
        clock: Callable[[], float] = time.monotonic,
        sync_interval: float = SYNC_INTERVAL,
        socket_factory: Callable[[int], socket.socket] | None = None,
    ) -> None:
        """``socket_factory(port)`` replaces the default dual-stack socket (e.g. one opened in
        another network namespace; tests and the lab); ``kernel_netns`` runs nft there."""
        self.private = private
        self.is_allowed = is_allowed
        self.resolver = resolver
        self.limits = limits or RelayLimits()
        self.static_endpoints = tuple(static_endpoints)
        self.discover_candidates = discover_candidates
        self.want_kernel = kernel
        self.want_native = native
        self.kernel_netns = kernel_netns
        self.host = host
        self.offload = offload
        self.clock = clock
        self.sync_interval = sync_interval
        self.socket_factory = socket_factory
        self.server: RelayServer | None = None
        self.shell: RelayUDP | None = None
        self.kernel: KernelPath | None = None
        self.kernel_reason: str | None = None  # why the kernel path is off, when it was wanted
        self._extra: tuple[disco.AddrPort, ...] = ()
        self._sync_kick = threading.Event()
        self._stopping = threading.Event()
        self._sync_thread: threading.Thread | None = None
        self._ctl = threading.Lock()  # start/stop

    # ---- lifecycle ---------------------------------------------------------------------------
    @property
    def port(self) -> int | None:
        return None if self.shell is None else self.shell.port

    @property
    def running(self) -> bool:
        return self.shell is not None and self.shell.running

    @property
    def disco_key(self) -> DiscoKey:
        return self.private.disco_public()

    def start(self, port: int = 0) -> int:
        """Open the relay port (0 = any free port) and start forwarding; returns the bound port."""
        with self._ctl:
            if self.shell is not None:
                raise RuntimeError("relay service already started")
            server = RelayServer(self.private, self.clock(), limits=self.limits)
            sock = None if self.socket_factory is None else self.socket_factory(port)
            shell = RelayUDP(server, port, host=self.host, sock=sock, clock=self.clock,
                             offload=self.offload, on_control=self._sync_kick.set,
                             native=self.want_native)
            self.server, self.shell = server, shell
            self._apply_candidates()
            shell.start()
            self._stopping.clear()
            if self.want_kernel:
                self._start_kernel(shell.port)
            return shell.port

    def _start_kernel(self, port: int) -> None:
        kp = KernelPath(port, self.limits, netns=self.kernel_netns)
        try:
            kp.start()
        except KernelPathError as e:
            self.kernel_reason = str(e)
            log.warning("relay: kernel fast path unavailable (%s); forwarding in userspace", e)
            return
        self.kernel = kp
        self.kernel_reason = None
        shell = self.shell
        if shell is not None:  # load() and allocate responses: the kernel forwards far more
            with shell.lock:
                shell.server.load_capacity_pps = self.limits.capacity_pps * KERNEL_CAPACITY_FACTOR
        log.info("relay: kernel fast path on (nftables table owned by this process: it goes "
                 "when the process does)")
        t = threading.Thread(target=self._sync_loop, name="relay-kernel-sync", daemon=True)
        self._sync_thread = t
        t.start()

    def stop(self) -> None:
        """Close the port, remove the kernel rules; sessions are gone (clients re-allocate)."""
        with self._ctl:
            self._stopping.set()
            self._sync_kick.set()
            if self._sync_thread is not None:
                self._sync_thread.join(10)
                self._sync_thread = None
            if self.kernel is not None:
                self.kernel.stop()
                self.kernel = None
            if self.shell is not None:
                self.shell.stop()
            self.shell = None
            self.server = None

    def _sync_loop(self) -> None:
        while not self._stopping.is_set():
            self._sync_kick.wait(self.sync_interval)
            # a kick (a batch with control packets) is honoured, but not more often than this
            if self._stopping.wait(min(MIN_SYNC_GAP, self.sync_interval)):
                return
            self._sync_kick.clear()
            kp, shell = self.kernel, self.shell
            if kp is None or shell is None:
                return
            try:
                kp.sync(shell.server, shell.lock, self.clock)
            except Exception:  # never let the sync thread die silently
                log.exception("relay: kernel sync failed")

    def _refresh(self) -> None:
        """Kernel- and natively-forwarded traffic credited now, so a listing or a scrape is
        current (one netlink counter dump; a sync would be up to ``sync_interval`` behind)."""
        kp, shell = self.kernel, self.shell
        if shell is None:
            return
        shell.refresh()
        if kp is not None:
            kp.refresh(shell.server, shell.lock, self.clock)

    def sync_kernel(self) -> None:
        """Run one kernel sync now (tests; the sync thread does this on its own)."""
        if self.kernel is not None and self.shell is not None:
            self.kernel.sync(self.shell.server, self.shell.lock, self.clock)

    # ---- candidates ---------------------------------------------------------------------------
    def set_candidates(self, addrs: Sequence[disco.AddrPort]) -> None:
        """Addresses discovered by the daemon (STUN, ...) in addition to interfaces and statics."""
        self._extra = tuple(addrs)
        self._apply_candidates()

    def _apply_candidates(self) -> None:
        shell = self.shell
        if shell is None:
            return
        seen: dict[disco.AddrPort, None] = {}
        found = local_candidates(shell.port) if self.discover_candidates else []
        for c in (*self.static_endpoints, *self._extra, *found):
            seen.setdefault(c, None)
        with shell.lock:
            shell.server.candidates = list(seen)[: disco.MAX_ENDPOINTS]

    @property
    def candidates(self) -> tuple[disco.AddrPort, ...]:
        shell = self.shell
        if shell is None:
            return ()
        with shell.lock:
            return shell.server.candidates

    # ---- allocation -------------------------------------------------------------------------
    def _checked(self, requester: DiscoKey, other: DiscoKey) -> bool:
        try:
            return bool(self.is_allowed(requester, other))
        except Exception:  # a policy bug refuses, it does not crash the DERP reader
            log.exception("relay: policy check failed; refusing")
            return False

    def handle_allocate_packet(self, packet: bytes) -> tuple[DiscoKey, bytes] | None:
        """A sealed allocate request from DERP -> (requester, sealed response) or None (dropped,
        counted). The policy callback runs outside the core's lock."""
        shell = self.shell
        if shell is None:
            return None
        # The core asks for a verdict only for a well-formed request; open it once here, without
        # the lock, so a slow policy callback never holds up the packet path.
        verdict: tuple[DiscoKey, DiscoKey, bool] | None = None
        try:
            sender, msg = disco.open_sealed(packet, self.private)
        except disco.DiscoError:
            pass
        else:
            if isinstance(msg, disco.AllocateRequest) and sender in (msg.client_a, msg.client_b):
                other = msg.client_b if sender == msg.client_a else msg.client_a
                verdict = (sender, other, self._checked(sender, other))

        def allowed(requester: DiscoKey, other: DiscoKey) -> bool:
            return verdict is not None and verdict[:2] == (requester, other) and verdict[2]

        with shell.lock:
            return shell.server.handle_allocate_packet(packet, self.clock(), allowed)

    def allocate(self, requester: DiscoKey, other: DiscoKey,
                 generation: int = 1) -> disco.AllocateResponse | None:
        """In-process allocation (tests, and a relay serving itself); same policy check."""
        shell = self.shell
        if shell is None:
            return None
        ok = self._checked(requester, other)
        with shell.lock:
            return shell.server.handle_allocate(requester, other, generation, self.clock(), ok)

    # ---- observation -------------------------------------------------------------------------
    def _name(self, key: DiscoKey) -> str:
        if self.resolver is not None:
            try:
                name = self.resolver(key)
            except Exception:
                name = None
            if name:
                return name
        return key.short

    def sessions(self) -> list[SessionView]:
        """Every session by node names and addresses, packets and bytes each way."""
        shell = self.shell
        if shell is None:
            return []
        self._refresh()
        with shell.lock:
            stats = shell.server.metrics(with_sessions=True).sessions
        in_kernel = set() if self.kernel is None else {f.session_id for f in self.kernel.flows}
        return [
            SessionView(
                session_id=st.session_id, allocation_id=st.allocation_id, state=st.state.value,
                names=(self._name(st.clients[0]), self._name(st.clients[1])),
                keys=(st.clients[0].short, st.clients[1].short), addrs=st.addrs,
                packets=st.packets, bytes=st.bytes, kernel=st.session_id in in_kernel,
            )
            for st in sorted(stats, key=lambda s: s.session_id)
        ]

    def load(self) -> float:
        """0 (idle) .. 1 (full): the core's :meth:`RelayServer.load` (forwarding rate over
        capacity, or session occupancy, whichever is higher), with the capacity scaled by
        ``KERNEL_CAPACITY_FACTOR`` while the kernel fast path forwards. 0.0 when not running.
        O(1): the rate is averaged by the shell's once-a-second timer."""
        shell = self.shell
        if shell is None:
            return 0.0
        with shell.lock:
            return shell.server.load()

    def metrics(self) -> dict[str, object]:
        """Forwarded packets/bytes (userspace + kernel), sessions by state, drops by reason."""
        shell = self.shell
        if shell is None:
            return {"running": False}
        self._refresh()
        with shell.lock:
            m = shell.server.metrics()
        c = shell.counters
        drops = dict(m.drops)
        for k, v in c.drops.items():
            drops[f"shell_{k}"] = v
        out: dict[str, object] = {
            "running": True,
            "port": shell.port,
            "forwarded_packets": m.forwarded_packets,  # includes kernel-forwarded (credited)
            "forwarded_bytes": m.forwarded_bytes,
            "userspace_forwarded_packets": c.forwarded_packets,
            "userspace_forwarded_bytes": c.forwarded_bytes,
            "userspace_receives": c.receives,
            "userspace_forwarded_runs": c.forwarded_runs,
            "sessions_by_state": m.sessions_by_state,
            "sessions": sum(m.sessions_by_state.values()),
            "drops": drops,
            "kernel": self.kernel is not None,
            "native": shell.native,
            "offloads": shell.offloads,
            "load": self.load(),
        }
        if self.kernel is not None:
            ks = self.kernel.stats
            out.update(kernel_flows=ks.flows, kernel_forwarded_packets=ks.forwarded_packets,
                       kernel_forwarded_bytes=ks.forwarded_bytes, kernel_errors=ks.errors)
        elif self.want_kernel:
            out["kernel_unavailable"] = self.kernel_reason or "not started"
        if shell.native_reason:
            out["native_unavailable"] = shell.native_reason
        return out
