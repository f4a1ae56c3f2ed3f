"""Per-peer path selection (sans-IO): which path carries WireGuard packets to one peer.

Inputs are events with a ``now`` (seconds, any monotonic origin): outbound traffic, pongs, candidate
changes, and ``tick``. Outputs are decisions (:meth:`PeerPaths.route`) and actions (pings to send,
call-me-maybe, relay allocation). The disco layer sends what this module asks for; nothing here does
I/O or reads a clock.

Preference is direct > peer relay > DERP. Among trusted UDP paths of the same kind, lower effective
latency wins, with hysteresis; a relay's effective latency is its measured latency scaled up by its
reported load, so a busy relay loses to an idle one of similar latency.

A direct candidate also names the local socket it lives on (``Candidate.sock``: 0 for the node's
one socket, else a spray socket of the birthday-paradox spray, magicsock.spray): the same peer
address through two sockets is two NAT mappings, so two candidates. Map updates replace only the
main-socket direct candidates; spray-socket ones go when their socket closes (``remove_sock``).

State table (per peer; "best" is the chosen UDP path, if any)::

    state      | event                                   | next       | data goes to
    -----------+-----------------------------------------+------------+---------------------------
    DERP       | pong on a UDP candidate                 | UDP        | DERP
    UDP        | (trusted, last heartbeat answered)      | UDP        | best
    UDP        | heartbeat unanswered > PONG_SUSPECT_AFTER | SUSPECT  | best + DERP (mirrored);
               |                                         |            | every alternative probed
    SUSPECT    | pong on best                            | UDP        | best
    SUSPECT    | pong on another candidate               | UDP (new)  | new best
    SUSPECT    | unanswered for PATH_LOST_AFTER          | DERP       | DERP
    UDP        | pong on a clearly better candidate      | UDP (new)  | new best
    any        | best candidate removed                  | DERP       | DERP

(``state`` is derived from ``best`` and the timestamps: no separate state variable to drift.)
When no DERP home is known, DERP is not a destination and a suspect path keeps carrying the data.

Timers (named for their purpose; values chosen for the reasons given):

- ``HEARTBEAT_INTERVAL`` 1.5 s: ping the best path while the peer is active. The issue asks for
  failover to DERP within 3 s of a relay's death; heartbeat + suspect delay must stay below that.
  (The reference uses 3 s; one 100-byte ping per 1.5 s per active peer is cheap.)
- ``PONG_SUSPECT_AFTER`` 1.0 s: a heartbeat unanswered this long makes the path suspect and data is
  mirrored to DERP; 1 s is far above any sane tailnet RTT. WireGuard's replay window drops the
  duplicate copies, so mirroring costs bandwidth but never correctness.
- ``PATH_LOST_AFTER`` 5 s: a path whose pings have gone unanswered this long is dropped (about three
  missed heartbeats). Trust is lost by evidence (unanswered pings), not by silence: an idle path
  that nobody pinged stays trusted, and the first packet after idle re-probes it at once, so an idle
  peer's next packet still takes its UDP path (suspect, and mirrored to DERP, within 1 s if dead).
- ``DIRECT_REPROBE_INTERVAL`` 5 s: while not on a direct path and active, ping every direct
  candidate again (hole punching needs both sides to keep trying; call-me-maybe asks the peer to).
- ``RELAY_DISCOVERY_INTERVAL`` 30 s on DERP / ``RELAY_DISCOVERY_INTERVAL_ON_RELAY`` 60 s on a relay:
  how often to (re)allocate on candidate relays, as the reference does.
- ``SESSION_ACTIVE_TIMEOUT`` 45 s: heartbeats stop this long after the last data packet.
- Relay keepalive: a relay path in use is pinged at least every ``relay_idle_lifetime / 3`` even
  when the peer is idle, so the relay's idle timer never expires a path we still hold (the
  reference's open bug #20452 lets idle relay paths die after five minutes).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from relaymesh.paths import Path

HEARTBEAT_INTERVAL = 1.5  # keeps failover (heartbeat + suspect) under 3 s
PONG_SUSPECT_AFTER = 1.0  # >> any tailnet RTT; then mirror to DERP
PATH_LOST_AFTER = 5.0  # about three unanswered heartbeats: the path is gone
PING_TIMEOUT = 5.0  # forget an unanswered ping after this long (reference value)
DIRECT_REPROBE_INTERVAL = 5.0  # keep punching while not direct
RELAY_DISCOVERY_INTERVAL = 30.0  # reference: at most every 30 s on DERP
RELAY_DISCOVERY_INTERVAL_ON_RELAY = 60.0  # reference: every 60 s while on a relay
SESSION_ACTIVE_TIMEOUT = 45.0  # reference: heartbeats stop after 45 s idle
DEFAULT_RELAY_IDLE_LIFETIME = 300.0  # the relay's default idle lifetime (5 min)
BETTER_LATENCY_RATIO = 0.8  # switch within a kind only if 20% faster...
BETTER_LATENCY_MIN = 0.001  # ...and at least 1 ms faster (hysteresis against jitter)
TXID_LEN = 12  # disco ping transaction id length


class PathPolicy(enum.StrEnum):
    """Per-peer override for operations and tests (``relaymesh set --path-policy``)."""

    AUTO = "auto"
    NO_DIRECT = "no-direct"
    NO_RELAY = "no-relay"


@dataclass(frozen=True, slots=True)
class Candidate:
    """One way to reach the peer. ``addr`` is where UDP packets go (unused for DERP)."""

    kind: Path
    addr: tuple[str, int] | None = None
    relay: str = ""  # relay node name (or key short form) for peer_relay
    session: int = 0  # relay session id (VNI)
    region: int = 0  # DERP region id
    sock: int = 0  # which local UDP socket: 0 the node's one socket, else a spray socket id
    #   (birthday-paradox port spray, magicsock.spray): the NAT mapping lives on that socket

    def describe(self) -> str:
        if self.kind is Path.DIRECT and self.addr:
            spray = f" (spray socket {self.sock})" if self.sock else ""
            return f"direct {self.addr[0]}:{self.addr[1]}{spray}"
        if self.kind is Path.PEER_RELAY and self.addr:
            ip, port = self.addr
            return f"peer-relay {self.relay} ({ip}:{port}, session {self.session})"
        if self.kind is Path.DERP:
            return f"derp({self.region})"
        return str(self.kind)


@dataclass(slots=True)
class _PathState:
    cand: Candidate
    latency: float | None = None
    last_pong: float | None = None
    last_ping: float | None = None
    unanswered_since: float | None = None  # first ping sent after the last pong
    load: float = 0.0  # relay load 0..1 as reported by the relay
    idle_lifetime: float = DEFAULT_RELAY_IDLE_LIFETIME
    pings: dict[bytes, float] = field(default_factory=dict)  # txid -> sent at

    def trusted(self, now: float) -> bool:
        return self.last_pong is not None and (
            self.unanswered_since is None or now - self.unanswered_since < PATH_LOST_AFTER
        )

    def suspect(self, now: float) -> bool:
        since = self.unanswered_since
        return since is not None and now - since > PONG_SUSPECT_AFTER

    def effective_latency(self) -> float:
        lat = self.latency if self.latency is not None else 1.0
        return lat * (1.0 + self.load)



@dataclass(frozen=True, slots=True)
class SendPing:
    cand: Candidate
    txid: bytes


@dataclass(frozen=True, slots=True)
class SendCallMeMaybe:
    """Ask the peer (over DERP) to ping our direct endpoints: both sides punch at once."""


@dataclass(frozen=True, slots=True)
class AllocateRelays:
    """Time to allocate (or refresh) sessions on the candidate relays."""


Action = SendPing | SendCallMeMaybe | AllocateRelays


@dataclass(frozen=True, slots=True)
class PathReport:
    """One row of ``relaymesh debug path PEER``."""

    candidate: str
    kind: Path
    state: str  # "active", "trusted", "suspect", "probing", "untested", "unavailable"
    latency_ms: float | None
    reason: str


class PeerPaths:
    """Path selection for one peer. Create one per peer; feed it events; ask it where to send."""

    def __init__(
        self,
        *,
        random_bytes: Callable[[int], bytes],
        derp_region: int | None = None,
        policy: PathPolicy = PathPolicy.AUTO,
        relays_available: bool = False,
    ) -> None:
        self._rand = random_bytes
        self._paths: dict[Candidate, _PathState] = {}
        self._excluded: dict[str, str] = {}  # candidate description -> why it is not a candidate
        self.derp_region = derp_region
        self.policy = policy
        self.relays_available = relays_available
        self.best: Candidate | None = None
        self.last_send: float | None = None
        self._last_direct_probe: float | None = None
        self._last_relay_discovery: float | None = None
        self._last_heartbeat: float | None = None
        self._last_decision: str = "no traffic yet"

    # -- candidates ----------------------------------------------------------------------------

    def set_direct_candidates(self, addrs: Iterable[tuple[str, int]]) -> None:
        """Replace the direct endpoints (from the network map or call-me-maybe). Candidates on
        a spray socket are not the map's business: they stay until their socket closes."""
        keep = {Candidate(Path.DIRECT, addr=a) for a in addrs}
        keep |= {c for c in self._paths if c.kind is Path.DIRECT and c.sock}
        self._replace_kind(Path.DIRECT, keep)

    def add_direct_candidate(self, addr: tuple[str, int], sock: int = 0) -> Candidate:
        """Learn an endpoint from a ping's observed source (peer-reflexive candidate), on our
        socket ``sock`` (0: the main one)."""
        c = Candidate(Path.DIRECT, addr=addr, sock=sock)
        self._paths.setdefault(c, _PathState(c))
        return c

    def remove_sock(self, sock: int) -> None:
        """A spray socket closed: its candidates go with it."""
        for c in [c for c in self._paths if c.sock == sock]:
            self.remove_candidate(c)

    def has_trusted_direct(self, now: float) -> bool:
        """Whether the chosen path is a trusted direct one (then nobody needs to spray)."""
        st = self._paths.get(self.best) if self.best else None
        return st is not None and st.cand.kind is Path.DIRECT and st.trusted(now)

    def is_active(self, now: float) -> bool:
        """Data went to the peer within SESSION_ACTIVE_TIMEOUT."""
        return self.last_send is not None and now - self.last_send < SESSION_ACTIVE_TIMEOUT

    def set_relay_candidate(
        self,
        cand: Candidate,
        *,
        idle_lifetime: float = DEFAULT_RELAY_IDLE_LIFETIME,
        load: float = 0.0,
    ) -> None:
        """Add or refresh one bound peer-relay path (after allocate + bind succeeded)."""
        st = self._paths.get(cand)
        if st is None:
            st = self._paths[cand] = _PathState(cand)
        st.idle_lifetime = idle_lifetime
        st.load = max(0.0, min(1.0, load))

    def remove_candidate(self, cand: Candidate) -> None:
        self._paths.pop(cand, None)
        if self.best == cand:
            self.best = None
            self._last_decision = f"{cand.describe()} removed"

    def remove_relay(self, relay: str) -> None:
        for c in [c for c in self._paths if c.kind is Path.PEER_RELAY and c.relay == relay]:
            self.remove_candidate(c)

    def exclude(self, description: str, reason: str) -> None:
        """Record a candidate that was not usable (e.g. relay not authorized) for ``debug path``."""
        self._excluded[description] = reason

    def unexclude(self, description: str) -> None:
        """Forget an exclusion (the candidate became usable, e.g. a new policy grant)."""
        self._excluded.pop(description, None)

    def candidates(self) -> list[Candidate]:
        return list(self._paths)

    def is_trusted(self, cand: Candidate, now: float) -> bool:
        """Whether ``cand`` is known and answered its pings recently enough to carry data."""
        st = self._paths.get(cand)
        return st is not None and st.trusted(now)

    def probe(self, cand: Candidate, now: float) -> list[Action]:
        """Ping one known candidate now (a relay path that was just bound, or whose peer just
        pinged us through it); nothing if it is unknown or the policy forbids it."""
        st = self._paths.get(cand)
        if st is None or not self._allowed(cand):
            return []
        return [self._ping(st, now)]

    def _replace_kind(self, kind: Path, keep: set[Candidate]) -> None:
        for c in [c for c in self._paths if c.kind is kind and c not in keep]:
            self.remove_candidate(c)
        for c in keep:
            self._paths.setdefault(c, _PathState(c))

    def _allowed(self, c: Candidate) -> bool:
        if c.kind is Path.DIRECT:
            return self.policy is not PathPolicy.NO_DIRECT
        if c.kind is Path.PEER_RELAY:
            return self.policy is not PathPolicy.NO_RELAY
        return True

    # -- events --------------------------------------------------------------------------------

    def on_send(self, now: float) -> list[Action]:
        """Outbound data: on first traffic (or after idle) probe everything at once."""
        was_idle = self.last_send is None or now - self.last_send > SESSION_ACTIVE_TIMEOUT
        self.last_send = now
        if was_idle:
            return self._probe_all(now)
        return []

    def on_pong(self, txid: bytes, now: float) -> bool:
        """A pong arrived. Returns False if it answers no ping we sent (dropped by the caller)."""
        for st in self._paths.values():
            sent = st.pings.pop(txid, None)
            if sent is not None:
                st.latency = max(0.0, now - sent)
                st.last_pong = now
                st.unanswered_since = None
                self._reconsider(now)
                return True
        return False

    def on_ping_received(self, cand: Candidate, now: float) -> None:
        """The peer pinged us on ``cand``: remember it (peer-reflexive) so we ping it back."""
        if cand.kind is Path.DIRECT and cand.addr is not None:
            self.add_direct_candidate(cand.addr, cand.sock)

    def set_policy(self, policy: PathPolicy, now: float) -> list[Action]:
        """Change the path policy; a best path it now forbids is dropped at once, and every
        candidate is probed again so a newly allowed path is found without waiting for the
        periodic re-probe."""
        if policy is self.policy:
            return []
        self.policy = policy
        if self.best is not None and not self._allowed(self.best):
            self._last_decision = f"{self.best.describe()} not allowed by path policy {policy}"
            self.best = None
            self._reconsider(now)
        return self.reprobe_now(now) if self.last_send is not None else []

    def reprobe_now(self, now: float) -> list[Action]:
        """Probe every candidate at once: the peer's endpoints changed, it pinged us, or it sent
        call-me-maybe. The peer counts as active from now (it is looking for us), so the usual
        re-probing follows if this round finds nothing. Path state (a chosen best, latencies)
        is kept: a pong still has to beat the current path by the usual rules."""
        if self.last_send is None or now - self.last_send > SESSION_ACTIVE_TIMEOUT:
            self.last_send = now
        return self._probe_all(now)

    def tick(self, now: float) -> list[Action]:
        """Timers: heartbeats, suspicion and drop, re-probing, relay discovery and keepalive."""
        actions: list[Action] = []
        for st in self._paths.values():
            for txid, sent in list(st.pings.items()):
                if now - sent > PING_TIMEOUT:
                    del st.pings[txid]
        best = self._paths.get(self.best) if self.best else None
        if best is not None and not best.trusted(now):
            self._last_decision = f"{best.cand.describe()} dropped: no pong for {PATH_LOST_AFTER} s"
            self.best = None
            best = None
            self._reconsider(now)
            best = self._paths.get(self.best) if self.best else None
        active = self.last_send is not None and now - self.last_send < SESSION_ACTIVE_TIMEOUT
        if best is not None:
            heartbeat_due = self._last_heartbeat is None or (
                now - self._last_heartbeat >= HEARTBEAT_INTERVAL
            )
            keepalive_due = best.cand.kind is Path.PEER_RELAY and (
                best.last_ping is None or now - best.last_ping >= best.idle_lifetime / 3
            )
            if (active and heartbeat_due) or keepalive_due:
                actions.append(self._ping(best, now))
                self._last_heartbeat = now
            if best.suspect(now):
                # the best path may be dying: probe every alternative now, not at the next reprobe
                actions.extend(
                    self._ping(st, now)
                    for st in self._paths.values()
                    if st is not best
                    and self._allowed(st.cand)
                    and (st.last_ping is None or now - st.last_ping >= HEARTBEAT_INTERVAL)
                )
        if not active:
            return actions
        on_direct = best is not None and best.cand.kind is Path.DIRECT
        if not on_direct and (
            self._last_direct_probe is None
            or now - self._last_direct_probe >= DIRECT_REPROBE_INTERVAL
        ):
            actions.extend(self._probe_direct(now))
        if not on_direct and self.relays_available and self.policy is not PathPolicy.NO_RELAY:
            interval = (
                RELAY_DISCOVERY_INTERVAL_ON_RELAY
                if best is not None and best.cand.kind is Path.PEER_RELAY
                else RELAY_DISCOVERY_INTERVAL
            )
            if self._last_relay_discovery is None or now - self._last_relay_discovery >= interval:
                self._last_relay_discovery = now
                actions.append(AllocateRelays())
            for st in self._paths.values():
                if st.cand.kind is Path.PEER_RELAY and st is not best and (
                    st.last_ping is None or now - st.last_ping >= DIRECT_REPROBE_INTERVAL
                ):
                    actions.append(self._ping(st, now))
        return actions

    def next_deadline(self) -> float | None:
        """Earliest time ``tick`` may have something to do (a cheap upper bound is fine)."""
        if self.best is None and self.last_send is None:
            return None
        return min(
            x
            for x in (
                (self._last_heartbeat or 0.0) + HEARTBEAT_INTERVAL,
                (self._last_direct_probe or 0.0) + DIRECT_REPROBE_INTERVAL,
            )
        )

    # -- decisions -----------------------------------------------------------------------------

    def route(self, now: float) -> list[Candidate]:
        """Where data goes now: one path, two while the best is suspect (mirrored), or none."""
        derp = [Candidate(Path.DERP, region=self.derp_region)] if self.derp_region else []
        st = self._paths.get(self.best) if self.best else None
        if st is None or not st.trusted(now):
            return derp
        if st.suspect(now) and derp:
            return [st.cand, *derp]
        return [st.cand]

    def current_path(self, now: float) -> Path:
        r = self.route(now)
        return r[0].kind if r else Path.NONE

    def _reconsider(self, now: float) -> None:
        usable = [
            st for st in self._paths.values() if st.trusted(now) and self._allowed(st.cand)
        ]
        if not usable:
            return
        # a path that answers beats one that has gone quiet, whatever its kind
        challenger = min(
            usable, key=lambda s: (s.suspect(now), s.cand.kind.rank, s.effective_latency())
        )
        cur = self._paths.get(self.best) if self.best else None
        if cur is None or not cur.trusted(now) or not self._allowed(cur.cand):
            self._switch(challenger, "first working path" if cur is None else "replaces lost path")
            return
        if challenger is cur:
            return
        if cur.suspect(now):
            self._switch(challenger, f"answers while {cur.cand.describe()} is suspect")
            return
        if challenger.cand.kind.rank < cur.cand.kind.rank:
            self._switch(challenger, f"{challenger.cand.kind} beats {cur.cand.kind}")
            return
        if challenger.cand.kind is cur.cand.kind:
            new, old = challenger.effective_latency(), cur.effective_latency()
            if new < old * BETTER_LATENCY_RATIO and old - new >= BETTER_LATENCY_MIN:
                self._switch(challenger, f"{new * 1e3:.1f} ms beats {old * 1e3:.1f} ms")

    def _switch(self, st: _PathState, why: str) -> None:
        self.best = st.cand
        self._last_decision = f"chose {st.cand.describe()}: {why}"

    # -- probing -------------------------------------------------------------------------------

    def _ping(self, st: _PathState, now: float) -> SendPing:
        txid = self._rand(TXID_LEN)
        st.pings[txid] = now
        st.last_ping = now
        if st.unanswered_since is None:
            st.unanswered_since = now
        return SendPing(st.cand, txid)

    def _probe_direct(self, now: float) -> list[Action]:
        self._last_direct_probe = now
        if self.policy is PathPolicy.NO_DIRECT:
            return []
        pings: list[Action] = [
            self._ping(st, now) for st in self._paths.values() if st.cand.kind is Path.DIRECT
        ]
        return [*pings, SendCallMeMaybe()]

    def _probe_all(self, now: float) -> list[Action]:
        actions = self._probe_direct(now)
        if self.relays_available and self.policy is not PathPolicy.NO_RELAY:
            self._last_relay_discovery = now
            actions.append(AllocateRelays())
        actions.extend(
            self._ping(st, now) for st in self._paths.values() if st.cand.kind is Path.PEER_RELAY
        )
        return actions

    # -- introspection ---------------------------------------------------------------------------

    def report(self, now: float) -> list[PathReport]:
        """Every candidate with its state and why it is or is not used (``debug path``)."""
        rows: list[PathReport] = []
        route = self.route(now)
        for st in self._paths.values():
            c = st.cand
            lat = st.latency * 1e3 if st.latency is not None else None
            if not self._allowed(c):
                state, reason = "unavailable", f"path policy {self.policy}"
            elif c in route:
                state = "suspect" if len(route) > 1 else "active"
                reason = self._last_decision
            elif st.trusted(now):
                state = "trusted"
                reason = "works, but the active path is preferred"
            elif st.pings:
                state, reason = "probing", "ping sent, no pong yet"
            elif st.last_pong is not None:
                state, reason = "lost", f"pings unanswered for {PATH_LOST_AFTER} s"
            else:
                state, reason = "untested", "not probed yet"
            if c.kind is Path.PEER_RELAY:  # relays rank by latency * (1 + load)
                reason += f"; relay load {st.load:.0%}"
            rows.append(PathReport(c.describe(), c.kind, state, lat, reason))
        for desc, reason in self._excluded.items():
            rows.append(PathReport(desc, Path.PEER_RELAY, "unavailable", None, reason))
        if self.derp_region:
            derp = Candidate(Path.DERP, region=self.derp_region)
            in_use = derp in route
            rows.append(
                PathReport(
                    derp.describe(),
                    Path.DERP,
                    "active" if in_use else "standby",
                    None,
                    ("no trusted UDP path" if len(route) == 1 else "mirroring a suspect path")
                    if in_use
                    else "fallback: a UDP path is preferred",
                )
            )
        return rows
