"""Birthday-paradox port spray (sans-IO): direct paths between a hard NAT and an EIM peer.

Why: a ``hard`` NAT (endpoint-dependent mapping, e.g. ``masquerade fully-random``) gives every
destination a new random public port, and the peer's NAT filters by address AND port, so the
ordinary punch (both sides ping each other's STUN-learned endpoint) never meets: the hard side's
pings come from a port the peer never sent to, and the peer's pings go to a port that maps only
to the STUN server. Tailscale's "How NAT traversal works" describes the fix used here:

- The HARD side (its own netcheck: mapping varies by destination) opens ``SPRAY_SOCKETS`` (N=256)
  extra UDP sockets and pings the peer's public endpoints (:func:`is_public_endpoint`) from
  each. Each ping creates a mapping ``H:q_i`` on the hard NAT that accepts inbound from exactly
  the peer's endpoint. It then sends a sealed spray-request over DERP (its public ip, N, a
  generation).
- The EIM side (its own netcheck: mapping does NOT vary: easy, firewall, none, one2one) pings
  ``SPRAY_PROBES`` (M=2048) distinct random ports of that ip in ``PORT_RANGE`` (1024-65535, the
  range ``fully-random`` picks from), paced: ``PROBE_BURST`` at once, the rest spread over
  ``PROBE_SPAN``. Each probe also opens the EIM side's own filter for that ``H:port``.
- P(at least one probe lands on one of the N mappings) = 1 - (1 - N/R)^M ~ 1 - exp(-N*M/R) with
  R = 64512 ports: 1 - exp(-8.13) ~ 99.97 %.
- The first probe that lands arrives on spray socket i; that socket is the winner (later hits on
  other sockets are dropped, so both sides settle on ONE port pair), the hard side answers from
  socket i and uses it for disco and WireGuard to that peer from then on. The EIM side sees the
  pong from ``H:q_i`` and uses it like any direct endpoint.

Bounds (all per node, in :class:`SprayConfig`):

- one spray per peer per ``SPRAY_INTERVAL`` (30 s: the DIRECT_REPROBE cadence of a pair that
  stays on DERP would otherwise spray 256 sockets every 5 s); after ``MAX_FAILURES`` sprays in a
  row without a hit (a peer whose NAT is not what netcheck said), ``FAILURE_BACKOFF`` (5 min);
- a spray starts only ``SPRAY_DELAY`` (1.5 s) after the peer became active without a trusted
  direct path: the ordinary punch gets its chance first (none/hard and one2one/hard go direct
  that way within a round trip);
- at most ``MAX_OPEN_SOCKETS`` (512, two sprays) spray sockets open at once (file descriptors);
- losing sockets close ``SPRAY_WINDOW`` (5 s) after the spray started; the winner stays while
  the path on it is the chosen one and closes when it is not (path lost or replaced);
- the EIM side answers at most one spray-request per peer per ``PROBE_INTERVAL`` (10 s), only
  for an ip that is one of the peer's known endpoint addresses (never an arbitrary target), and
  never while its own netcheck says hard or unknown. A hard/hard pair therefore never probes,
  and a node that receives a spray-request learns its sender is hard: it does not spray that
  peer itself (both hard sides would only waste sockets). udp-blocked nodes have no netcheck
  mapping result (no STUN answer), so they neither spray nor probe.
- Spraying while on a peer relay is allowed: direct beats a relay, and the relay path keeps
  carrying data meanwhile.

The module keeps the state and timers; :class:`relaymesh.node.disco.DiscoManager` seals and
sends, and the shells (daemon, twin) open and close the sockets it names by id.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

SPRAY_SOCKETS = 256  # N: sockets the hard side opens (Tailscale's article uses 256)
SPRAY_PROBES = 2048  # M: ports the EIM side probes; N*M/R ~ 8.1 expected hits, P(miss) ~ 3e-4
PORT_RANGE = (1024, 65535)  # what `masquerade fully-random` picks from (nf_nat: 1024..65535)
PROBE_BURST = 256  # probes sent at once; the rest is paced
PROBE_SPAN = 1.0  # s: all M probes go out within about this long (a bounded burst, not a flood)
MAX_PROBES_PER_CALL = 512  # one tick never sends more than this, however late it runs
SPRAY_WINDOW = 5.0  # s: spray sockets wait this long for a hit (DERP RTT + PROBE_SPAN + slack)
SPRAY_INTERVAL = 30.0  # s: at most one spray per peer this often
SPRAY_DELAY = 1.5  # s: without a direct path this long while active before spraying
MAX_FAILURES = 3  # sprays in a row without a hit before backing off
FAILURE_BACKOFF = 300.0  # s: then spray that peer only this often
MAX_OPEN_SOCKETS = 512  # global cap on spray sockets (two sprays at once)
MAX_TARGETS = 4  # peer endpoints each spray socket pings (the map has a handful)
PROBE_INTERVAL = 10.0  # s: the EIM side answers one spray-request per peer this often
MAX_PROBE_ROUNDS = 4  # concurrent probe rounds (peers) kept; more are refused (counted)
# Addresses behind some NAT (RFC 1918, CGNAT/tailnet, ULA) or on-link: the hard side's mappings
# must accept the peer's PUBLIC endpoint, so spraying toward these cannot help. A peer with no
# other endpoint (e.g. udp-blocked: no STUN mapping to report) is not sprayed at all.
NOT_PUBLIC = tuple(ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "127.0.0.0/8",
    "169.254.0.0/16", "0.0.0.0/8", "fc00::/7", "fe80::/10", "::1/128", "::/128"))


def is_public_endpoint(ip: str) -> bool:
    """Whether a peer endpoint address can be the public side of its NAT (a spray target)."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return not any(addr in n for n in NOT_PUBLIC if n.version == addr.version)


