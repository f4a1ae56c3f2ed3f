"""The multi-peer WireGuard device, sans-IO (whitepaper §2-§6, behaviour of wireguard-go).

The caller owns all I/O and the clock: it hands in IP packets read from TUN
(:meth:`Device.send_packet`), UDP datagrams (:meth:`Device.receive`) and the passage of time
(:meth:`Device.tick`), each with ``now`` (seconds, any monotonic origin), and sends or writes what
comes back. Nothing here imports socket,
asyncio or time.

Per peer the device keeps up to three keypairs (whitepaper §6.1, wireguard-go ``Keypairs``):
``current`` (used to send), ``previous`` (still accepted, so packets in flight across a rekey are
not lost) and ``next`` (a responder's fresh keypair, used for sending only once the initiator has
proven it holds it by sending the first data packet with it), plus up to MAX_RETIRED receive-only
keypairs displaced by racing handshakes. Received packets find their keypair through the receiver
index table (random 32-bit indices, shared with pending handshakes). docs/protocol-wireguard.md
lists where this departs from wireguard-go (simultaneous initiations, retired keypairs).

Timers, all deadlines on the caller's ``now`` (whitepaper §6, names from wireguard-go's timers.go):
retransmit (REKEY_TIMEOUT + jitter after an initiation, given up after REKEY_ATTEMPT_TIME),
keepalive (KEEPALIVE_TIMEOUT after receiving data if we sent nothing), new-handshake
(KEEPALIVE_TIMEOUT + REKEY_TIMEOUT after sending data if nothing came back), persistent keepalive,
zero-keys (3 * REJECT_AFTER_TIME after the last session was derived).

Every datagram that :meth:`Device.receive` does not accept increments exactly one key of
:attr:`Device.drops`; nothing a remote sends raises out of it.
"""

from __future__ import annotations

import base64
import collections
import os
import random
import struct
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from relaymesh.keys import PrivateKey, PublicKey

from . import messages as m
from . import noise, tai64n
from .allowedips import AllowedIPs, format_prefix, parse_prefix
from .cookie import CookieChecker, CookieGenerator
from .replay import ReplayWindow
from .timers import MAX_STAGED_PACKETS, Timers

__all__ = ["Device", "Endpoint", "Keypair", "Peer", "Received", "Timers", "Transmit"]

Endpoint = Hashable  # opaque to the core; for UDP it is tuple[str, int] (ip, port)

_HDR = struct.Struct("<IIQ")  # transport header: type word (4), receiver index, counter
_NONCE = struct.Struct("<4xQ")  # ChaCha20-Poly1305 nonce: 32 zero bits, 64-bit LE counter
_PADS = [bytes(i) for i in range(16)]  # zero padding up to the next multiple of 16 (§5.4.6)
_TYPE_DATA = m.MESSAGE_TRANSPORT
_DATA_MIN = m.TRANSPORT_MIN_SIZE
MAX_RETIRED = 3  # receive-only keypairs kept per peer beyond previous/current/next
_ROUTE_CACHE_MAX = 4096  # remembered destinations/sources per family; cleared when full


@dataclass(slots=True)
class Transmit:
    """A datagram the shell must send."""

    endpoint: Endpoint
    data: bytes


class Keypair:
    """One session's transport keys and counters."""

    __slots__ = (
        "created", "fast_count", "fast_until", "is_initiator", "local_index", "peer", "recv",
        "recv_until", "remote_index", "replay", "send", "send_counter",
    )

    def __init__(
        self, peer: Peer, send_key: bytes, recv_key: bytes, is_initiator: bool,
        local_index: int, remote_index: int, created: float, timers: Timers,
    ) -> None:
        self.peer = peer
        self.send = ChaCha20Poly1305(send_key)  # reused for every packet: no per-packet key setup
        self.recv = ChaCha20Poly1305(recv_key)
        self.is_initiator = is_initiator
        self.local_index = local_index
        self.remote_index = remote_index
        self.created = created
        self.send_counter = 0
        self.replay = ReplayWindow(timers.reject_after_messages)
        # Precomputed so the hot path makes one comparison of each kind: below both limits the
        # keypair is valid and needs no rekey (only initiators rekey on time, whitepaper §6.2).
        self.recv_until = created + timers.reject_after_time
        rekey_at = created + timers.rekey_after_time if is_initiator else float("inf")
        self.fast_until = min(self.recv_until, rekey_at)
        self.fast_count = min(timers.reject_after_messages, timers.rekey_after_messages)


