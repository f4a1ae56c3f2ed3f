"""The WireGuard fast path: TUN <-> sans-IO core <-> one UDP socket, on plain threads.

Why threads and not asyncio: a per-datagram asyncio callback costs ~25-30 us on this class of
machine, a plain ``recv_into``/``sendto`` loop ~7-10 us (shared/design/MEASUREMENTS.md). So each
direction is a blocking loop that waits in ``poll`` and then drains its fd until it would block:

- outbound: TUN fd -> ``Device.send_packet`` -> ``sendto`` (UDP GSO: one ``sendmsg`` per run of
  same-size datagrams);
- inbound: UDP ``recvfrom_into``/``recvmsg_into`` (preallocated buffers; UDP GRO: one receive may
  hold several datagrams) -> ``Device.receive`` -> TUN ``write`` and ``sendto`` (handshake
  responses, flushed queues);
- ``timers`` thread: sleeps until ``Device.next_deadline()`` (re-checked at least every
  ``TIMER_GRANULARITY`` seconds, and at once after a control call) and runs ``Device.tick``.

``threads=1`` (default) runs both directions in one I/O thread that polls both fds; ``threads=2``
gives each direction its own thread. Measured on the 2-vCPU lab machine (docs/benchmarks.md), one
thread was as fast or faster in every A/B: with the GIL only syscalls overlap, and the hand-offs
between two busy threads cost more than that gains when the cores are already saturated.

The core is not thread-safe, so every call into it holds ``self.lock``; syscalls run outside it
(they release the GIL, so the other direction's interpreter work overlaps them). A batch of up to
``BATCH`` packets is read first, then processed under one lock hold, then sent: one lock round and
one clock read per batch instead of per packet. Control calls (peer changes, handshakes, stats) go
through :meth:`Datapath.call`, which takes the same lock.

Nothing raises out of a loop: errors from the core or from a syscall on one packet are counted in
``drops`` (by reason) and the packet is dropped. The datagram memoryview handed to
``Device.receive`` points into a reused buffer and is valid only during that call.

Extra sockets (:meth:`Datapath.add_socket`; the node's birthday-paradox spray sockets,
docs/magicsock.md) are polled with the main socket and drained only when poll says they are
readable (no GRO; ``source`` maps each sender to the endpoint the core sees, ``divert`` takes
their disco). While none exist the loops do what they did before: the only extra work per round
is two attribute compares. Adding or removing one rebuilds the poll set through the wake pipe.

Endpoints handed to the core are ``(ip, port)`` tuples with plain dotted IPv4 even on the dual-stack
socket (``::ffff:a.b.c.d`` is unmapped), so config endpoints and observed sources compare equal.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import logging
import os
import select
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Protocol, TypeVar

from relaymesh.wireguard.tun import TunLike

log = logging.getLogger(__name__)

BATCH = 64  # packets per lock hold; bounds the latency added to the first packet of a batch
RECV_BUFSIZE = 65535  # a UDP datagram can be this large; real ones are <= MTU + 32 + 28/48
SOCK_BUFSIZE = 4 << 20  # 4 MiB socket buffers absorb bursts while the other thread holds the GIL
TIMER_GRANULARITY = 0.1  # s: the timer thread re-reads next_deadline() at least this often
ENDPOINT_CACHE_MAX = 4096  # bounds the sockaddr<->endpoint caches against spoofed-source floods
INITIATION_TYPE = 1  # whitepaper 5.4.2: first byte of a handshake initiation
INITIATION_SIZE = 148  # whitepaper 5.4.2: fixed size of a handshake initiation
UNDER_LOAD_INITIATIONS = 64  # initiations per LOAD_WINDOW that mean "under load" (cookies on);
#   a legitimate peer initiates at most every REKEY_TIMEOUT (5 s), so this is a flood
LOAD_WINDOW = 1.0  # s; also how long "under load" lasts after the last busy window, as
#   wireguard-go's UnderLoadAfterTime
V4_MAPPED = "::ffff:"  # IPv4-mapped IPv6 prefix used by a dual-stack socket (RFC 4291 2.5.5.2)
SOL_UDP = 17  # <netinet/in.h> IPPROTO_UDP as a socket option level
UDP_SEGMENT = 103  # <linux/udp.h>: GSO segment size for sendmsg (Linux 4.18)
UDP_GRO = 104  # <linux/udp.h>: receive coalesced datagrams + their segment size (Linux 5.0)
GSO_MAX_SEGMENTS = 64  # UDP_MAX_SEGMENTS in older kernels (newer allow 128)
GSO_MAX_BYTES = 65000  # one GSO send must stay below the 64 KiB IP/UDP length limit
GRO_CMSG_SPACE = socket.CMSG_SPACE(4)  # the UDP_GRO cmsg carries an int
_GSO_UNSUPPORTED = (errno.EINVAL, errno.EIO, errno.ENOPROTOOPT, errno.EOPNOTSUPP)

T = TypeVar("T")


class TransmitLike(Protocol):
    @property
    def endpoint(self) -> Hashable: ...

    @property
    def data(self) -> bytes: ...


class ReceivedLike(Protocol):
    @property
    def transmits(self) -> Sequence[TransmitLike]: ...

    @property
    def packets(self) -> Sequence[bytes]: ...


class DeviceLike(Protocol):
    """The part of ``relaymesh.wireguard.device.Device`` the datapath drives."""

    def send_packet(self, ip_packet: bytes, now: float) -> Sequence[TransmitLike]: ...

    def receive(self, datagram: memoryview, source: Any, now: float) -> ReceivedLike: ...

    def tick(self, now: float) -> Sequence[TransmitLike]: ...

    def next_deadline(self) -> float | None: ...


class Counters:
    """Datapath counters. Each field has one writer thread, so plain ints need no lock."""

    __slots__ = (
        "drops",
        "relay_tx_bytes",
        "relay_tx_packets",
        "tun_rx_bytes",
        "tun_rx_packets",
        "tun_tx_bytes",
        "tun_tx_packets",
        "udp_rx_bytes",
        "udp_rx_packets",
        "udp_tx_bytes",
        "udp_tx_packets",
    )

    def __init__(self) -> None:
        self.tun_rx_packets = 0  # read from TUN (outbound plaintext)
        self.tun_rx_bytes = 0
        self.tun_tx_packets = 0  # written to TUN (inbound plaintext)
        self.tun_tx_bytes = 0
        self.udp_rx_packets = 0
        self.udp_rx_bytes = 0
        self.udp_tx_packets = 0
        self.udp_tx_bytes = 0
        self.relay_tx_packets = 0  # of udp_tx: sent with an endpoint's ``relay_hdr`` in front
        self.relay_tx_bytes = 0
        self.drops: collections.Counter[str] = collections.Counter()

    def as_dict(self) -> dict[str, int]:
        d = {k: getattr(self, k) for k in self.__slots__ if k != "drops"}
        d.update({f"drop_{k}": v for k, v in self.drops.items()})
        return d


def open_udp_socket(port: int = 0, host: str = "") -> socket.socket:
    """A dual-stack UDP socket (IPv4 only if IPv6 is off), blocking for sends, big buffers."""
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host or "::", port))
    except OSError:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((host or "0.0.0.0", port))
    for opt, force in ((socket.SO_SNDBUF, 32), (socket.SO_RCVBUF, 33)):  # 32/33: SO_*BUFFORCE
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, SOCK_BUFSIZE)  # root: above rmem_max
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCK_BUFSIZE)
    return sock


def _try_udp_option(sock: socket.socket, option: int, value: int) -> bool:
    if sock.type != socket.SOCK_DGRAM:
        return False
    try:
        sock.setsockopt(SOL_UDP, option, value)
    except OSError:
        return False
    return True


@functools.lru_cache(maxsize=256)
def segment_heads(seg: int, n: int, width: int) -> struct.Struct:
    """Reads the first ``width`` bytes of each of ``n`` segments of ``seg`` bytes (the last may be
    shorter, but not shorter than ``width``), skipping the rest.

    One ``unpack_from`` and one ``tuple.count`` then tell whether every segment of a GRO receive
    starts the same way, ~1 us for 30 segments where slicing and comparing each costs ~4 us.
    Cached: a flow uses a handful of (segment size, count) pairs."""
    head = f"{width}s"
    return struct.Struct(f"{head}{seg - width}x" * (n - 1) + head)


def same_heads(view: memoryview, total: int, seg: int, width: int) -> int:
    """The segment count of a GRO buffer of 2+ segments that all start with the same ``width``
    bytes, else 0."""
    if not width < seg < total:
        return 0
    n = -(-total // seg)
    if total - (n - 1) * seg < width:
        return 0
    heads = segment_heads(seg, n, width).unpack_from(view)
    return n if heads.count(heads[0]) == n else 0


def recv_batch(
    sock: socket.socket, bufs: list[bytearray], gro: bool, got: list[tuple[int, Any, int]]
) -> None:
    """Receive into ``bufs`` without blocking until they are used or the socket is empty.

    Appends ``(bytes, source sockaddr, segment size)`` per receive to ``got``; with UDP GRO one
    receive may hold several datagrams of ``segment size`` back to back (the last may be
    shorter). Raises what the socket raises (BlockingIOError when drained) after keeping what
    was already received in ``got``, so callers count errors under their own names.
    """
    if gro:
        recvmsg_into, anc_size = sock.recvmsg_into, GRO_CMSG_SPACE
        for buf in bufs:
            n, anc, _, addr = recvmsg_into([buf], anc_size, socket.MSG_DONTWAIT)
            seg = n
            for level, kind, data in anc:
                if level == SOL_UDP and kind == UDP_GRO:
                    seg = int.from_bytes(data, sys.byteorder) or n
            got.append((n, addr, seg))
    else:
        recv_into = sock.recvfrom_into
        for buf in bufs:
            n, addr = recv_into(buf, RECV_BUFSIZE, socket.MSG_DONTWAIT)
            got.append((n, addr, n))


class _Extra:
    """An extra receive socket: its sender -> endpoint mapping and its disco hook."""

    __slots__ = ("divert", "sock", "source")

    def __init__(self, sock: socket.socket, source: Callable[[Any], Any] | None,
                 divert: Callable[[bytes, tuple[str, int]], bool] | None) -> None:
        self.sock = sock
        self.source = source
        self.divert = divert


class Datapath:
    """Runs a device between a TUN and a UDP socket until :meth:`stop`."""

    def __init__(
        self,
        device: DeviceLike,
        tun: TunLike,
        sock: socket.socket,
        *,
        threads: int = 1,
        clock: Callable[[], float] = time.monotonic,
        offload: bool = True,
        divert: Callable[[bytes, tuple[str, int]], bool] | None = None,
        inbound_filter: Callable[[bytes, Any], bool] | None = None,
        framed: bytes = b"",
    ) -> None:
        """``divert(datagram_copy, source)`` sees every datagram whose first byte is not a
        WireGuard type (1..4), e.g. disco, before the core; True means it consumed it.
        ``framed``: datagrams starting with these bytes are WireGuard in a frame the device
        unwraps itself (the node's peer-relay header); they skip ``divert`` and its copy, which
        cost a relayed packet more than the unwrap does. A device with a ``receive_run(view,
        total, seg, source, now)`` method is offered each GRO receive that starts framed, whole:
        it returns a result per segment it consumed, or None to have them handed over one by
        one (the node unwraps a run of one relay session with one lookup).
        ``inbound_filter(packet, peer)`` judges each decrypted packet before the TUN write; False
        drops it (counted as ``filtered``). Both run on the inbound thread under the lock."""
        if threads not in (1, 2):
            raise ValueError("threads must be 1 or 2")
        self.device = device
        self.tun = tun
        self.sock = sock
        self.threads = threads
        self.clock = clock
        self.divert = divert
        self.inbound_filter = inbound_filter
        self.framed = framed
        self._framed_run: Callable[..., Sequence[ReceivedLike] | None] | None = (
            getattr(device, "receive_run", None) if framed else None)
        self.lock = threading.Lock()
        self.counters = Counters()
        # UDP GSO/GRO (see _send_gso/_drain_udp): fewer syscalls per packet, where available
        self._gso = offload and _try_udp_option(sock, UDP_SEGMENT, 0)
        self._gro = offload and _try_udp_option(sock, UDP_GRO, 1)
        self._v6 = sock.family == socket.AF_INET6
        self._ep_out: dict[Hashable, Any] = {}  # endpoint -> sockaddr
        self._ep_in: dict[Any, tuple[str, int]] = {}  # sockaddr -> endpoint
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stopping = threading.Event()
        self._timer_kick = threading.Event()
        self._threads: list[threading.Thread] = []
        self._errors_logged: collections.Counter[str] = collections.Counter()
        self._load_window_start = 0.0
        self._load_initiations = 0
        self._load_until = 0.0
        self._extra: dict[int, _Extra] = {}  # fd -> extra socket; replaced whole on change
        self._extra_gen = 0

    # ---- control side -------------------------------------------------------------------------
    def start(self) -> None:
        if self._threads:
            raise RuntimeError("datapath already started")
        self.sock.setblocking(True)  # sends block (backpressure); receives use MSG_DONTWAIT
        os.set_blocking(self.tun.fileno(), False)
        loops: list[tuple[str, Callable[[], None]]] = [("timers", self._timer_loop)]
        if self.threads == 2:
            loops += [("outbound", self._outbound_loop), ("inbound", self._inbound_loop)]
        else:
            loops += [("io", self._single_loop)]
        for name, fn in loops:
            t = threading.Thread(target=self._guard, args=(name, fn), name=f"wg-{name}",
                                 daemon=True)
            self._threads.append(t)
            t.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the threads (idempotent). Does not close the TUN or the socket: the owner does."""
        self._stopping.set()
        self._timer_kick.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        for t in self._threads:
            t.join(timeout)
        self._threads.clear()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_r = self._wake_w = -1

    def add_socket(self, sock: socket.socket, source: Callable[[Any], Any] | None = None,
                   divert: Callable[[bytes, tuple[str, int]], bool] | None = None) -> None:
        """Also receive from ``sock`` (any thread). ``source((ip, port))`` is the endpoint the
        core sees for a datagram from ``(ip, port)`` (default: that tuple); ``divert`` sees its
        non-WireGuard datagrams (with the plain ``(ip, port)``) like the main socket's hook."""
        extra = dict(self._extra)
        extra[sock.fileno()] = _Extra(sock, source, divert)
        self._set_extra(extra)

    def remove_socket(self, sock: socket.socket) -> None:
        """Stop receiving from ``sock`` (before the owner closes it)."""
        extra = {fd: e for fd, e in self._extra.items() if e.sock is not sock}
        if len(extra) != len(self._extra):
            self._set_extra(extra)

    def _set_extra(self, extra: dict[int, _Extra]) -> None:
        self._extra = extra  # one reference swap: the loop reads it without the lock
        self._extra_gen += 1
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"e")

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def call(self, fn: Callable[[Any, float], T]) -> T:
        """Run ``fn(device, now)`` under the device lock (peer changes, status), then re-arm timers.

        A returned list of transmits is NOT sent automatically; pass it to :meth:`transmit`.
        """
        with self.lock:
            result = fn(self.device, self.clock())
        self._timer_kick.set()
        return result

    def transmit(self, transmits: Sequence[TransmitLike]) -> None:
        """Send datagrams the core produced outside the loops (e.g. ``initiate_handshake``)."""
        self._send_all(transmits, self.counters)

    def under_load(self) -> bool:
        """For ``Device(under_load=...)``: True while handshake initiations arrive faster than
        UNDER_LOAD_INITIATIONS per LOAD_WINDOW (and LOAD_WINDOW after), so the core demands
        cookies (mac2) before spending Curve25519 work. Called by the core under the lock."""
        return self.clock() < self._load_until

    def _note_initiations(self, count: int, now: float) -> None:
        if now - self._load_window_start > LOAD_WINDOW:
            self._load_window_start = now
            self._load_initiations = 0
        self._load_initiations += count
        if self._load_initiations >= UNDER_LOAD_INITIATIONS:
            if self._load_until < now:
                log.warning("under load: %d handshake initiations within %.1f s; demanding "
                            "cookies", self._load_initiations, LOAD_WINDOW)
            self._load_until = now + LOAD_WINDOW

    @property
    def offloads(self) -> dict[str, bool]:
        """Which UDP offloads are in use (for logs and benchmarks)."""
        return {"gso": self._gso, "gro": self._gro}

    def stats(self) -> dict[str, int]:
        """Datapath counters plus the core's drop reasons (prefixed ``core_drop_``)."""
        d = self.counters.as_dict()
        drops = getattr(self.device, "drops", None)
        if drops is not None:
            with self.lock:
                d.update({f"core_drop_{k}": int(v) for k, v in dict(drops).items()})
        return d

    # ---- endpoints ----------------------------------------------------------------------------
    def _sockaddr(self, endpoint: Hashable) -> Any:
        sa = self._ep_out.get(endpoint)
        if sa is None:
            if not isinstance(endpoint, tuple) or len(endpoint) < 2:
                raise ValueError("endpoint must be (ip, port)")
            ip, port = str(endpoint[0]), int(endpoint[1])
            if self._v6 and ":" not in ip:
                ip = V4_MAPPED + ip
            sa = (ip, port)
            if len(self._ep_out) >= ENDPOINT_CACHE_MAX:
                self._ep_out.clear()
            self._ep_out[endpoint] = sa
        return sa

    def _endpoint(self, addr: Any) -> tuple[str, int]:
        ep = self._ep_in.get(addr)
        if ep is None:
            ip: str = addr[0]
            if ip.startswith(V4_MAPPED) and "." in ip:
                ip = ip[len(V4_MAPPED) :]
            ep = (ip, addr[1])
            if len(self._ep_in) >= ENDPOINT_CACHE_MAX:
                self._ep_in.clear()
            self._ep_in[addr] = ep
        return ep

    # ---- loops --------------------------------------------------------------------------------
    def _guard(self, name: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:  # a bug in a loop must not kill the process silently
            log.exception("datapath %s thread died", name)
            self.counters.drops[f"{name}_thread_died"] += 1

    def _count_error(self, reason: str, e: BaseException) -> None:
        self.counters.drops[reason] += 1
        self._errors_logged[reason] += 1
        n = self._errors_logged[reason]
        if n & (n - 1) == 0:  # log the 1st, 2nd, 4th, 8th... occurrence: visible, not a flood
            log.warning("datapath: %s (%d so far): %s: %s", reason, n, type(e).__name__, e)

    def _send_all(self, transmits: Sequence[TransmitLike], c: Counters) -> None:
        if self._gso and len(transmits) > 1:
            self._send_gso(transmits, c)
            return
        sendto = self.sock.sendto
        for tx in transmits:
            pre: bytes | None = getattr(tx.endpoint, "relay_hdr", None)  # see _send_gso
            try:
                n = sendto(tx.data if pre is None else pre + tx.data, self._sockaddr(tx.endpoint))
            except (OSError, ValueError, TypeError) as e:
                self._count_error("udp_send_error", e)
                continue
            c.udp_tx_packets += 1
            c.udp_tx_bytes += n
            if pre is not None:
                c.relay_tx_packets += 1
                c.relay_tx_bytes += n

    def _send_gso(self, transmits: Sequence[TransmitLike], c: Counters) -> None:
        """UDP GSO: a run of datagrams to one endpoint, all of one size (the last may be shorter),
        leaves in ONE sendmsg with a UDP_SEGMENT cmsg; the kernel cuts it into datagrams. During
        bulk transfer nearly every datagram is full-size, so this removes most send syscalls."""
        sendto, sendmsg = self.sock.sendto, self.sock.sendmsg
        i, count = 0, len(transmits)
        while i < count:
            first = transmits[i]
            ep, size = first.endpoint, len(first.data)
            # an endpoint with a ``relay_hdr`` (magicsock.route.PeerEndpoint on a peer relay):
            # every datagram of the run leaves with that header in front; looked up once per
            # run and joined into the one GSO buffer, so relayed sends cost no extra copy and
            # no per-datagram Python beyond the join
            pre: bytes | None = getattr(ep, "relay_hdr", None)
            seg_size = size if pre is None else size + len(pre)  # on the wire
            limit = min(GSO_MAX_SEGMENTS, GSO_MAX_BYTES // seg_size) if seg_size else 1
            j = i + 1
            while j < count and j - i < limit:
                t = transmits[j]
                ln = len(t.data)
                if ln > size or (t.endpoint is not ep and t.endpoint != ep):
                    break
                j += 1
                if ln < size:
                    break  # a shorter datagram can only end a run
            try:
                sa = self._sockaddr(ep)
                if j - i == 1:
                    n = sendto(first.data if pre is None else pre + first.data, sa)
                else:
                    seg = [(SOL_UDP, UDP_SEGMENT, seg_size.to_bytes(2, sys.byteorder))]
                    run = transmits[i:j]
                    buf = (b"".join([t.data for t in run]) if pre is None
                           else b"".join([x for t in run for x in (pre, t.data)]))
                    n = sendmsg([buf], seg, 0, sa)
            except (OSError, ValueError, TypeError) as e:
                if j - i > 1 and isinstance(e, OSError) and e.errno in _GSO_UNSUPPORTED:
                    # the path cannot do GSO after all: plain sends from now on
                    log.info("UDP GSO send failed (%s); disabling it", e)
                    self._gso = False
                    self._send_all(transmits[i:], c)
                    return
                self._count_error("udp_send_error", e)
                i = j
                continue
            c.udp_tx_packets += j - i
            c.udp_tx_bytes += n
            if pre is not None:
                c.relay_tx_packets += j - i
                c.relay_tx_bytes += n
            i = j

    def _drain_tun(self) -> int:
        """Read up to BATCH packets from TUN, encrypt them under one lock hold, send them."""
        fd = self.tun.fileno()
        read = os.read
        pkts: list[bytes] = []
        try:
            while len(pkts) < BATCH:
                pkts.append(read(fd, RECV_BUFSIZE))
        except BlockingIOError:
            pass
        except OSError as e:
            self._count_error("tun_read_error", e)
        if not pkts:
            return 0
        c = self.counters
        out: list[TransmitLike] = []
        dev = self.device
        with self.lock:
            now = self.clock()
            for p in pkts:
                try:
                    out.extend(dev.send_packet(p, now))
                except Exception as e:
                    self._count_error("core_send_error", e)
        c.tun_rx_packets += len(pkts)
        c.tun_rx_bytes += sum(map(len, pkts))
        self._send_all(out, c)
        return len(pkts)

    def _drain_udp(self, bufs: list[bytearray], views: list[memoryview],
                   extra: _Extra | None = None) -> int:
        """Receive up to BATCH datagrams, decrypt under one lock hold, write packets to TUN.

        With UDP GRO one receive may return several datagrams of ``seg`` bytes back to back (the
        last may be shorter); they are handed to the core one by one as memoryview slices.
        ``extra``: drain that extra socket instead of the main one.
        """
        got: list[tuple[int, Any, int]] = []  # (bytes, source, segment size)
        try:
            if extra is None:
                recv_batch(self.sock, bufs, self._gro, got)
            else:
                recv_batch(extra.sock, bufs, False, got)
        except BlockingIOError:
            pass
        except OSError as e:
            if extra is not None and e.errno == errno.EBADF:
                # closed by its owner after remove_socket; this thread had not rebuilt its
                # poll set yet: expected, not worth a warning
                self.counters.drops["extra_socket_closed"] += 1
            else:
                self._count_error("udp_recv_error", e)
        if not got:
            return 0
        c = self.counters
        dev = self.device
        endpoint = self._endpoint
        remap = None if extra is None else extra.source
        to_tun: list[bytes] = []
        out: list[TransmitLike] = []
        nbytes = 0
        ndgrams = 0
        divert = self.divert if extra is None else extra.divert
        framed = self.framed if extra is None else b""  # spray sockets: no relay framing
        flen = len(framed)
        flt = self.inbound_filter
        run = self._framed_run if extra is None else None
        results: list[ReceivedLike] = []
        with self.lock:
            now = self.clock()
            for i, (total, addr, seg) in enumerate(got):
                nbytes += total
                if total == 0:
                    c.drops["empty_datagram"] += 1
                    continue
                source = endpoint(addr)
                view = views[i]
                all_framed = 0
                if flen and seg < total and view[:flen] == framed:
                    # a GRO receive of framed datagrams (a bulk flow through a peer relay): the
                    # device may take it whole; else one check of every segment's prefix
                    # instead of a slice and compare per segment
                    if run is not None:
                        try:
                            rs = run(view, total, seg, source, now)
                        except Exception as e:
                            self._count_error("core_receive_error", e)
                            rs = ()
                        if rs is not None:
                            ndgrams += -(-total // seg)
                            results += rs
                            continue
                    all_framed = same_heads(view, total, seg, flen)
                for off in range(0, total, seg):
                    end = off + seg
                    d = view[off : end if end < total else total]
                    n = len(d)
                    ndgrams += 1
                    if divert is not None and not 1 <= d[0] <= 4 and not all_framed and (
                            not flen or d[:flen] != framed):
                        try:
                            if divert(bytes(d), source):
                                continue
                        except Exception as e:
                            self._count_error("divert_error", e)
                            continue
                    if n == INITIATION_SIZE and d[0] == INITIATION_TYPE:
                        self._note_initiations(1, now)  # before the core asks under_load()
                    try:
                        r = dev.receive(d, source if remap is None else remap(source), now)
                    except Exception as e:
                        self._count_error("core_receive_error", e)
                        continue
                    results.append(r)
            for r in results:
                if r.packets:
                    if flt is None:
                        to_tun.extend(r.packets)
                    else:
                        peer = getattr(r, "peer", None)
                        for p in r.packets:
                            try:
                                ok = flt(p, peer)
                            except Exception as e:
                                self._count_error("filter_error", e)
                                ok = False
                            if ok:
                                to_tun.append(p)
                            else:
                                c.drops["filtered"] += 1
                if r.transmits:
                    out.extend(r.transmits)
        c.udp_rx_packets += ndgrams
        c.udp_rx_bytes += nbytes
        fd = self.tun.fileno()
        write = os.write
        for p in to_tun:
            try:
                write(fd, p)
            except BlockingIOError:
                c.drops["tun_full"] += 1
                continue
            except OSError as e:
                self._count_error("tun_write_error", e)
                continue
            c.tun_tx_packets += 1
            c.tun_tx_bytes += len(p)
        if out:
            self._send_all(out, c)
        return len(got)

    def _udp_buffers(self) -> tuple[list[bytearray], list[memoryview]]:
        bufs = [bytearray(RECV_BUFSIZE) for _ in range(BATCH)]
        return bufs, [memoryview(b) for b in bufs]

    def _outbound_loop(self) -> None:
        poller = select.poll()
        poller.register(self.tun.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        stopping = self._stopping.is_set
        drain = self._drain_tun
        while not stopping():
            poller.poll()
            while drain() == BATCH and not stopping():
                pass

    def _poller(self, fds: Sequence[int]) -> tuple[Any, int, dict[int, _Extra]]:
        """A poll set of ``fds``, the wake pipe and the extra sockets; drains the wake pipe
        first, so a change made after this is seen at the next generation compare."""
        with contextlib.suppress(OSError):  # ends with BlockingIOError once the pipe is empty
            while os.read(self._wake_r, 4096):
                pass
        if self._stopping.is_set():
            # the drained bytes may include stop()'s wake-up, which every thread polling the pipe
            # needs (the outbound thread blocks on it too): put one back. stop() sets the flag
            # before it writes, so a stop is never lost.
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")
        gen, extra = self._extra_gen, self._extra
        poller = select.poll()
        for fd in (*fds, self._wake_r, *extra):
            poller.register(fd, select.POLLIN)
        return poller, gen, extra

    def _drain_extras(self, ready: set[int], extra: dict[int, _Extra], bufs: list[bytearray],
                      views: list[memoryview]) -> bool:
        """Drain the extra sockets poll reported; True while one still has more queued."""
        for fd in list(ready):
            e = extra.get(fd)
            if e is None or self._drain_udp(bufs, views, e) < BATCH:
                ready.discard(fd)
        return bool(ready)

    def _inbound_loop(self) -> None:
        poller, gen, extra = self._poller([self.sock.fileno()])
        bufs, views = self._udp_buffers()
        stopping = self._stopping.is_set
        drain = self._drain_udp
        ready: set[int] = set()
        while not stopping():
            events = poller.poll(0 if ready else None)
            if extra:
                ready |= {fd for fd, ev in events if fd in extra and ev & select.POLLIN}
            while drain(bufs, views) == BATCH and not stopping():
                pass
            if ready:
                self._drain_extras(ready, extra, bufs, views)
            if self._extra_gen != gen:
                poller, gen, extra = self._poller([self.sock.fileno()])
                ready = set(extra)

    def _single_loop(self) -> None:
        fds = [self.tun.fileno(), self.sock.fileno()]
        poller, gen, extra = self._poller(fds)
        bufs, views = self._udp_buffers()
        stopping = self._stopping.is_set
        ready: set[int] = set()
        while not stopping():
            # both directions every round (a would-block read is cheap), so neither starves
            busy = self._drain_tun() == BATCH
            busy = self._drain_udp(bufs, views) == BATCH or busy
            if ready:
                busy = self._drain_extras(ready, extra, bufs, views) or busy
            if self._extra_gen != gen:
                poller, gen, extra = self._poller(fds)
                ready = set(extra)  # whatever arrived meanwhile
                continue
            if not busy:
                events = poller.poll()
            elif extra:
                events = poller.poll(0)  # busy main socket: extra sockets are not starved
            else:
                continue
            if extra:
                ready |= {fd for fd, ev in events if fd in extra and ev & select.POLLIN}

    def _timer_loop(self) -> None:
        kick = self._timer_kick
        while not self._stopping.is_set():
            with self.lock:
                now = self.clock()
                deadline = self.device.next_deadline()
                transmits: Sequence[TransmitLike] = ()
                if deadline is not None and deadline <= now:
                    try:
                        transmits = self.device.tick(now)
                    except Exception as e:
                        self._count_error("core_tick_error", e)
                    deadline = self.device.next_deadline()
            if transmits:
                self._send_all(transmits, self.counters)
            wait = TIMER_GRANULARITY if deadline is None else deadline - now
            # a deadline still in the past after tick() would spin: wait at least 1 ms
            kick.wait(min(max(wait, 0.001), TIMER_GRANULARITY))
            kick.clear()