class Role(enum.Enum):
    """What this node's NAT lets it do in a spray (from its own netcheck)."""

    HARD = "hard"  # mapping varies by destination: opens spray sockets
    EIM = "eim"  # endpoint-independent mapping: probes random ports
    UNKNOWN = "unknown"  # no UDP, or fewer than two STUN answers: neither


def role_for(udp: bool, mapping_varies: bool | None) -> Role:
    """The spray role for a netcheck result."""
    if not udp or mapping_varies is None:
        return Role.UNKNOWN
    return Role.HARD if mapping_varies else Role.EIM


@dataclass(frozen=True, slots=True)
class SprayConfig:
    sockets: int = SPRAY_SOCKETS
    probes: int = SPRAY_PROBES
    port_range: tuple[int, int] = PORT_RANGE
    probe_burst: int = PROBE_BURST
    probe_span: float = PROBE_SPAN
    max_probes_per_call: int = MAX_PROBES_PER_CALL
    window: float = SPRAY_WINDOW
    interval: float = SPRAY_INTERVAL
    delay: float = SPRAY_DELAY
    max_failures: int = MAX_FAILURES
    failure_backoff: float = FAILURE_BACKOFF
    max_open_sockets: int = MAX_OPEN_SOCKETS
    max_targets: int = MAX_TARGETS
    probe_interval: float = PROBE_INTERVAL
    max_probe_rounds: int = MAX_PROBE_ROUNDS


@dataclass(frozen=True, slots=True)
class SprayStart:
    """Open these socket ids now, ping the peer from each, and send the spray-request."""

    peer_id: int
    generation: int
    socks: tuple[int, ...]


@dataclass
class _Spray:
    generation: int
    started: float
    socks: list[int]
    winner: int | None = None
    window_closed: bool = False


@dataclass
class _Round:
    """The EIM side's probe round for one peer."""

    ip: str
    ports: list[int]
    started: float
    sent: int = 0


@dataclass
class _PeerSpray:
    no_direct_since: float | None = None
    last_spray: float = float("-inf")
    failures: int = 0
    peer_is_hard: bool = False  # it sent us a spray-request: never spray it ourselves
    last_probe_round: float = float("-inf")