class Peer:
    """A configured peer and its session state. The shell and status read the public attributes."""

    __slots__ = (
        "allowed_ips", "attempt_started", "cookies", "current", "endpoint", "handshake",
        "keepalive_at", "last_handshake", "last_sent_handshake", "need_another_keepalive",
        "new_handshake_at", "next", "persistent_at", "persistent_keepalive", "previous",
        "public_key", "retired", "retransmit_at", "rx_bytes", "sent_last_minute_handshake",
        "staged", "tx_bytes", "zero_keys_at",
    )

    def __init__(self, public_key: bytes, handshake: noise.Handshake, cookies: CookieGenerator):
        self.public_key = public_key
        self.endpoint: Endpoint | None = None
        self.allowed_ips: list[str] = []
        self.persistent_keepalive: int | None = None
        self.last_handshake: float | None = None  # in the caller's `now` units
        self.tx_bytes = 0
        self.rx_bytes = 0
        self.handshake = handshake
        self.cookies = cookies
        self.current: Keypair | None = None
        self.previous: Keypair | None = None
        self.next: Keypair | None = None
        # receive-only keypairs pushed out of the three slots (oldest dropped beyond MAX_RETIRED)
        self.retired: list[Keypair] = []
        self.staged: collections.deque[bytes] = collections.deque(maxlen=MAX_STAGED_PACKETS)
        # timer deadlines (None = not armed)
        self.retransmit_at: float | None = None
        self.keepalive_at: float | None = None
        self.new_handshake_at: float | None = None
        self.zero_keys_at: float | None = None
        self.persistent_at: float | None = None
        self.need_another_keepalive = False
        self.attempt_started: float | None = None
        self.last_sent_handshake = float("-inf")
        self.sent_last_minute_handshake = False

    def __repr__(self) -> str:
        return f"Peer({_short(self.public_key)}, endpoint={self.endpoint!r})"


def _short(raw: bytes) -> str:
    """``[abcde]``: the first five base64 characters, as keys.PublicKey.short."""
    return f"[{base64.b64encode(raw).decode()[:5]}]"


@dataclass(slots=True)
class Received:
    transmits: list[Transmit]
    packets: list[bytes]  # plaintext IP packets for TUN
    peer: Peer | None  # the authenticated sender, if any


