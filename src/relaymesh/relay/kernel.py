"""Optional kernel fast path for the peer relay: bound sessions forwarded by nftables.

Once a session is bound on both sides, the relay's own ``table inet relaymesh_relay`` gets, for
each direction (a *flow*: sender's bound ip:port -> relay port, session id S), a rule that rewrites
the packet's destination to the other side's bound ip:port and, after routing, its source to the
relay's address and port. The kernel then forwards the session without a userspace wake-up.

Why stateless rewrites (``ip daddr set`` / ``ip saddr set`` with ``notrack``) and not ``dnat`` /
``snat``: conntrack NAT is decided once per connection and then applies to EVERY packet of that
5-tuple, but the bind handshake (control packets) shares the 5-tuple with the data and must still
reach userspace; and a flow that userspace already handled has a conntrack entry, so nat rules
would never be consulted for it. A stateless rewrite is decided per packet, so:

- only packets whose relay header has the control bit clear and the session id S are rewritten
  (``@th,72,8 & 0x80 == 0`` is payload byte 1, ``@th,96,24`` payload bytes 4..6: the UDP header
  is 8 bytes, so payload bit offsets are +64); shorter or control packets, and unknown session ids
  from a bound address, fall through to the socket and the userspace core, which counts them;
- the destination is rewritten in ``prerouting`` at priority ``raw`` (before conntrack, with
  ``notrack``), so routing sends the packet on; the source in ``postrouting`` (a source rewrite in
  prerouting would make the packet a martian with a local source address).

Layout (all names ours; ``<ip>`` with dots as underscores)::

    chain pre    prerouting/raw:  udp dport PORT fib daddr type local
                                  ip saddr . udp sport vmap @pre_flows      -> jump s_<ip>_<port>
    chain s_<ip>_<port>           per bound source: skip short/control, then per session S:
                                  S, within the client's limits -> counter c_S_i, set dst, accept
                                  S (over the limits)           -> counter d_S_i, drop
    chain post   postrouting:     ip saddr . udp sport . ip daddr . udp dport vmap @post_flows
                                                                              -> jump n_<relay ip>
    chain n_<relay ip>            ip saddr set <relay ip> udp sport set PORT

Per-client limits are named nft ``limit`` objects (``lp_<client>`` packets, ``lb_<client>``
bytes, shared by all of that client's flows, like the core's token buckets). Counters are named
per flow and read as JSON (``list counters``); :meth:`KernelPath.sync` credits them to the core
(packets, bytes, last-seen: so a kernel-forwarded session does not idle out) and counts the
over-limit drops as ``rate_limited``.

Lifetime: the table is created with ``flags owner`` (Linux 5.12+) through one libnftables context
(:mod:`relaymesh.relay.nftlib`, ctypes) that the :class:`KernelPath` keeps for its whole life.
The kernel deletes an owned table when the netlink socket that created it closes, so when the
relay process dies, even by SIGKILL, its forwarding dies with it: no stale rules keep forwarding
for a relay that clients should see as dead, and nothing is left for anybody to clean up. Only
the owner may change an owned table, so every update and every counter read goes through that
context. A table of the same name left by an older version (no owner flag) is deleted at start;
one owned by another live process (a second relay in the same namespace) makes start fail, and the
relay then forwards in userspace. With ``netns`` the context is created inside that namespace (see
nftlib); the daemon runs inside its own namespace and passes none. Beware: nft 1.0.6 prints the
JSON of a table with flags garbled (``nft -j list table``/``list ruleset``, sometimes invalid JSON);
list its maps, chains and counters instead (as :meth:`KernelPath.read_counters` does).

Limits: IPv4 only (IPv6 and mixed-family sessions stay in userspace), and both directions between
the relay host's own node and its peer stay in userspace (locally delivered packets never pass
postrouting, so their source could not be rewritten; locally generated ones carry their local route
through prerouting, so a destination rewrite would not forward them); the host must forward IPv4
(``net.ipv4.ip_forward=1``, set by :meth:`KernelPath.start` and restored by ``stop``, though not
after a SIGKILL) and no other
ruleset may drop forwarded traffic; rules follow the core within one sync interval (a re-bind or an
expiry is applied at the next sync, which the service also triggers on every bind).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, ip_address

from relaymesh.relay import nftlib
from relaymesh.relay.session import Addr, RelayLimits, RelayServer, SessionStats, State

log = logging.getLogger(__name__)

TABLE = "relaymesh_relay"
FAMILY = "inet"
MIN_DATA_UDP_LEN = 16  # UDP header (8) + relay header (8): anything shorter is userspace's drop
CMD_TIMEOUT = 10.0  # s for one helper command (sysctl, ip route get)
REFRESH_WAIT = 0.5  # s a listing waits for a running sync before reading what is credited
IP_FORWARD = "net.ipv4.ip_forward"
NFT_LIMIT_MAX = (1 << 32) - 1  # nft_limit computes burst * NSEC_PER_SEC in 64 bits: keep it small


class KernelPathError(RuntimeError):
    """nftables is unusable here; the relay stays in userspace."""


@dataclass(frozen=True, slots=True, order=True)
class Flow:
    """One direction of a bound session, as the kernel forwards it."""

    session_id: int
    side: int  # index of the sending client in SessionStats.clients
    src: Addr  # sender's bound address
    dst: Addr  # receiver's bound address
    relay_ip: str  # the relay's source address towards dst
    client: str  # limiter id of the sender (hex of its disco key prefix)

    @property
    def counter(self) -> str:
        return f"c_{self.session_id}_{self.side}"

    @property
    def drop_counter(self) -> str:
        return f"d_{self.session_id}_{self.side}"


def _ident(ip: str, port: int | None = None) -> str:
    s = ip.replace(".", "_")
    return s if port is None else f"{s}_{port}"


def _is_v4(ip: str) -> bool:
    try:
        return isinstance(ip_address(ip), IPv4Address)
    except ValueError:
        return False


def flows_for(
    sessions: Iterable[SessionStats], relay_ip_for: Callable[[str], str | None]
) -> list[Flow]:
    """The flows the kernel should forward: both directions of every bound IPv4 session, except
    a direction from or to the relay host itself (``relay_ip_for(x) == x``: the route to a local
    address has that address as its source)."""
    flows: list[Flow] = []
    for st in sessions:
        a, b = st.addrs
        if st.state is not State.BOUND or a is None or b is None:
            continue
        if not (_is_v4(a[0]) and _is_v4(b[0])):
            continue
        for side, (src, dst) in enumerate(((a, b), (b, a))):
            # A source on the relay host itself (a relay serving its own node) sends locally
            # generated packets: they reach prerouting through lo with their local-delivery
            # route already attached, so a destination rewrite there would deliver them locally,
            # to no socket. Userspace forwards that flow.
            if relay_ip_for(src[0]) == src[0]:
                continue
            rip = relay_ip_for(dst[0])
            # A destination on the relay host itself (a relay serving its own node) would get
            # the packet delivered locally with the sender's source, never source-rewritten
            # (postrouting is not on the local-delivery path): userspace handles that flow.
            if rip is None or not _is_v4(rip) or rip == dst[0]:
                continue
            flows.append(Flow(st.session_id, side, src, dst, rip, st.clients[side].raw[:8].hex()))
    return sorted(flows)


def ruleset(port: int, flows: Sequence[Flow], limits: RelayLimits,
            old_chains: Iterable[str] = (), old_objects: Iterable[tuple[str, str]] = ()) -> str:
    """The nft script (one atomic transaction) that makes the table forward exactly ``flows``.

    Creates the table's skeleton if missing, rebuilds every chain and map, keeps the counters of
    flows that stay (their values are the metrics), and deletes chains and objects (``("counter",
    name)`` / ``("limit", name)``) that were installed before and are no longer needed.
    """
    t = f"{FAMILY} {TABLE}"
    src_chains: dict[str, list[Flow]] = {}
    for f in flows:
        src_chains.setdefault(f"s_{_ident(*f.src)}", []).append(f)
    snat_chains = sorted({f"n_{_ident(f.relay_ip)}": f.relay_ip for f in flows}.items())
    counters = sorted({n for f in flows for n in (f.counter, f.drop_counter)})
    clients = sorted({f.client for f in flows})
    lines = [
        f"add table {t} {{ flags owner; }}",  # owned: the kernel drops it when we die
        f"add map {t} pre_flows {{ type ipv4_addr . inet_service : verdict; }}",
        f"add map {t} post_flows "
        f"{{ type ipv4_addr . inet_service . ipv4_addr . inet_service : verdict; }}",
        f"add chain {t} pre {{ type filter hook prerouting priority raw; policy accept; }}",
        f"add chain {t} post {{ type filter hook postrouting priority srcnat; policy accept; }}",
        f"flush map {t} pre_flows",
        f"flush map {t} post_flows",
        f"flush chain {t} pre",
        f"flush chain {t} post",
        f"add rule {t} pre udp dport {port} fib daddr type local "
        f"ip saddr . udp sport vmap @pre_flows",
        f"add rule {t} post ip saddr . udp sport . ip daddr . udp dport vmap @post_flows",
    ]
    keep_chains = set(src_chains) | {n for n, _ in snat_chains}
    for name in sorted(set(old_chains) - keep_chains):  # the maps no longer reference them
        lines += [f"flush chain {t} {name}", f"delete chain {t} {name}"]
    for name in counters:
        lines.append(f"add counter {t} {name}")
    def clamp(x: float) -> int:
        return min(NFT_LIMIT_MAX, max(1, int(x)))

    for c in clients:
        lines.append(f"add limit {t} lp_{c} {{ rate {clamp(limits.packets_per_second)}/second "
                     f"burst {clamp(limits.packet_burst)} packets }}")
        lines.append(f"add limit {t} lb_{c} {{ rate {clamp(limits.bytes_per_second)} "
                     f"bytes/second burst {clamp(limits.byte_burst)} bytes }}")
    for name, chain_flows in sorted(src_chains.items()):
        lines += [f"add chain {t} {name}", f"flush chain {t} {name}",
                  f"add rule {t} {name} udp length < {MIN_DATA_UDP_LEN} return",
                  f"add rule {t} {name} @th,72,8 & 0x80 != 0 return"]
        for f in chain_flows:
            sid = f"@th,96,24 {f.session_id:#08x}"
            lines.append(
                f'add rule {t} {name} {sid} limit name "lp_{f.client}" limit name "lb_{f.client}" '
                f'notrack counter name "{f.counter}" '
                f"ip daddr set {f.dst[0]} udp dport set {f.dst[1]} accept")
            lines.append(f'add rule {t} {name} {sid} counter name "{f.drop_counter}" drop')
        src_ip, src_port = chain_flows[0].src
        lines.append(f"add element {t} pre_flows {{ {src_ip} . {src_port} : jump {name} }}")
    for name, rip in snat_chains:
        lines += [f"add chain {t} {name}", f"flush chain {t} {name}",
                  f"add rule {t} {name} ip saddr set {rip} udp sport set {port}"]
    for f in flows:
        lines.append(f"add element {t} post_flows {{ {f.src[0]} . {f.src[1]} . {f.dst[0]} . "
                     f"{f.dst[1]} : jump n_{_ident(f.relay_ip)} }}")
    keep_objects = {("counter", n) for n in counters} | {
        ("limit", f"{p}_{c}") for c in clients for p in ("lp", "lb")}
    for kind, name in sorted(set(old_objects) - keep_objects):
        lines.append(f"delete {kind} {t} {name}")
    return "\n".join(lines) + "\n"


@dataclass
class KernelStats:
    flows: int = 0
    syncs: int = 0
    forwarded_packets: int = 0  # by the kernel, since start
    forwarded_bytes: int = 0
    rate_limited: int = 0
    errors: int = 0



class KernelPath:
    """Keeps ``table inet relaymesh_relay`` in step with a :class:`RelayServer`'s bound sessions.

    ``netns`` makes the table (and the helper commands) act in that network namespace (tests,
    lab); ``relay_ip`` fixes the relay's source address instead of asking the routing table per
    destination.
    """

    def __init__(self, port: int, limits: RelayLimits, *, netns: str | None = None,
                 relay_ip: str | None = None, set_forwarding: bool = True) -> None:
        self.port = port
        self.limits = limits
        self.netns = netns
        self.relay_ip = relay_ip
        self.set_forwarding = set_forwarding
        self.stats = KernelStats()
        self._prefix = ["ip", "netns", "exec", netns] if netns else []
        self._nft_ctx: nftlib.Nft | None = None  # owns the table: one for the whole life
        self._flows: list[Flow] = []
        self._chains: set[str] = set()
        self._objects: set[tuple[str, str]] = set()
        self._last: dict[str, tuple[int, int]] = {}  # counter -> (packets, bytes) already credited
        self._route_cache: dict[str, str | None] = {}
        self._old_forward: str | None = None
        self._started = False
        self._sync_lock = threading.Lock()  # one sync at a time (timer and bind triggers)

    # ---- availability and lifecycle ---------------------------------------------------------
    @staticmethod
    def unavailable_reason() -> str | None:
        """Why the kernel path cannot run here (None: it can, as far as we can tell up front;
        a kernel without owned tables or a missing capability shows at :meth:`start`)."""
        if os.geteuid() != 0:
            return "not root (nftables needs CAP_NET_ADMIN)"
        return nftlib.available()

    def _run(self, cmd: Sequence[str]) -> str:
        """A helper command (sysctl, ip) in our namespace; not nftables (that is the context)."""
        try:
            cp = subprocess.run([*self._prefix, *cmd], capture_output=True, text=True,
                                timeout=CMD_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise KernelPathError(f"{cmd[0]}: {e}") from e
        if cp.returncode != 0:
            raise KernelPathError(f"{' '.join(cmd)}: {cp.stderr.strip()[:500]}")
        return cp.stdout

    def _nft(self, script: str) -> None:
        ctx = self._nft_ctx
        if ctx is None:
            raise KernelPathError("nftables context closed")
        try:
            ctx.run(script)
        except nftlib.NftError as e:
            raise KernelPathError(f"nft: {e}") from e

    def start(self) -> None:
        """Install an empty owned table (replacing a leftover one) and enable IPv4 forwarding.

        Raises KernelPathError when nftables is unusable (no libnftables, no CAP_NET_ADMIN, a
        kernel without owned tables, the table owned by another live process); the caller then
        stays in userspace.
        """
        reason = self.unavailable_reason()
        if reason is not None:
            raise KernelPathError(reason)
        try:
            self._nft_ctx = nftlib.Nft(self.netns)
        except nftlib.NftError as e:
            raise KernelPathError(str(e)) from e
        t = f"{FAMILY} {TABLE}"
        try:
            # One transaction: a leftover table of the same name (an older version's, unowned)
            # goes, the owned skeleton comes. If another live process owns the table, the
            # delete fails with EPERM and nothing changes.
            try:
                skeleton = ruleset(self.port, [], self.limits)
                self._nft(f"add table {t}\ndelete table {t}\n{skeleton}")
            except KernelPathError as e:
                if "Operation not permitted" in str(e):
                    raise KernelPathError(
                        f"not permitted: table {t} owned by another live process (another relay "
                        f"in this network namespace?) or no CAP_NET_ADMIN: {e}") from e
                raise
            self._check_owned()
            if self.set_forwarding:
                self._old_forward = self._run(["sysctl", "-n", IP_FORWARD]).strip()
                if self._old_forward != "1":
                    self._run(["sysctl", "-qw", f"{IP_FORWARD}=1"])
        except KernelPathError:
            self._close_ctx()
            raise
        self._started = True

    def _check_owned(self) -> None:
        """Refuse to run on a kernel that accepted the table but not its owner flag: rules that
        would outlive the process are exactly what the flag is for. (Text listing: nft 1.0.6
        prints broken JSON for a table with flags.)"""
        ctx = self._nft_ctx
        assert ctx is not None
        try:
            text = ctx.run(f"list table {FAMILY} {TABLE}")
        except nftlib.NftError as e:
            raise KernelPathError(f"nft: {e}") from e
        if not any(line.split() == ["flags", "owner"] for line in text.splitlines()):
            raise KernelPathError("the kernel did not keep the table's owner flag (Linux < 5.12?)")

    def _close_ctx(self) -> None:
        ctx, self._nft_ctx = self._nft_ctx, None
        if ctx is not None:
            ctx.close()  # the socket closes: the kernel drops whatever table it still owned

    def stop(self) -> None:
        """Remove the table (sessions fall back to userspace) and restore forwarding."""
        if not self._started:
            return
        self._started = False
        with self._sync_lock:  # a sync running on another thread finishes first
            try:
                self._nft(f"delete table {FAMILY} {TABLE}\n")
            except KernelPathError as e:
                log.warning("relay kernel path: removing the table failed: %s", e)
            self._close_ctx()
        if self._old_forward is not None and self._old_forward != "1":
            try:
                self._run(["sysctl", "-qw", f"{IP_FORWARD}={self._old_forward}"])
            except KernelPathError as e:
                log.warning("relay kernel path: restoring %s failed: %s", IP_FORWARD, e)
        self._flows = []
        self._chains.clear()
        self._objects.clear()
        self._last.clear()

    @property
    def flows(self) -> list[Flow]:
        return list(self._flows)

    # ---- sync ------------------------------------------------------------------------------
    def _relay_ip_for(self, dst: str) -> str | None:
        if self.relay_ip is not None:
            return self.relay_ip
        if dst not in self._route_cache:
            try:
                out = json.loads(self._run(["ip", "-j", "route", "get", dst]))
                self._route_cache[dst] = str(out[0]["prefsrc"]) if out else None
            except (KernelPathError, ValueError, KeyError, IndexError, TypeError):
                self._route_cache[dst] = None
            if len(self._route_cache) > 4096:
                self._route_cache.clear()
        return self._route_cache.get(dst)

    def read_counters(self) -> dict[str, tuple[int, int]]:
        """Every named counter of our table: name -> (packets, bytes)."""
        ctx = self._nft_ctx
        if ctx is None:
            raise KernelPathError("nftables context closed")
        try:
            out = ctx.run_json(f"list counters table {FAMILY} {TABLE}")
        except nftlib.NftError as e:
            raise KernelPathError(f"nft: {e}") from e
        res: dict[str, tuple[int, int]] = {}
        for item in out.get("nftables", []):
            c = item.get("counter")
            if isinstance(c, dict) and c.get("table") == TABLE:
                res[str(c["name"])] = (int(c.get("packets", 0)), int(c.get("bytes", 0)))
        return res

    def sync(self, server: RelayServer, lock: threading.Lock,
             clock: Callable[[], float]) -> None:
        """Credit kernel counters to the core, then make the rules match its bound sessions.

        nft runs outside ``lock``; the core is touched only briefly under it.
        """
        if not self._started:
            return
        with self._sync_lock:
            if not self._started:  # stopped while we waited
                return
            try:
                self._sync(server, lock, clock)
            except KernelPathError as e:
                self.stats.errors += 1
                log.warning("relay kernel path: sync failed: %s", e)

    def refresh(self, server: RelayServer, lock: threading.Lock,
                clock: Callable[[], float]) -> None:
        """Credit the kernel's counters to the core now, without touching the rules: listings
        and metrics call this so they are current, not up to one sync interval behind."""
        if not self._started:
            return
        # Callers may be on the daemon's event loop: wait for a running sync (it credits the
        # same counters) only briefly; on timeout the listing is at most one sync behind.
        if not self._sync_lock.acquire(timeout=REFRESH_WAIT):
            return
        try:
            if not self._started:
                return
            self._credit(server, lock, clock)
        except KernelPathError as e:
            self.stats.errors += 1
            log.warning("relay kernel path: reading counters failed: %s", e)
        finally:
            self._sync_lock.release()

    def _credit(self, server: RelayServer, lock: threading.Lock,
                clock: Callable[[], float]) -> None:
        if not self._flows:
            return
        counters = self.read_counters()
        with lock:
            now = clock()
            for f in self._flows:
                cur = counters.get(f.counter)
                if cur is not None:
                    lp, lb = self._last.get(f.counter, (0, 0))
                    dp, db = cur[0] - lp, cur[1] - lb
                    if dp > 0 or db > 0:
                        server.credit(f.session_id, f.side, dp, db, now)
                        self.stats.forwarded_packets += dp
                        self.stats.forwarded_bytes += db
                    self._last[f.counter] = cur
                dcur = counters.get(f.drop_counter)
                if dcur is not None:
                    ld = self._last.get(f.drop_counter, (0, 0))[0]
                    if dcur[0] > ld:
                        server.drops["rate_limited"] += dcur[0] - ld
                        self.stats.rate_limited += dcur[0] - ld
                    self._last[f.drop_counter] = dcur

    def _sync(self, server: RelayServer, lock: threading.Lock,
              clock: Callable[[], float]) -> None:
        self._credit(server, lock, clock)
        with lock:
            sessions = server.metrics(with_sessions=True).sessions
        flows = flows_for(sessions, self._relay_ip_for)
        self.stats.syncs += 1
        if flows == self._flows:
            return
        self._nft(ruleset(self.port, flows, self.limits, self._chains, self._objects))
        self._flows = flows
        self._chains = {f"s_{_ident(*f.src)}" for f in flows} | {
            f"n_{_ident(f.relay_ip)}" for f in flows}
        names = {n for f in flows for n in (f.counter, f.drop_counter)}
        self._objects = {("counter", n) for n in names} | {
            ("limit", f"{p}_{f.client}") for f in flows for p in ("lp", "lb")}
        self._last = {k: v for k, v in self._last.items() if k in names}
        self.stats.flows = len(flows)