@dataclass
class Sprayer:
    """Spray state for one node (both roles); ``now`` in, decisions out."""

    random_bytes: Callable[[int], bytes]
    config: SprayConfig = field(default_factory=SprayConfig)
    role: Role = Role.UNKNOWN
    public_ip: str = ""  # our STUN-mapped IPv4 address (what the EIM peer probes)

    def __post_init__(self) -> None:
        self._peers: dict[int, _PeerSpray] = {}
        self._sprays: dict[int, _Spray] = {}  # peer id -> the spray in progress or its winner
        self._sock_owner: dict[int, int] = {}  # open spray socket id -> peer id
        self._rounds: dict[int, _Round] = {}  # peer id -> probe round in progress
        self._next_sock = 0
        self._gen = 0
        self._to_close: list[int] = []
        self.counters: dict[str, int] = {}

    def _count(self, key: str, n: int = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + n

    # -- hard side ------------------------------------------------------------------------------

    @property
    def open_sockets(self) -> int:
        return len(self._sock_owner)

    def socks_of(self, peer_id: int) -> list[int]:
        sp = self._sprays.get(peer_id)
        return list(sp.socks) if sp is not None else []

    def owner(self, sock: int) -> int | None:
        return self._sock_owner.get(sock)

    def mark_peer_hard(self, peer_id: int) -> None:
        self._peers.setdefault(peer_id, _PeerSpray()).peer_is_hard = True

    def consider(self, peer_id: int, now: float, *, last_send: float | None, active: bool,
                 direct: bool, can_spray: bool) -> SprayStart | None:
        """Called on every tick per peer. ``last_send``: when tunnel data (not handshakes or
        keepalives: every peer of a fresh map gets those) last went to the peer; ``active``:
        that was recent; ``direct``: a trusted direct path is chosen; ``can_spray``: the peer
        has targets and a DERP home and the path policy allows direct. Returns a spray to
        start, or None. The delay counts from the first tick with recent data and no direct
        path."""
        ps = self._peers.setdefault(peer_id, _PeerSpray())
        if direct or not active or last_send is None:
            ps.no_direct_since = None
            return None
        if ps.no_direct_since is None:
            ps.no_direct_since = now
        if self.role is not Role.HARD or not can_spray or not self.public_ip:
            return None
        if ps.peer_is_hard or peer_id in self._sprays:
            return None
        if now - ps.no_direct_since < self.config.delay:
            return None
        wait = (self.config.failure_backoff if ps.failures >= self.config.max_failures
                else self.config.interval)
        if now - ps.last_spray < wait:
            return None
        n = self.config.sockets
        if self.open_sockets + n > self.config.max_open_sockets:
            self._count("spray_cap")
            return None
        ps.last_spray = now
        self._gen += 1
        socks = []
        for _ in range(n):
            self._next_sock += 1
            socks.append(self._next_sock)
            self._sock_owner[self._next_sock] = peer_id
        self._sprays[peer_id] = _Spray(self._gen, now, socks)
        self._count("sprays")
        self._count("sockets_opened", n)
        return SprayStart(peer_id, self._gen, tuple(socks))

    def claim(self, sock: int, peer_id: int) -> bool:
        """An authentic disco packet from ``peer_id`` arrived on spray socket ``sock``: the
        first one makes it the winner; False (drop it) for any other socket or peer."""
        if self._sock_owner.get(sock) != peer_id:
            self._count("wrong_peer_on_spray_socket")
            return False
        sp = self._sprays[peer_id]
        if sp.winner is None:
            sp.winner = sock
            self._peers.setdefault(peer_id, _PeerSpray()).failures = 0
            self._count("hits")
            return True
        if sp.winner != sock:
            self._count("late_hits")
            return False
        return True

    def winner(self, peer_id: int) -> int | None:
        sp = self._sprays.get(peer_id)
        return sp.winner if sp is not None else None

    def tick(self, now: float, in_use: Callable[[int, int], bool]) -> list[int]:
        """Close losing sockets after the window, and a winner whose path is no longer the
        chosen one (``in_use(peer_id, sock)``). Returns socket ids to close."""
        for pid, sp in list(self._sprays.items()):
            if not sp.window_closed:
                if now - sp.started < self.config.window:
                    continue
                sp.window_closed = True
                if sp.winner is None:
                    self._peers.setdefault(pid, _PeerSpray()).failures += 1
                    self._count("misses")
                losers = [s for s in sp.socks if s != sp.winner]
                self._close(pid, losers)
            if sp.winner is not None and not in_use(pid, sp.winner):
                self._count("winner_closed")
                self._close(pid, [sp.winner])
        return self.take_closed()

    def _close(self, pid: int, socks: Iterable[int]) -> None:
        sp = self._sprays.get(pid)
        for s in socks:
            if self._sock_owner.pop(s, None) is not None:
                self._to_close.append(s)
            if sp is not None and s in sp.socks:
                sp.socks.remove(s)
        if sp is not None and not sp.socks:
            del self._sprays[pid]

    def take_closed(self) -> list[int]:
        out, self._to_close = self._to_close, []
        return out

    def forget_peer(self, peer_id: int) -> None:
        """The peer left the map: close its sockets, drop its state."""
        sp = self._sprays.get(peer_id)
        if sp is not None:
            self._close(peer_id, list(sp.socks))
        self._peers.pop(peer_id, None)
        self._rounds.pop(peer_id, None)

    def close_all(self) -> list[int]:
        for pid in list(self._sprays):
            self._close(pid, list(self._sprays[pid].socks))
        return self.take_closed()

    # -- EIM side -------------------------------------------------------------------------------

    def accept_request(self, peer_id: int, ip: str, now: float, *, ip_known: bool,
                       direct_allowed: bool) -> str | None:
        """A spray-request from a peer: start a probe round, or the reason not to (counted)."""
        ps = self._peers.setdefault(peer_id, _PeerSpray())
        ps.peer_is_hard = True
        why: str | None = None
        if self.role is not Role.EIM:
            why = "request_not_eim"  # hard/hard (or unknown): probing cannot help
        elif not ip_known:
            why = "request_unknown_ip"  # only addresses the peer reported are probed
        elif not direct_allowed:
            why = "request_policy"
        elif now - ps.last_probe_round < self.config.probe_interval:
            why = "request_rate_limited"
        elif peer_id not in self._rounds and len(self._rounds) >= self.config.max_probe_rounds:
            why = "request_round_cap"
        if why is not None:
            self._count(why)
            return why
        ps.last_probe_round = now
        self._rounds[peer_id] = _Round(ip, self.probe_ports(), now)
        self._count("probe_rounds")
        return None

    def probe_ports(self) -> list[int]:
        """M distinct random ports in the port range (rejection sampling on 16-bit draws)."""
        lo, hi = self.config.port_range
        want = min(self.config.probes, hi - lo + 1)
        seen: set[int] = set()
        out: list[int] = []
        while len(out) < want:
            raw = self.random_bytes(2 * (want - len(out)) + 16)
            for i in range(0, len(raw) - 1, 2):
                p = int.from_bytes(raw[i:i + 2], "big")
                if lo <= p <= hi and p not in seen:
                    seen.add(p)
                    out.append(p)
                    if len(out) == want:
                        break
        return out

    def round_of(self, peer_id: int) -> _Round | None:
        return self._rounds.get(peer_id)

    def due_probes(self, now: float) -> list[tuple[int, str, list[int]]]:
        """Probes due now: (peer id, ip, ports). ``PROBE_BURST`` at once, then paced so all M
        leave within ``PROBE_SPAN``; never more than ``MAX_PROBES_PER_CALL`` per call."""
        out: list[tuple[int, str, list[int]]] = []
        cfg = self.config
        budget = cfg.max_probes_per_call
        for pid, r in list(self._rounds.items()):
            total = len(r.ports)
            elapsed = max(0.0, now - r.started)
            rest = total - cfg.probe_burst
            allowed = total if cfg.probe_span <= 0 else min(
                total, cfg.probe_burst + int(rest * elapsed / cfg.probe_span))
            n = max(0, min(allowed - r.sent, budget))
            if n:
                out.append((pid, r.ip, r.ports[r.sent:r.sent + n]))
                r.sent += n
                budget -= n
                self._count("probes_sent", n)
            if r.sent >= total:
                del self._rounds[pid]
            if budget <= 0:
                break
        return out

    def stop_round(self, peer_id: int) -> None:
        """A probe hit (its pong came back): the rest of the round is not needed."""
        if self._rounds.pop(peer_id, None) is not None:
            self._count("rounds_stopped_early")

    def next_deadline(self) -> float | None:
        ds = [sp.started + self.config.window for sp in self._sprays.values()
              if not sp.window_closed]
        cfg = self.config
        rest = max(1, cfg.probes - cfg.probe_burst)
        for r in self._rounds.values():  # when the next paced probe becomes due
            ds.append(r.started + cfg.probe_span * max(0, r.sent + 1 - cfg.probe_burst) / rest)
        return min(ds) if ds else None