class Device:
    """A WireGuard interface without I/O: see the module docstring."""

    def __init__(
        self,
        private_key: PrivateKey,
        *,
        timers: Timers | None = None,
        under_load: Callable[[], bool] | None = None,
        roaming: bool = True,
        wall_clock: Callable[[], float] | None = None,
        wall_clock_offset: float = 0.0,
        rng: random.Random | None = None,
        mtu: int = 0,
    ) -> None:
        """``wall_clock`` gives unix time for TAI64N handshake timestamps; without it the timestamp
        is ``now + wall_clock_offset`` (the shell passes ``time.time() - time.monotonic()``).
        ``rng`` draws receiver indices and retransmit jitter (inject a seeded one in tests).
        ``mtu`` > 0 caps padding at the TUN MTU, as wireguard-go does; 0 pads to 16 always.
        """
        self.identity = noise.StaticIdentity.from_raw(private_key.raw)
        self.public_key: bytes = self.identity.public
        self.timers = timers if timers is not None else Timers()
        self._under_load = under_load if under_load is not None else _never
        self.roaming = roaming
        self._wall_clock = wall_clock
        self.wall_clock_offset = wall_clock_offset
        self._rng = rng if rng is not None else random.SystemRandom()
        self.mtu = mtu
        self.peers: dict[bytes, Peer] = {}
        self.drops: collections.Counter[str] = collections.Counter()
        self._routes: AllowedIPs[Peer] = AllowedIPs()
        # route caches: address -> peer, cleared on every peer/allowed-IPs change
        self._dst4: dict[int, Peer] = {}
        self._dst6: dict[int, Peer] = {}
        self._src4: dict[bytes, Peer] = {}
        self._src6: dict[bytes, Peer] = {}
        t = self.timers
        self._last_minute = t.keepalive_timeout + t.rekey_timeout  # §6.2 receive-side rekey
        self._index: dict[int, Keypair | Peer] = {}
        self._checker = CookieChecker(self.public_key, os.urandom, self.timers.cookie_refresh_time)
        self._last_now = 0.0

    # ------------------------------------------------------------------ configuration

    def set_peer(
        self,
        public_key: PublicKey | bytes,
        *,
        allowed_ips: Iterable[str] = (),
        preshared_key: bytes | None = None,
        endpoint: Endpoint | None = None,
        persistent_keepalive: int | None = None,
    ) -> Peer:
        """Add a peer or change one at run time.

        ``allowed_ips`` replaces the peer's whole list (a prefix owned by another peer moves to
        this one, as with wg(8)); ``endpoint``/``preshared_key``/``persistent_keepalive`` of None
        keep the current value, and persistent_keepalive=0 turns it off. Raises ValueError on bad
        input (this is local configuration, not remote data).
        """
        raw = _raw_key(public_key)
        if raw == self.public_key:
            raise ValueError("a peer cannot have the device's own public key")
        if preshared_key is not None and len(preshared_key) != 32:
            raise ValueError("preshared key must be 32 bytes")
        prefixes = []
        for text in allowed_ips:
            version, addr, plen = parse_prefix(text)
            canon = format_prefix(version, addr, plen)
            if canon not in prefixes:
                prefixes.append(canon)
        peer = self.peers.get(raw)
        if peer is None:
            hs = noise.new_handshake(self.identity, raw, preshared_key)
            peer = Peer(raw, hs, CookieGenerator(raw, self.timers.cookie_refresh_time))
            self.peers[raw] = peer
        elif preshared_key is not None:
            peer.handshake.preshared_key = preshared_key
        self._clear_route_caches()
        self._routes.remove_value(peer)
        for prefix in prefixes:
            old = self._routes.insert(prefix, peer)
            if old is not None and old is not peer:
                old.allowed_ips = [p for p in old.allowed_ips if p != prefix]
        peer.allowed_ips = prefixes
        if endpoint is not None:
            peer.endpoint = endpoint
        if persistent_keepalive is not None:
            peer.persistent_keepalive = persistent_keepalive or None
            if peer.persistent_keepalive is None:
                peer.persistent_at = None
            elif peer.endpoint is not None:
                peer.persistent_at = self._last_now  # wg(8): a keepalive right away when set
        return peer

    def remove_peer(self, public_key: PublicKey | bytes) -> None:
        peer = self.peers.pop(_raw_key(public_key), None)
        if peer is None:
            return
        self._zero_keys(peer)
        self._clear_route_caches()
        self._routes.remove_value(peer)
        peer.allowed_ips = []
        peer.staged.clear()

    def _clear_route_caches(self) -> None:
        self._dst4.clear()
        self._dst6.clear()
        self._src4.clear()
        self._src6.clear()

    def peer(self, public_key: PublicKey | bytes) -> Peer | None:
        return self.peers.get(_raw_key(public_key))

    def route(self, address: str) -> Peer | None:
        """The peer whose allowed IPs hold ``address`` (longest prefix), for status and tests."""
        return self._routes.lookup_str(address)

    # ------------------------------------------------------------------ outbound

    def send_packet(self, ip_packet: bytes | memoryview, now: float) -> list[Transmit]:
        """Route one IP packet from TUN by destination; encrypt it, or queue it for a handshake."""
        self._last_now = now
        n = len(ip_packet)
        if n >= 20 and ip_packet[0] >> 4 == 4:
            addr = int.from_bytes(ip_packet[16:20], "big")
            peer = self._dst4.get(addr)
            if peer is None:
                peer = self._route_miss(self._dst4, self._routes.v4.lookup, addr)
        elif n >= 40 and ip_packet[0] >> 4 == 6:
            addr = int.from_bytes(ip_packet[24:40], "big")
            peer = self._dst6.get(addr)
            if peer is None:
                peer = self._route_miss(self._dst6, self._routes.v6.lookup, addr)
        else:
            self.drops["bad_outbound_packet"] += 1
            return []
        if peer is None:
            self.drops["no_route"] += 1
            return []
        kp = peer.current
        endpoint = peer.endpoint
        if (
            kp is None
            or endpoint is None
            or now >= kp.fast_until
            or kp.send_counter >= kp.fast_count
        ):
            return self._send_slow(peer, ip_packet, now)
        # --- hot path: valid current keypair, no rekey due
        counter = kp.send_counter
        kp.send_counter = counter + 1
        pad = -n & 15
        if pad:
            if self.mtu and n + pad > self.mtu:
                pad = max(0, self.mtu - n)
            ip_packet = b"".join((ip_packet, _PADS[pad]))
        data = _HDR.pack(_TYPE_DATA, kp.remote_index, counter) + kp.send.encrypt(
            _NONCE.pack(counter), ip_packet, None
        )
        peer.tx_bytes += len(data)
        # timers: any authenticated packet sent/traversal, data sent
        peer.keepalive_at = None
        if peer.persistent_keepalive:
            peer.persistent_at = now + peer.persistent_keepalive
        if peer.new_handshake_at is None:
            t = self.timers
            peer.new_handshake_at = now + t.keepalive_timeout + t.rekey_timeout + self._jitter()
        return [Transmit(endpoint, data)]

    def _route_miss(
        self, cache: dict[int, Peer], lookup: Callable[[int], Peer | None], addr: int
    ) -> Peer | None:
        """Longest-prefix lookup, remembered per destination (cleared on any peer change)."""
        peer = lookup(addr)
        if peer is not None:
            if len(cache) >= _ROUTE_CACHE_MAX:
                cache.clear()
            cache[addr] = peer
        return peer

    def _send_slow(self, peer: Peer, ip_packet: bytes | memoryview, now: float) -> list[Transmit]:
        """send_packet when the current keypair is missing, expired, or due for a rekey."""
        if peer.endpoint is None:
            self.drops["no_endpoint"] += 1
            return []
        kp = peer.current
        if kp is None or not self._usable(kp, now):
            peer.staged.append(bytes(ip_packet))
            return self._initiate(peer, now)
        out = [self._encrypt(peer, kp, bytes(ip_packet), now)]
        t = self.timers
        # keep key fresh (sending side, whitepaper §6.2)
        if kp.send_counter > t.rekey_after_messages or (
            kp.is_initiator and now - kp.created >= t.rekey_after_time
        ):
            out.extend(self._initiate(peer, now))
        return out

    def initiate_handshake(self, public_key: PublicKey | bytes, now: float) -> list[Transmit]:
        """Start a handshake now (e.g. ``wg up`` with an endpoint); [] if one is already running,
        the peer has no endpoint, or one was sent less than REKEY_TIMEOUT ago (then it is
        scheduled).
        """
        self._last_now = now
        peer = self.peers.get(_raw_key(public_key))
        if peer is None:
            return []
        return self._initiate(peer, now)

    # ------------------------------------------------------------------ inbound

    def receive(self, datagram: bytes | memoryview, source: Endpoint, now: float) -> Received:
        """Handle one UDP datagram; never raises for anything the remote side controls."""
        self._last_now = now
        n = len(datagram)
        try:
            if n >= _DATA_MIN:
                word, idx, counter = _HDR.unpack_from(datagram)
                if word == _TYPE_DATA:  # type 4 and three zero reserved bytes
                    return self._receive_data(datagram, n, idx, counter, source, now)
            if n < 4 or datagram[1] or datagram[2] or datagram[3]:
                return self._drop("malformed")
            mtype = datagram[0]
            if mtype == m.MESSAGE_INITIATION and n == m.INITIATION_SIZE:
                return self._receive_initiation(bytes(datagram), source, now)
            if mtype == m.MESSAGE_RESPONSE and n == m.RESPONSE_SIZE:
                return self._receive_response(bytes(datagram), source, now)
            if mtype == m.MESSAGE_COOKIE_REPLY and n == m.COOKIE_REPLY_SIZE:
                return self._receive_cookie_reply(bytes(datagram), now)
        except Exception:  # a bug must not let remote input kill the receive loop
            return self._drop("internal_error")
        return self._drop("malformed")

    def _drop(
        self, reason: str, peer: Peer | None = None, out: list[Transmit] | None = None
    ) -> Received:
        self.drops[reason] += 1
        return Received(out if out is not None else [], [], peer)

    def _receive_data(
        self, d: bytes | memoryview, n: int, idx: int, counter: int, source: Endpoint, now: float
    ) -> Received:
        kp = self._index.get(idx)
        if type(kp) is not Keypair:
            return self._drop("unknown_index")
        if now >= kp.recv_until or counter >= self.timers.reject_after_messages:
            return self._drop("expired_keypair")
        try:
            plain = kp.recv.decrypt(_NONCE.pack(counter), d[16:], None)
        except InvalidTag:
            return self._drop("bad_auth")
        if not kp.replay.check_and_update(counter):
            return self._drop("replay")
        peer = kp.peer
        out: list[Transmit] = []
        if kp is peer.next:
            self._confirm_next(peer, now, out)
        if self.roaming or peer.endpoint is None:
            peer.endpoint = source
        peer.rx_bytes += n
        # timers: any authenticated packet received / traversal
        peer.new_handshake_at = None
        if peer.persistent_keepalive:
            peer.persistent_at = now + peer.persistent_keepalive
        # keep key fresh (receiving side, whitepaper §6.2): the initiator rekeys shortly before
        # REJECT_AFTER_TIME if it has not yet done so because it had nothing to send
        if (
            kp.is_initiator
            and not peer.sent_last_minute_handshake
            and now >= kp.recv_until - self._last_minute
            and kp is peer.current
        ):
            peer.sent_last_minute_handshake = True
            out.extend(self._initiate(peer, now))
        if not plain:
            return Received(out, [], peer)  # keepalive
        # data received
        if peer.keepalive_at is None:
            peer.keepalive_at = now + self.timers.keepalive_timeout
        else:
            peer.need_another_keepalive = True
        ln = len(plain)
        version = plain[0] >> 4
        if version == 4 and ln >= 20:
            total = int.from_bytes(plain[2:4], "big")
            src_peer = self._src4.get(plain[12:16])
            if src_peer is None:
                src_peer = self._routes.lookup(plain[12:16])
                if src_peer is not None:
                    self._cache_src(self._src4, plain[12:16], src_peer)
        elif version == 6 and ln >= 40:
            total = 40 + int.from_bytes(plain[4:6], "big")
            src_peer = self._src6.get(plain[8:24])
            if src_peer is None:
                src_peer = self._routes.lookup(plain[8:24])
                if src_peer is not None:
                    self._cache_src(self._src6, plain[8:24], src_peer)
        else:
            return self._drop("bad_inner_packet", peer, out)
        if total > ln or total < 20:
            return self._drop("bad_inner_packet", peer, out)
        if src_peer is not peer:
            return self._drop("bad_source", peer, out)
        return Received(out, [plain if total == ln else plain[:total]], peer)

    def _cache_src(self, cache: dict[bytes, Peer], src: bytes, peer: Peer) -> None:
        if len(cache) >= _ROUTE_CACHE_MAX:
            cache.clear()
        cache[src] = peer

    def _under_load_reply(self, d: bytes, source: Endpoint, now: float) -> Received | None:
        """mac1 and (under load) mac2 checks shared by initiation and response."""
        if not self._checker.check_mac1(d):
            return self._drop("bad_mac1")
        if self._under_load() and not self._checker.check_mac2(d, source, now):
            sender = int.from_bytes(d[4:8], "little")
            reply = self._checker.create_reply(d, sender, source, now)
            return self._drop("under_load", None, [Transmit(source, reply.encode())])
        return None

    def _receive_initiation(self, d: bytes, source: Endpoint, now: float) -> Received:
        early = self._under_load_reply(d, source, now)
        if early is not None:
            return early
        msg = m.MessageInitiation.decode(d)
        peers = self.peers
        pending: list[_PendingInitiation | None] = []

        def lookup(static: bytes) -> noise.Handshake | None:
            p = peers.get(static)
            if p is None:
                return None
            pending.append(_PendingInitiation.save(p.handshake))  # before consume changes it
            return p.handshake

        try:
            hs = noise.consume_initiation(self.identity, msg, lookup, now)
        except noise.HandshakeError as e:
            return self._drop(e.reason)
        peer = peers[hs.remote_static]
        ours = pending[0] if pending else None
        if ours is None:
            self._release_handshake_index(peer)
        if self.roaming or peer.endpoint is None:
            peer.endpoint = source
        idx = self._new_index(peer)
        resp = noise.create_response(hs, idx)
        data = peer.cookies.add_macs(resp.encode(), now)
        remote_index = hs.remote_index
        send_key, recv_key, _ = noise.derive_transport_keys(hs)
        hs.local_index = None
        kp = Keypair(peer, send_key, recv_key, False, idx, remote_index, now, self.timers)
        self._index[idx] = kp
        if ours is not None:
            # Both sides initiated at once. The spec keeps one handshake per peer, so each side's
            # response would find the other's state overwritten and both handshakes would fail
            # (and, with retransmissions in step, fail again). We keep our own initiation alive
            # too: whichever response arrives completes it, and both sessions stay usable.
            ours.restore(hs)
        # responder: the new keypair waits in `next` until the initiator uses it
        if peer.next is not None:
            self._retire(peer, peer.next)
        peer.next = kp
        peer.rx_bytes += len(d)
        peer.tx_bytes += len(data)
        self._session_derived(peer, now)
        peer.new_handshake_at = None
        peer.keepalive_at = None
        if peer.persistent_keepalive:
            peer.persistent_at = now + peer.persistent_keepalive
        return Received([Transmit(source, data)], [], peer)

    def _receive_response(self, d: bytes, source: Endpoint, now: float) -> Received:
        early = self._under_load_reply(d, source, now)
        if early is not None:
            return early
        msg = m.MessageResponse.decode(d)
        peer = self._index.get(msg.receiver)
        if type(peer) is not Peer or peer.handshake.local_index != msg.receiver:
            return self._drop("unknown_index")
        hs = peer.handshake
        try:
            noise.consume_response(self.identity, hs, msg)
        except noise.HandshakeError as e:
            return self._drop(e.reason)
        idx = msg.receiver
        remote_index = hs.remote_index
        send_key, recv_key, _ = noise.derive_transport_keys(hs)
        hs.local_index = None
        kp = Keypair(peer, send_key, recv_key, True, idx, remote_index, now, self.timers)
        self._index[idx] = kp
        # initiator: the new keypair is current at once (wireguard-go BeginSymmetricSession).
        # wireguard-go has three slots and deletes what does not fit; we keep a few more,
        # receive-only, so that when handshakes race the peer may still send on a session we
        # displaced (it switches only when it completes or confirms a newer one).
        if peer.next is not None:
            if peer.previous is not None:
                self._retire(peer, peer.previous)
            if peer.current is not None:
                self._retire(peer, peer.current)
            peer.previous = peer.next
            peer.next = None
        else:
            if peer.previous is not None:
                self._retire(peer, peer.previous)
            peer.previous = peer.current
        peer.current = kp
        if self.roaming or peer.endpoint is None:
            peer.endpoint = source
        peer.rx_bytes += len(d)
        self._session_derived(peer, now)
        self._handshake_complete(peer, now)
        peer.new_handshake_at = None
        if peer.persistent_keepalive:
            peer.persistent_at = now + peer.persistent_keepalive
        # flush what waited for this handshake, or confirm the session with a keepalive
        return Received(self._send_keepalive(peer, now), [], peer)

    def _receive_cookie_reply(self, d: bytes, now: float) -> Received:
        msg = m.MessageCookieReply.decode(d)
        entry = self._index.get(msg.receiver)
        if entry is None:
            return self._drop("unknown_index")
        peer = entry if type(entry) is Peer else entry.peer  # type: ignore[union-attr]
        if not peer.cookies.consume_reply(msg, now):
            return self._drop("bad_cookie_reply")
        return Received([], [], peer)

    # ------------------------------------------------------------------ timers

    def tick(self, now: float) -> list[Transmit]:
        """Fire every timer whose deadline is <= now; returns the datagrams to send."""
        self._last_now = now
        out: list[Transmit] = []
        t = self.timers
        for peer in list(self.peers.values()):
            if peer.retransmit_at is not None and now >= peer.retransmit_at:
                peer.retransmit_at = None
                started = peer.attempt_started if peer.attempt_started is not None else now
                if now - started >= t.rekey_attempt_time:
                    self._give_up(peer, now)
                else:
                    out.extend(self._initiate(peer, now, retry=True))
            if peer.keepalive_at is not None and now >= peer.keepalive_at:
                peer.keepalive_at = None
                out.extend(self._send_keepalive(peer, now))
                if peer.need_another_keepalive:
                    peer.need_another_keepalive = False
                    peer.keepalive_at = now + t.keepalive_timeout
            if peer.new_handshake_at is not None and now >= peer.new_handshake_at:
                # we sent data and heard nothing back: assume the session broke (§6.5)
                peer.new_handshake_at = None
                out.extend(self._initiate(peer, now))
            if peer.persistent_at is not None and now >= peer.persistent_at:
                peer.persistent_at = None
                out.extend(self._send_keepalive(peer, now))
            if peer.zero_keys_at is not None and now >= peer.zero_keys_at:
                peer.zero_keys_at = None
                self._zero_keys(peer)
        return out

    def next_deadline(self) -> float | None:
        """When :meth:`tick` next has something to do (None: nothing armed)."""
        best: float | None = None
        for peer in self.peers.values():
            for d in (peer.retransmit_at, peer.keepalive_at, peer.new_handshake_at,
                      peer.persistent_at, peer.zero_keys_at):
                if d is not None and (best is None or d < best):
                    best = d
        return best

    # ------------------------------------------------------------------ internals

    def _jitter(self) -> float:
        return self._rng.uniform(0.0, self.timers.rekey_timeout_jitter)

    def _new_index(self, entry: Keypair | Peer) -> int:
        while True:
            idx = self._rng.getrandbits(32)
            if idx not in self._index:
                self._index[idx] = entry
                return idx

    def _release_handshake_index(self, peer: Peer) -> None:
        idx = peer.handshake.local_index
        if idx is not None and self._index.get(idx) is peer:
            del self._index[idx]
        peer.handshake.local_index = None

    def _discard(self, kp: Keypair) -> None:
        if self._index.get(kp.local_index) is kp:
            del self._index[kp.local_index]

    def _retire(self, peer: Peer, kp: Keypair) -> None:
        """Keep ``kp`` for receiving only (until REJECT_AFTER_TIME or MAX_RETIRED newer ones)."""
        retired = peer.retired
        retired.append(kp)
        if len(retired) > MAX_RETIRED:
            oldest = min(retired, key=_created)
            retired.remove(oldest)
            self._discard(oldest)

    def _session_derived(self, peer: Peer, now: float) -> None:
        peer.zero_keys_at = now + 3 * self.timers.reject_after_time

    def _handshake_complete(self, peer: Peer, now: float) -> None:
        peer.retransmit_at = None
        peer.attempt_started = None
        peer.sent_last_minute_handshake = False
        peer.last_handshake = now

    def _confirm_next(self, peer: Peer, now: float, out: list[Transmit]) -> None:
        """The initiator used our `next` keypair: it becomes current (whitepaper §5.4.5 note)."""
        if peer.previous is not None:
            self._retire(peer, peer.previous)
        peer.previous = peer.current
        peer.current = peer.next
        peer.next = None
        self._handshake_complete(peer, now)
        if peer.staged:
            out.extend(self._flush_staged(peer, now))

    def _give_up(self, peer: Peer, now: float) -> None:
        """REKEY_ATTEMPT_TIME passed without an answer: drop queued packets, stop retrying."""
        peer.attempt_started = None
        peer.staged.clear()
        self._release_handshake_index(peer)
        peer.handshake.zero()
        if peer.zero_keys_at is None:
            peer.zero_keys_at = now + 3 * self.timers.reject_after_time

    def _zero_keys(self, peer: Peer) -> None:
        """Forget every keypair and the handshake state (3 * REJECT_AFTER_TIME of silence)."""
        for kp in (peer.previous, peer.current, peer.next, *peer.retired):
            if kp is not None:
                self._discard(kp)
        peer.previous = peer.current = peer.next = None
        peer.retired.clear()
        self._release_handshake_index(peer)
        peer.handshake.zero()
        peer.retransmit_at = None
        peer.attempt_started = None

    def _usable(self, kp: Keypair | None, now: float) -> bool:
        t = self.timers
        return (
            kp is not None
            and kp.send_counter < t.reject_after_messages
            and now - kp.created < t.reject_after_time
        )

    def _initiate(self, peer: Peer, now: float, retry: bool = False) -> list[Transmit]:
        """Send a handshake initiation unless one is running or was sent < REKEY_TIMEOUT ago."""
        if peer.endpoint is None:
            return []
        t = self.timers
        if not retry:
            peer.attempt_started = now  # new demand: try for another REKEY_ATTEMPT_TIME, as
            # wireguard-go resets its attempt count on every non-retry initiation
            if peer.retransmit_at is not None:
                return []  # an attempt is running; its retransmit timer will retry
            nxt = peer.next
            if nxt is not None and now - nxt.created < t.rekey_timeout:
                # We just answered the peer's initiation: its first data packet will confirm our
                # `next` keypair within moments. Initiating now (as wireguard-go does) only races
                # that handshake; wait up to REKEY_TIMEOUT for the confirmation instead.
                peer.retransmit_at = nxt.created + t.rekey_timeout
                return []
        if now - peer.last_sent_handshake < t.rekey_timeout:
            peer.retransmit_at = peer.last_sent_handshake + t.rekey_timeout
            return []
        self._release_handshake_index(peer)
        idx = self._new_index(peer)
        wall = self._wall_clock() if self._wall_clock is not None else now + self.wall_clock_offset
        try:
            msg = noise.create_initiation(self.identity, peer.handshake, idx, tai64n.encode(wall))
        except noise.HandshakeError:
            self._release_handshake_index(peer)
            del self._index[idx]
            return []
        data = peer.cookies.add_macs(msg.encode(), now)
        peer.last_sent_handshake = now
        peer.retransmit_at = now + t.rekey_timeout + self._jitter()
        peer.tx_bytes += len(data)
        peer.keepalive_at = None
        if peer.persistent_keepalive:
            peer.persistent_at = now + peer.persistent_keepalive
        return [Transmit(peer.endpoint, data)]

    def _encrypt(self, peer: Peer, kp: Keypair, payload: bytes, now: float) -> Transmit:
        counter = kp.send_counter
        kp.send_counter = counter + 1
        n = len(payload)
        pad = -n & 15
        if pad and self.mtu and n + pad > self.mtu:
            pad = max(0, self.mtu - n)
        data = _HDR.pack(_TYPE_DATA, kp.remote_index, counter) + kp.send.encrypt(
            _NONCE.pack(counter), payload + _PADS[pad], None
        )
        peer.tx_bytes += len(data)
        peer.keepalive_at = None
        if peer.persistent_keepalive:
            peer.persistent_at = now + peer.persistent_keepalive
        t = self.timers
        if n and peer.new_handshake_at is None:
            peer.new_handshake_at = now + t.keepalive_timeout + t.rekey_timeout + self._jitter()
        assert peer.endpoint is not None
        return Transmit(peer.endpoint, data)

    def _flush_staged(self, peer: Peer, now: float) -> list[Transmit]:
        kp = peer.current
        if peer.endpoint is None:
            return []
        if kp is None or not self._usable(kp, now):
            return self._initiate(peer, now)
        out = []
        while peer.staged:
            out.append(self._encrypt(peer, kp, peer.staged.popleft(), now))
        t = self.timers
        if kp.send_counter > t.rekey_after_messages or (
            kp.is_initiator and now - kp.created >= t.rekey_after_time
        ):
            out.extend(self._initiate(peer, now))
        return out

    def _send_keepalive(self, peer: Peer, now: float) -> list[Transmit]:
        """Staged packets if any (they prove liveness too), else an empty data message."""
        if peer.staged:
            return self._flush_staged(peer, now)
        if peer.endpoint is None:
            return []
        kp = peer.current
        if kp is None or not self._usable(kp, now):
            return self._initiate(peer, now)
        return [self._encrypt(peer, kp, b"", now)]


@dataclass(slots=True)
class _PendingInitiation:
    """Our in-flight initiation's state, kept across answering the peer's own initiation."""

    hash: bytes
    chain_key: bytes
    local_ephemeral: X25519PrivateKey | None
    local_index: int

    @classmethod
    def save(cls, hs: noise.Handshake) -> _PendingInitiation | None:
        if hs.state is not noise.State.INITIATION_CREATED or hs.local_index is None:
            return None
        return cls(hs.hash, hs.chain_key, hs.local_ephemeral, hs.local_index)

    def restore(self, hs: noise.Handshake) -> None:
        hs.state = noise.State.INITIATION_CREATED
        hs.hash, hs.chain_key, hs.local_index = self.hash, self.chain_key, self.local_index
        hs.local_ephemeral = self.local_ephemeral


def _created(kp: Keypair) -> float:
    return kp.created


def _never() -> bool:
    return False


def _raw_key(key: PublicKey | bytes) -> bytes:
    raw = key.raw if isinstance(key, PublicKey) else bytes(key)
    if len(raw) != 32:
        raise ValueError("a WireGuard public key is 32 bytes")
    return raw
