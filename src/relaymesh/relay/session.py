"""Sans-IO peer relay server: session table, stateless bind handshake, forwarding, limits.

The UDP shell owns the socket and the clock; this module only takes bytes, addresses and ``now``
(seconds, any monotonic origin) and returns what to send. It never decrypts data packets.

Lifecycle of a session (see docs/protocol-disco-derp-relay.md):

1. **Allocate** (disco over DERP): ``handle_allocate`` (or ``handle_allocate_packet`` for the sealed
   form) creates a session for an unordered pair of client disco keys, or returns the existing one.
   The caller decides whether policy allows it (``allowed``); refusals are counted drops.
2. **Bind** (UDP, relay header with the control bit, sealed disco inside), per client::

       client -> relay   Bind(session id, generation, other client's key)
       relay  -> client  Challenge(session id, generation, MAC)
       client -> relay   Answer(session id, generation, other client's key, MAC)

   MAC = BLAKE2s-256 keyed by a relay secret over
   ``session id (4) | generation (4) | sender disco key (32) | other disco key (32) | source (18)``
   (source = the observed ip:port, as the disco address encoding). The secret rotates every
   ``secret_rotation`` seconds and the previous one is still accepted, so the relay keeps no state
   per handshake and a MAC lives between one and two rotation periods. The challenge is sealed to
   the sender's disco key, so only that key's holder can answer; the MAC binds the answer to the
   address the challenge was sent to. A valid answer binds the sender's side to its observed source;
   a later answer with an equal or newer generation re-binds it (NAT rebinding), an older one is a
   counted drop.
3. **Forward**: once both sides are bound, a data packet (control bit clear) whose (session id,
   source) matches a bound side goes unmodified to the other side's bound address. Anything else is
   a counted drop.
4. **Expire**: a session not bound on both sides dies ``bind_lifetime`` after (re-)allocation; a
   bound one dies when either side has been silent for ``idle_lifetime``.

Per-client (disco key) token buckets limit packets and bytes per second across all of that client's
sessions; the table has a global and a per-client session cap. Every drop is counted by reason.

Load (for clients ranking relays by latency * (1 + load)): :meth:`RelayServer.load` is a figure in
0..1, the larger of the forwarding rate over a configured capacity (``capacity_pps``) and the
session table's occupancy (sessions over ``max_sessions``). The rate is an exponentially weighted
average (time constant ``LOAD_TAU``) of forwarded packets per second, including what the kernel
path forwarded (credited), sampled by :meth:`RelayServer.sample_load` from the shell's once-a-second
timer; reading it is O(1). Packets rather than bytes because a relay's cost is per packet (one
receive and one send whatever the size; docs/peer-relays.md, figures).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import math
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from ipaddress import ip_address

from relaymesh.disco import codec as disco
from relaymesh.keys import DiscoKey, PrivateKey
from relaymesh.relay.header import (
    CONTROL_BIT,
    HEADER_LEN,
    MAX_SESSION_ID,
    PROTO_DISCO,
    HeaderError,
    decode_header,
    encode_header,
)

Addr = tuple[str, int]  # (host, port) as the UDP shell normalises socket addresses
Rng = Callable[[int], bytes]

SECRET_LEN = 32  # BLAKE2s key size
BIND_LIFETIME = 30.0  # reference design: an unbound session dies 30 s after allocation
IDLE_LIFETIME = 300.0  # reference design: a bound session dies after 5 min of silence
SECRET_ROTATION = 120.0  # reference design: the challenge secret rotates every 2 minutes
# Forwarded pkt/s that count as full load, on this project's 2-vCPU reference machine: between
# what the userspace loop forwards for plain senders (~125k) and for GSO senders (~1M, one
# decision per GRO run); conservative, a relay does not know its senders' mix
# (docs/peer-relays.md, figures).
CAPACITY_PPS = 200_000.0
LOAD_TAU = 10.0  # s: time constant of the forwarding-rate average behind load()


class Drop(enum.StrEnum):
    """Why a packet or request was dropped; the metric label."""

    SHORT = "short"
    BAD_HEADER = "bad_header"
    BAD_PROTOCOL = "bad_protocol"
    BAD_DISCO = "bad_disco"
    UNEXPECTED_MESSAGE = "unexpected_message"
    UNKNOWN_SESSION = "unknown_session"
    UNBOUND_SOURCE = "unbound_source"
    NOT_BOUND = "not_bound"
    EXPIRED = "expired"
    NOT_PARTY = "not_party"
    SESSION_MISMATCH = "session_mismatch"
    WRONG_OTHER = "wrong_other"
    BAD_MAC = "bad_mac"
    STALE_GENERATION = "stale_generation"
    ADDRESS_CONFLICT = "address_conflict"
    BAD_SOURCE = "bad_source"
    RATE_LIMITED = "rate_limited"
    NOT_ALLOWED = "not_allowed"
    BAD_ALLOCATE = "bad_allocate"
    SESSION_CAP = "session_cap"
    CLIENT_SESSION_CAP = "client_session_cap"
    NO_CANDIDATES = "no_candidates"


class State(enum.StrEnum):
    ALLOCATED = "allocated"  # no side bound
    HALF_BOUND = "half_bound"  # one side bound
    BOUND = "bound"  # both sides bound: forwarding


@dataclass(frozen=True, slots=True)
class RelayLimits:
    """Lifetimes and abuse limits; the defaults follow the reference design where it has one."""

    bind_lifetime: float = BIND_LIFETIME
    idle_lifetime: float = IDLE_LIFETIME
    secret_rotation: float = SECRET_ROTATION
    max_sessions: int = 10_000
    max_sessions_per_client: int = 256
    # Per client disco key, all its sessions together. Fairness between clients, not a speed cap:
    # one client's tunnel moves ~0.85 Gbit/s (~75k pkt/s) direct on the 2-vCPU reference machine,
    # and the first defaults (50k pkt/s, 400 Mbit/s) throttled a single iperf3 flow through the
    # relay to 0.44 of direct (bench/paths.py, 2026-11-24). Lower them on a shared relay.
    packets_per_second: float = 200_000.0
    packet_burst: float = 20_000.0  # 0.1 s at the rate
    bytes_per_second: float = 250_000_000.0  # 2 Gbit/s
    byte_burst: float = 25_000_000.0  # 0.1 s at the rate
    capacity_pps: float = CAPACITY_PPS  # forwarded pkt/s at which load() reads 1.0


class _Bucket:
    """Token buckets for one client: packets and bytes, refilled from ``now``."""

    __slots__ = ("byte_tokens", "last", "pkt_tokens", "refs")

    def __init__(self, limits: RelayLimits, now: float) -> None:
        self.pkt_tokens = limits.packet_burst
        self.byte_tokens = limits.byte_burst
        self.last = now
        self.refs = 0  # sessions using this bucket


class _Side:
    """One client of a session: its binding and what it sent through the relay."""

    __slots__ = ("addr", "bucket", "bytes", "generation", "key", "last_seen", "packets")

    def __init__(self, key: DiscoKey, bucket: _Bucket) -> None:
        self.key = key
        self.bucket = bucket
        self.addr: Addr | None = None
        self.generation = 0
        self.last_seen = 0.0
        self.packets = 0  # forwarded from this side to the other
        self.bytes = 0


class _Session:
    __slots__ = ("allocated_at", "allocation_id", "route_keys", "session_id", "sides")

    def __init__(
        self, session_id: int, allocation_id: int, sides: tuple[_Side, _Side], now: float
    ) -> None:
        self.session_id = session_id
        self.allocation_id = allocation_id
        self.sides = sides
        self.allocated_at = now
        self.route_keys: list[tuple[int, Addr]] = []

    @property
    def state(self) -> State:
        n = sum(s.addr is not None for s in self.sides)
        return (State.ALLOCATED, State.HALF_BOUND, State.BOUND)[n]

    def side_of(self, key: DiscoKey) -> tuple[_Side, _Side] | None:
        a, b = self.sides
        if key == a.key:
            return a, b
        if key == b.key:
            return b, a
        return None

    def expired(self, now: float, limits: RelayLimits) -> bool:
        a, b = self.sides
        if a.addr is None or b.addr is None:
            return now - self.allocated_at > limits.bind_lifetime
        return now - min(a.last_seen, b.last_seen) > limits.idle_lifetime


class _Route:
    """Hot-path entry for (session id, source): where to send and what to charge."""

    __slots__ = ("dest", "dst_side", "session", "src_side")

    def __init__(self, dest: Addr, session: _Session, src_side: _Side, dst_side: _Side) -> None:
        self.dest = dest
        self.session = session
        self.src_side = src_side
        self.dst_side = dst_side


@dataclass(frozen=True, slots=True)
class BoundRoute:
    """One direction of a bound session, for a fast path that forwards outside the core."""

    session_id: int
    side: int  # index of the sending client (SessionStats.clients; RelayServer.credit)
    src: Addr  # the sender's bound address
    dst: Addr  # the other side's bound address
    client: DiscoKey  # the sender: whose rate limits apply


@dataclass(frozen=True, slots=True)
class SessionStats:
    """A session as metrics and `debug` see it; direction 0 = client 0 -> client 1."""

    session_id: int
    allocation_id: int
    clients: tuple[DiscoKey, DiscoKey]
    state: State
    addrs: tuple[Addr | None, Addr | None]
    packets: tuple[int, int]
    bytes: tuple[int, int]


@dataclass(frozen=True, slots=True)
class RelayMetrics:
    sessions_by_state: dict[str, int]
    drops: dict[str, int]
    forwarded_packets: int  # including sessions that have since expired
    forwarded_bytes: int
    sessions: list[SessionStats] = field(default_factory=list)


def _encode_source(addr: Addr) -> bytes:
    return disco.encode_addr((ip_address(addr[0]), addr[1]))


class RelayServer:
    """The peer relay's session table and protocol logic; see the module docstring."""

    def __init__(
        self,
        private: PrivateKey,
        now: float,
        rng: Rng = os.urandom,
        limits: RelayLimits | None = None,
        candidates: Sequence[disco.AddrPort] = (),
    ) -> None:
        self._private = private
        self.disco_key = private.disco_public()
        self._rng = rng
        self.limits = limits or RelayLimits()
        for lifetime in (self.limits.bind_lifetime, self.limits.idle_lifetime):
            if not 0 < lifetime * 1000 <= disco.MAX_U32:
                raise ValueError("lifetimes must be positive and fit 32-bit milliseconds")
        self._candidates: tuple[disco.AddrPort, ...] = ()
        self.candidates = tuple(candidates)
        self._sessions: dict[int, _Session] = {}
        self._by_pair: dict[frozenset[DiscoKey], _Session] = {}
        self._client_sessions: Counter[DiscoKey] = Counter()
        self._buckets: dict[DiscoKey, _Bucket] = {}
        self._routes: dict[tuple[int, Addr], _Route] = {}
        self.routes_version = 0  # bumped whenever _routes changes (fast paths re-read them)
        self._next_allocation_id = 1
        self._t0 = now
        self._epoch = 0
        self._secret = rng(SECRET_LEN)
        self._prev_secret: bytes | None = None
        self.drops: Counter[str] = Counter()
        self._retired_packets = 0
        self._retired_bytes = 0
        self._load_at: float | None = None  # time of the last load sample
        # capacity behind load() and the load in allocate responses (None: limits.capacity_pps);
        # the service raises it while the kernel fast path forwards
        self.load_capacity_pps: float | None = None
        self._load_packets = 0  # forwarded packets (all time) at that sample
        self._rate = 0.0  # averaged forwarded pkt/s

    @property
    def candidates(self) -> tuple[disco.AddrPort, ...]:
        """The relay's advertised ip:ports; the shell sets them once its socket is bound."""
        return self._candidates

    @candidates.setter
    def candidates(self, value: Sequence[disco.AddrPort]) -> None:
        value = tuple(value)
        if len(value) > disco.MAX_ENDPOINTS:
            raise ValueError(f"at most {disco.MAX_ENDPOINTS} candidates")
        for ep in value:
            disco.encode_addr(ep)  # raises DiscoError (a ValueError) for a bad port
        self._candidates = value

    # ---- allocation (signalling over DERP) ---------------------------------------------------

    def handle_allocate(
        self,
        requester: DiscoKey,
        other: DiscoKey,
        generation: int,
        now: float,
        allowed: bool,
    ) -> disco.AllocateResponse | None:
        """Allocate (or return the existing) session for {requester, other}; None = dropped.

        ``allowed`` is the caller's policy verdict (the relay capability for this pair).
        """
        if not allowed:
            self.drops[Drop.NOT_ALLOWED] += 1
            return None
        if requester == other or not 0 <= generation <= disco.MAX_U32:
            self.drops[Drop.BAD_ALLOCATE] += 1
            return None
        if not self.candidates:
            self.drops[Drop.NO_CANDIDATES] += 1
            return None
        pair = frozenset((requester, other))
        sess = self._by_pair.get(pair)
        if sess is not None and sess.expired(now, self.limits):
            self._remove(sess)
            sess = None
        if sess is None:
            if len(self._sessions) >= self.limits.max_sessions:
                self.drops[Drop.SESSION_CAP] += 1
                return None
            cap = self.limits.max_sessions_per_client
            if self._client_sessions[requester] >= cap or self._client_sessions[other] >= cap:
                self.drops[Drop.CLIENT_SESSION_CAP] += 1
                return None
            sess = self._create(requester, other, now)
        elif sess.state is not State.BOUND:
            sess.allocated_at = now  # a fresh bind window for the clients that asked again
        load = round(self.load() * disco.LOAD_PERMILLE_MAX)
        return disco.AllocateResponse(generation, self.endpoint(sess.session_id), load)

    def handle_allocate_packet(
        self,
        packet: bytes,
        now: float,
        is_allowed: Callable[[DiscoKey, DiscoKey], bool],
    ) -> tuple[DiscoKey, bytes] | None:
        """Sealed form for the DERP path: (requester, sealed response) or None (dropped).

        The requester must be one of the two keys in the request; ``is_allowed(requester,
        other)`` is consulted only for well-formed requests.
        """
        try:
            sender, msg = disco.open_sealed(packet, self._private)
        except disco.DiscoError:
            self.drops[Drop.BAD_DISCO] += 1
            return None
        if not isinstance(msg, disco.AllocateRequest):
            self.drops[Drop.UNEXPECTED_MESSAGE] += 1
            return None
        if sender not in (msg.client_a, msg.client_b):
            self.drops[Drop.NOT_PARTY] += 1
            return None
        other = msg.client_b if sender == msg.client_a else msg.client_a
        resp = self.handle_allocate(sender, other, msg.generation, now, is_allowed(sender, other))
        if resp is None:
            return None
        return sender, disco.seal(resp, self._private, sender)

    def endpoint(self, session_id: int) -> disco.RelayEndpoint:
        """The relay endpoint description of a live session (for allocate responses)."""
        sess = self._sessions[session_id]
        return disco.RelayEndpoint(
            server_disco=self.disco_key,
            client_discos=(sess.sides[0].key, sess.sides[1].key),
            allocation_id=sess.allocation_id,
            session_id=sess.session_id,
            bind_lifetime_ms=int(self.limits.bind_lifetime * 1000),
            idle_lifetime_ms=int(self.limits.idle_lifetime * 1000),
            candidates=self.candidates,
        )

    def _create(self, a: DiscoKey, b: DiscoKey, now: float) -> _Session:
        sides = (_Side(a, self._bucket(a, now)), _Side(b, self._bucket(b, now)))
        sess = _Session(self._new_session_id(), self._next_allocation_id, sides, now)
        self._next_allocation_id += 1
        self._sessions[sess.session_id] = sess
        self._by_pair[frozenset((a, b))] = sess
        self._client_sessions[a] += 1
        self._client_sessions[b] += 1
        return sess

    def _bucket(self, key: DiscoKey, now: float) -> _Bucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(self.limits, now)
        bucket.refs += 1
        return bucket

    def _new_session_id(self) -> int:
        """A random unused non-zero 24-bit id; not guessable, though the MAC is what protects."""
        for _ in range(64):
            sid = int.from_bytes(self._rng(3), "big") & MAX_SESSION_ID
            if sid and sid not in self._sessions:
                return sid
        for sid in range(1, MAX_SESSION_ID + 1):  # table nearly full or a stuck rng
            if sid not in self._sessions:
                return sid
        raise RuntimeError("session id space exhausted")  # max_sessions prevents this

    def _remove(self, sess: _Session) -> None:
        for key in sess.route_keys:
            self._routes.pop(key, None)
        self.routes_version += 1
        sess.route_keys = []
        del self._sessions[sess.session_id]
        a, b = sess.sides
        self._by_pair.pop(frozenset((a.key, b.key)), None)
        for side in sess.sides:
            self._retired_packets += side.packets
            self._retired_bytes += side.bytes
            self._client_sessions[side.key] -= 1
            if self._client_sessions[side.key] <= 0:
                del self._client_sessions[side.key]
            side.bucket.refs -= 1
            if side.bucket.refs <= 0:
                self._buckets.pop(side.key, None)

    def expire(self, now: float) -> int:
        """Remove expired sessions; call every few seconds. Returns how many were removed."""
        dead = [s for s in self._sessions.values() if s.expired(now, self.limits)]
        for sess in dead:
            self._remove(sess)
        return len(dead)

    # ---- bind handshake (control packets over UDP) -------------------------------------------

    def _rotate(self, now: float) -> None:
        epoch = int((now - self._t0) // self.limits.secret_rotation)
        if epoch <= self._epoch:
            return
        # A skipped epoch issued no MACs, so after a gap nothing older stays acceptable.
        self._prev_secret = self._secret if epoch == self._epoch + 1 else None
        self._secret = self._rng(SECRET_LEN)
        self._epoch = epoch

    @staticmethod
    def _mac(
        secret: bytes, sid: int, gen: int, sender: DiscoKey, other: DiscoKey, src: bytes
    ) -> bytes:
        h = hashlib.blake2s(key=secret, digest_size=disco.MAC_LEN)
        h.update(sid.to_bytes(4, "big") + gen.to_bytes(4, "big"))
        h.update(sender.raw + other.raw + src)
        return h.digest()

    def handle_datagram(self, data: bytes, source: Addr, now: float) -> list[tuple[bytes, Addr]]:
        """Any packet that arrived on the relay port -> packets to send. Never raises."""
        if len(data) < HEADER_LEN:
            self.drops[Drop.SHORT] += 1
            return []
        if not data[1] & CONTROL_BIT:
            dest = self.forward(data, source, now)
            return [] if dest is None else [(data, dest)]
        try:
            hdr = decode_header(data)
        except HeaderError:
            self.drops[Drop.BAD_HEADER] += 1
            return []
        if hdr.protocol != PROTO_DISCO:
            self.drops[Drop.BAD_PROTOCOL] += 1
            return []
        # Cheap cleartext checks first, so unauthenticated junk costs no X25519 or box work.
        sess = self._sessions.get(hdr.session_id)
        if sess is None:
            self.drops[Drop.UNKNOWN_SESSION] += 1
            return []
        if sess.expired(now, self.limits):
            self._remove(sess)
            self.drops[Drop.EXPIRED] += 1
            return []
        body = memoryview(data)[HEADER_LEN:]
        try:
            pair = sess.side_of(disco.sender_of(body))
        except disco.DiscoError:
            self.drops[Drop.BAD_DISCO] += 1
            return []
        if pair is None:
            self.drops[Drop.NOT_PARTY] += 1
            return []
        try:
            sender, msg = disco.open_sealed(body, self._private)
        except disco.DiscoError:
            self.drops[Drop.BAD_DISCO] += 1
            return []
        if not isinstance(msg, disco.Bind | disco.Answer):
            self.drops[Drop.UNEXPECTED_MESSAGE] += 1
            return []
        me, them = pair
        if msg.session_id != hdr.session_id:
            self.drops[Drop.SESSION_MISMATCH] += 1
            return []
        if msg.other != them.key:
            self.drops[Drop.WRONG_OTHER] += 1
            return []
        try:
            src = _encode_source(source)
        except (ValueError, TypeError, IndexError, disco.DiscoError):
            self.drops[Drop.BAD_SOURCE] += 1
            return []
        self._rotate(now)
        if isinstance(msg, disco.Bind):
            mac = self._mac(self._secret, msg.session_id, msg.generation, sender, them.key, src)
            reply = disco.Challenge(msg.session_id, msg.generation, mac)
            out = encode_header(sess.session_id, PROTO_DISCO, control=True)
            return [(out + disco.seal(reply, self._private, sender), source)]
        if not self._mac_ok(msg, sender, them.key, src):
            self.drops[Drop.BAD_MAC] += 1
            return []
        if me.addr is not None and msg.generation < me.generation:
            self.drops[Drop.STALE_GENERATION] += 1
            return []
        if them.addr == source:
            self.drops[Drop.ADDRESS_CONFLICT] += 1
            return []
        me.addr = source
        me.generation = msg.generation
        me.last_seen = now
        self._reroute(sess)
        return []

    def _mac_ok(self, msg: disco.Answer, sender: DiscoKey, other: DiscoKey, src: bytes) -> bool:
        for secret in (self._secret, self._prev_secret):
            if secret is None:
                continue
            want = self._mac(secret, msg.session_id, msg.generation, sender, other, src)
            if hmac.compare_digest(want, msg.mac):
                return True
        return False

    def _reroute(self, sess: _Session) -> None:
        self.routes_version += 1
        for key in sess.route_keys:
            self._routes.pop(key, None)
        sess.route_keys = []
        a, b = sess.sides
        if a.addr is None or b.addr is None:
            return
        sid = sess.session_id
        for src, dst in ((a, b), (b, a)):
            assert src.addr is not None and dst.addr is not None
            key = (sid, src.addr)
            self._routes[key] = _Route(dst.addr, sess, src, dst)
            sess.route_keys.append(key)

    # ---- forwarding (hot path) ---------------------------------------------------------------

    def credit(self, session_id: int, side: int, packets: int, nbytes: int, now: float) -> bool:
        """Account for packets forwarded outside this core (the kernel fast path).

        Without it a kernel-forwarded session's counters stand still and it would idle out.
        Returns False when the session is gone.
        """
        sess = self._sessions.get(session_id)
        if sess is None:
            return False
        s = sess.sides[side]
        s.packets += packets
        s.bytes += nbytes
        if packets:
            s.last_seen = max(s.last_seen, now)
        return True

    def bound_routes(self) -> list[BoundRoute]:
        """Every direction of every bound session, as :meth:`forward_run` would route it."""
        out: list[BoundRoute] = []
        for (sid, src), route in self._routes.items():
            side = 0 if route.session.sides[0] is route.src_side else 1
            out.append(BoundRoute(sid, side, src, route.dest, route.src_side.key))
        return out

    def forward(self, packet: bytes, source: Addr, now: float) -> Addr | None:
        """Data packet -> destination address, or None.

        None means dropped (counted) or, for a control packet (header control bit set), "not
        mine, give it to handle_datagram" (not counted). The packet is sent on unmodified.
        """
        dest, n = self.forward_run(packet, source, now, 1, len(packet))
        return dest if n else None

    def forward_run(self, packet: bytes, source: Addr, now: float, count: int,
                    nbytes: int) -> tuple[Addr | None, int]:
        """A run of ``count`` data packets (``nbytes`` in all, none larger than ``packet``) from
        ``source`` whose 8-byte headers all equal ``packet``'s -> (destination, how many of the
        run, from its start, may go). One decision for a whole UDP GRO receive: the header picks
        the route, so only the rate limits depend on the count; the rest of a run over the limit
        is dropped and counted per packet.

        (None, 0) as :meth:`forward` returns None (a control packet is not counted).
        """
        if len(packet) < HEADER_LEN:
            self.drops[Drop.SHORT] += count
            return None, 0
        if packet[1] & CONTROL_BIT:
            return None, 0
        sid = int.from_bytes(packet[4:7], "big")
        route = self._routes.get((sid, source))
        if route is None:
            self._drop_unrouted(sid, now, count)
            return None, 0
        src = route.src_side
        dst = route.dst_side
        idle = self.limits.idle_lifetime
        if now - src.last_seen > idle or now - dst.last_seen > idle:
            self._remove(route.session)
            self.drops[Drop.EXPIRED] += count
            return None, 0
        b = src.bucket
        elapsed = now - b.last
        if elapsed > 0:
            lim = self.limits
            b.pkt_tokens = min(lim.packet_burst, b.pkt_tokens + elapsed * lim.packets_per_second)
            b.byte_tokens = min(lim.byte_burst, b.byte_tokens + elapsed * lim.bytes_per_second)
            b.last = now
        if b.pkt_tokens >= count and b.byte_tokens >= nbytes:
            n = count  # the common case: the whole run fits
        else:  # a prefix: each packet charged at the run's largest size (its first)
            n = max(0, min(count, int(b.pkt_tokens), int(b.byte_tokens // max(1, len(packet)))))
            self.drops[Drop.RATE_LIMITED] += count - n
            if n == 0:
                return None, 0
            nbytes = n * len(packet) if n < count else nbytes
        b.pkt_tokens -= n
        b.byte_tokens -= nbytes
        src.last_seen = now
        src.packets += n
        src.bytes += nbytes
        return route.dest, n

    def _drop_unrouted(self, sid: int, now: float, count: int = 1) -> None:
        sess = self._sessions.get(sid)
        if sess is None:
            self.drops[Drop.UNKNOWN_SESSION] += count
        elif sess.expired(now, self.limits):
            self._remove(sess)
            self.drops[Drop.EXPIRED] += count
        elif sess.state is not State.BOUND:
            self.drops[Drop.NOT_BOUND] += count
        else:
            self.drops[Drop.UNBOUND_SOURCE] += count

    # ---- metrics -----------------------------------------------------------------------------

    def session_stats(self, session_id: int) -> SessionStats | None:
        sess = self._sessions.get(session_id)
        if sess is None:
            return None
        a, b = sess.sides
        return SessionStats(
            session_id=sess.session_id,
            allocation_id=sess.allocation_id,
            clients=(a.key, b.key),
            state=sess.state,
            addrs=(a.addr, b.addr),
            packets=(a.packets, b.packets),
            bytes=(a.bytes, b.bytes),
        )

    def metrics(self, with_sessions: bool = False) -> RelayMetrics:
        """Counters for Prometheus and `debug`: cheap without the per-session list."""
        states = Counter(s.state.value for s in self._sessions.values())
        pkts = self._retired_packets
        nbytes = self._retired_bytes
        for s in self._sessions.values():
            for side in s.sides:
                pkts += side.packets
                nbytes += side.bytes
        stats: list[SessionStats] = []
        if with_sessions:
            stats = [
                st for sid in self._sessions if (st := self.session_stats(sid)) is not None
            ]
        return RelayMetrics(
            sessions_by_state={st.value: states.get(st.value, 0) for st in State},
            drops=dict(self.drops),
            forwarded_packets=pkts,
            forwarded_bytes=nbytes,
            sessions=stats,
        )

    # ---- load -------------------------------------------------------------------------------

    def _forwarded_packets(self) -> int:
        return self._retired_packets + sum(
            side.packets for s in self._sessions.values() for side in s.sides)

    def sample_load(self, now: float) -> None:
        """Fold the packets forwarded since the last sample into the averaged rate; call about
        once a second (the shell's timer). O(sessions), like :meth:`expire`."""
        total = self._forwarded_packets()
        if self._load_at is None:
            self._load_at, self._load_packets = now, total
            return
        dt = now - self._load_at
        if dt <= 0:
            return
        inst = max(0, total - self._load_packets) / dt
        # exact EWMA for irregular sample spacing: a gap of dt weighs the new rate 1 - e^(-dt/tau)
        self._rate += (1.0 - math.exp(-dt / LOAD_TAU)) * (inst - self._rate)
        self._load_at, self._load_packets = now, total

    @property
    def forwarding_rate(self) -> float:
        """Averaged forwarded packets per second (as of the last sample)."""
        return self._rate

    def load(self, capacity_pps: float | None = None) -> float:
        """0 (idle) .. 1 (full): max(rate / capacity, sessions / max_sessions).

        ``capacity_pps`` overrides ``load_capacity_pps`` (set by the service: a relay whose kernel
        fast path forwards has more headroom), which overrides ``limits.capacity_pps``.
        """
        cap = capacity_pps if capacity_pps is not None else (
            self.load_capacity_pps if self.load_capacity_pps is not None
            else self.limits.capacity_pps)
        by_rate = self._rate / cap if cap > 0 else 0.0
        by_sessions = len(self._sessions) / self.limits.max_sessions \
            if self.limits.max_sessions > 0 else 0.0
        return min(1.0, max(0.0, by_rate, by_sessions))

    def __len__(self) -> int:
        return len(self._sessions)


class BindError(ValueError):
    """A packet the bind client cannot use: drop it and count it."""


class BindClient:
    """Client side of one bind handshake to one relay candidate (sans-IO).

    ``bind_packet()`` -> send to the candidate; feed what comes back to ``handle_packet`` which
    returns the answer packet. Use a new generation (higher) to re-bind after a NAT change.
    """

    def __init__(self, private: PrivateKey, endpoint: disco.RelayEndpoint, generation: int) -> None:
        me = private.disco_public()
        c0, c1 = endpoint.client_discos
        if me not in (c0, c1):
            raise BindError("this node is not a client of that relay session")
        self._private = private
        self.endpoint = endpoint
        self.generation = generation
        self.other = c1 if me == c0 else c0
        self.session_id = endpoint.session_id
        self._hdr = encode_header(self.session_id, PROTO_DISCO, control=True)

    def bind_packet(self) -> bytes:
        msg = disco.Bind(self.session_id, self.generation, self.other)
        return self._hdr + disco.seal(msg, self._private, self.endpoint.server_disco)

    def handle_packet(self, data: bytes) -> bytes:
        """A control packet from the relay -> the answer packet; raises BindError otherwise."""
        try:
            hdr = decode_header(data)
            sender, msg = disco.open_sealed(memoryview(data)[HEADER_LEN:], self._private)
        except (HeaderError, disco.DiscoError) as e:
            raise BindError(str(e)) from e
        if not hdr.control or hdr.protocol != PROTO_DISCO or hdr.session_id != self.session_id:
            raise BindError("not a control packet of this session")
        if sender != self.endpoint.server_disco:
            raise BindError("challenge not from the relay")
        if not isinstance(msg, disco.Challenge):
            raise BindError(f"expected a challenge, got {type(msg).__name__}")
        if msg.session_id != self.session_id or msg.generation != self.generation:
            raise BindError("challenge for another session or generation")
        answer = disco.Answer(self.session_id, self.generation, self.other, msg.mac)
        return self._hdr + disco.seal(answer, self._private, self.endpoint.server_disco)
