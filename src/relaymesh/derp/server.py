"""The DERP server: relays sealed packets between nodes over TCP, addressed by node key.

One TCP port (optionally TLS) speaks a tiny HTTP/1.1 by hand on an asyncio ``Protocol``:

- ``GET /derp`` with ``Upgrade: derp`` -> ``101 Switching Protocols``, then DERP frames
  (:mod:`relaymesh.derp.frames`) on the same stream;
- ``GET /derp/probe`` -> 200 (keep-alive), for clients measuring latency to pick a home region;
- ``GET /metrics`` -> Prometheus text (unless a separate metrics listener is configured);
- ``GET /`` -> a one-line banner; anything else 404/405/426.

Why by hand and not aiohttp: after the upgrade every byte is a DERP frame, and owning the
Protocol lets ``data_received`` parse frames and write the rewritten frame straight into the
destination's transport: no stream objects, tasks or queues per packet.

Order of a connection: HTTP upgrade -> server-key (challenge) -> client-info (the client proves
it holds its node key) -> admission (the key must be in the tailnet, or the client presented the
mesh key) -> server-info -> frames. Nothing a client sends before the proof is acted on.

Forwarding: a send-packet (dst, packet) from client S becomes recv-packet (S's authenticated key,
packet) on the destination's connection, so no client can send as another key. The destination
is a local client, or a key a mesh peer announced (sent on as forward-packet over that peer's
link). Each client has a bounded queue used only while its transport is over the write
high-water mark: full -> the oldest queued frame is dropped (counted ``queue_full``).

Timers (``DerpServerConfig``): keep-alive every 60 s (below common NAT/load-balancer idle
timeouts of 2-5 min), 10 s to finish HTTP + handshake (a slow client must not hold a slot).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import struct
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from relaymesh.derp import frames as F
from relaymesh.derp.admission import Admission, AllowAll
from relaymesh.derp.metrics import DerpMetrics, DropReason, EvictReason, RefuseReason
from relaymesh.keys import NodeKey, PrivateKey

if TYPE_CHECKING:
    from relaymesh.derp.mesh import MeshLink
    from relaymesh.stunserver import StunServer

log = logging.getLogger(__name__)

KEEPALIVE_INTERVAL_S = 60.0  # keeps NAT/LB idle timers (2-5 min) from expiring quiet clients
HANDSHAKE_TIMEOUT_S = 10.0  # HTTP request + key proof must finish within this
MAX_HTTP_HEAD = 8192  # request line + headers; larger is an attack or a mistake
DEFAULT_QUEUE_LEN = 128  # frames queued per client beyond the transport buffer (~180 KB of 1400 B)
WRITE_HIGH_WATER = 256 * 1024  # transport buffer before a client counts as slow (then: queue)
EVICT_GRACE_S = 2.0  # after close(), abort a transport that still has not flushed
RESTART_RECONNECT_MS = 200  # told to clients on shutdown: come back soon, the server restarts
RESTART_TRY_FOR_MS = 60_000  # ... and keep trying this long
NOT_HERE_MEMORY = 256  # per-client "peer not here" notices remembered (bounded)
DEFAULT_BURST_MIN = F.MAX_PACKET_SIZE + 2 * 32  # the bucket must fit the largest frame

_HTTP, _HANDSHAKE, _READY, _CLOSED = range(4)
_HDR = struct.Struct(">BI")  # frame header: type, payload length (frames module docstring)
_HDR_LEN = F.FRAME_HEADER_LEN
_MAX_FRAME = F.MAX_FRAME_LEN
_MAX_PACKET = F.MAX_PACKET_SIZE
_KEY_LEN = 32
_SEND = int(F.FrameType.SEND_PACKET)
_RECV = int(F.FrameType.RECV_PACKET)
_KEEPALIVE = F.encode_frame(F.KeepAlive())


@dataclass
class DerpServerConfig:
    queue_len: int = DEFAULT_QUEUE_LEN
    rate_limit: int = 0  # bytes/s a client may send; 0 = unlimited
    rate_burst: int = 0  # bucket size; 0 = max(rate_limit, DEFAULT_BURST_MIN)
    keepalive_interval: float = KEEPALIVE_INTERVAL_S
    handshake_timeout: float = HANDSHAKE_TIMEOUT_S
    mesh_key: str | None = None
    mesh_with: list[str] = field(default_factory=list)
    serve_metrics: bool = True  # /metrics on the DERP port (off when a metrics listener exists)

    @property
    def burst(self) -> int:
        return self.rate_burst or max(self.rate_limit, DEFAULT_BURST_MIN)


class TokenBucket:
    """Byte token bucket (sans-IO: the caller passes ``now`` in seconds)."""

    __slots__ = ("burst", "last", "rate", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.last = now

    def take(self, n: int, now: float) -> bool:
        t = self.tokens + (now - self.last) * self.rate
        if t > self.burst:
            t = self.burst
        self.last = now
        if n > t:
            self.tokens = t
            return False
        self.tokens = t - n
        return True


class _Conn(asyncio.Protocol):
    """One TCP connection: HTTP, then handshake, then DERP frames."""

    def __init__(self, server: DerpServer, metrics_only: bool = False) -> None:
        self.server = server
        self.metrics_only = metrics_only
        self.transport: asyncio.Transport | None = None
        self.state = _HTTP
        self._http = bytearray()
        self.buf = bytearray()  # received bytes not yet parsed into frames
        self.key_raw = b""
        self.hs: F.ServerHandshake | None = None
        self.key: NodeKey | None = None
        self.is_mesh = False
        self.preferred = False
        self.paused = False
        self.queue: deque[tuple[bytes, int]] = deque()
        self.out: list[bytes] = []  # collected during a batch, see deliver()
        self.out_pkts = 0
        self.out_bytes = 0
        self.bucket: TokenBucket | None = None
        self.last_dst: object = None  # cache: skip the senders-set update for a repeat dst
        self.not_here: set[NodeKey] = set()
        self._timer: asyncio.TimerHandle | None = None
        self.peer = ""

    # ---- asyncio callbacks -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self.peer = str(transport.get_extra_info("peername"))
        srv = self.server
        srv.metrics.connections += 1
        srv._conns.add(self)
        self._timer = srv._loop.call_later(srv.config.handshake_timeout, self._handshake_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = _CLOSED
        if self._timer is not None:
            self._timer.cancel()
        self.queue.clear()
        self.server._conns.discard(self)
        self.server._unregister(self)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        q, t, m = self.queue, self.transport, self.server.metrics
        assert t is not None
        while q and not self.paused:
            frame, n = q.popleft()
            t.write(frame)
            if n >= 0:
                m.forwarded_local += 1
                m.forwarded_local_bytes += n

    def data_received(self, data: bytes) -> None:
        if self.state == _READY or self.state == _HANDSHAKE:
            self._frames(data)
        elif self.state == _HTTP:
            self._http += data
            self._handle_http()

    # ---- output ------------------------------------------------------------------------------

    def deliver(self, frame: bytes, n: int) -> None:
        """Write a frame, or queue it while the transport is over its high-water mark.

        ``n`` is the packet size for forwarding counters, -1 for control frames. While the
        server handles one read's worth of frames (``_batching``), frames for each destination
        are collected and written with one ``write`` at the end of the batch: one send(2) per
        destination per read instead of one per packet (the dominant cost otherwise).
        """
        if not self.paused:
            srv = self.server
            if srv._batching:
                if not self.out:
                    srv._dirty.append(self)
                self.out.append(frame)
                if n >= 0:
                    self.out_pkts += 1
                    self.out_bytes += n
                return
            t = self.transport
            assert t is not None
            if t.is_closing():  # lost, connection_lost() not yet run: writing would log spam
                if n >= 0:
                    srv.metrics.drops[DropReason.DEST_CLOSING] += 1
                return
            t.write(frame)
            if n >= 0:
                m = srv.metrics
                m.forwarded_local += 1
                m.forwarded_local_bytes += n
            return
        q = self.queue
        if len(q) >= self.server.config.queue_len:
            q.popleft()
            self.server.metrics.drops[DropReason.QUEUE_FULL] += 1
        q.append((frame, n))

    def flush(self) -> None:
        """Write what ``deliver`` collected during a batch."""
        out, pkts, nbytes = self.out, self.out_pkts, self.out_bytes
        if not out:
            return
        self.out, self.out_pkts, self.out_bytes = [], 0, 0
        t = self.transport
        m = self.server.metrics
        if t is None or t.is_closing():
            m.drops[DropReason.DEST_CLOSING] += pkts
            return
        t.write(out[0] if len(out) == 1 else b"".join(out))
        m.forwarded_local += pkts
        m.forwarded_local_bytes += nbytes

    def close(self, problem: str | None = None) -> None:
        """Close after telling the client why (health frame); abort if it never flushes."""
        if self.state == _CLOSED or self.transport is None:
            return
        t = self.transport
        if problem is not None and self.state in (_HANDSHAKE, _READY):
            t.write(F.encode_frame(F.Health(problem)))
        self.state = _CLOSED
        self.queue.clear()
        t.close()
        self.server._loop.call_later(EVICT_GRACE_S, t.abort)

    def refuse(self, reason: RefuseReason, problem: str) -> None:
        self.server.metrics.refused[reason] += 1
        log.info("refused %s (%s): %s", self.peer, reason.value, problem)
        self.close(problem)

    def _handshake_timeout(self) -> None:
        self._timer = None
        if self.state in (_HTTP, _HANDSHAKE):
            self.refuse(RefuseReason.HANDSHAKE_TIMEOUT, "handshake timeout")

    # ---- HTTP --------------------------------------------------------------------------------

    def _respond(self, status: str, body: bytes = b"", ctype: str = "text/plain; charset=utf-8",
                 extra: str = "", close: bool = False) -> None:
        assert self.transport is not None
        head = (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                f"{extra}{'Connection: close' + chr(13) + chr(10) if close else ''}\r\n")
        self.transport.write(head.encode("latin-1") + body)
        if close:
            self.state = _CLOSED
            self.transport.close()

    def _bad_http(self, status: str, why: str) -> None:
        self.server.metrics.refused[RefuseReason.BAD_HTTP] += 1
        log.debug("bad HTTP from %s: %s", self.peer, why)
        self._respond(status, why.encode() + b"\n", close=True)

    def _handle_http(self) -> None:
        while self.state == _HTTP:
            end = self._http.find(b"\r\n\r\n")
            if end < 0:
                if len(self._http) > MAX_HTTP_HEAD:
                    self._bad_http("431 Request Header Fields Too Large", "request head too long")
                return
            head = bytes(self._http[:end]).decode("latin-1")
            rest = bytes(self._http[end + 4 :])
            self._http.clear()
            lines = head.split("\r\n")
            parts = lines[0].split(" ")
            if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
                self._bad_http("400 Bad Request", "bad request line")
                return
            method, target, version = parts
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if not sep or not name or name != name.strip():
                    self._bad_http("400 Bad Request", "bad header line")
                    return
                headers[name.lower()] = value.strip()
            if headers.get("content-length", "0") != "0" or "transfer-encoding" in headers:
                self._bad_http("400 Bad Request", "request bodies are not accepted")
                return
            if method != "GET":
                self._respond("405 Method Not Allowed", b"GET only\n", extra="Allow: GET\r\n",
                              close=True)
                return
            path = target.split("?", 1)[0]
            keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
            if path == "/derp" and not self.metrics_only:
                self._upgrade(headers, rest)
                return
            if path == "/derp/probe" and not self.metrics_only:
                self._respond("200 OK", close=not keep)
            elif path == "/metrics" and (self.metrics_only or self.server.config.serve_metrics):
                self._respond("200 OK", self.server.metrics_text().encode(),
                              ctype="text/plain; version=0.0.4; charset=utf-8", close=not keep)
            elif path == "/":
                self._respond("200 OK", b"relaymesh DERP server\n", close=not keep)
            else:
                self._respond("404 Not Found", b"not found\n", close=not keep)
            self._http += rest

    def _upgrade(self, headers: dict[str, str], rest: bytes) -> None:
        assert self.transport is not None
        if headers.get("upgrade", "").lower() != "derp":
            self.server.metrics.refused[RefuseReason.NO_UPGRADE] += 1
            self._respond("426 Upgrade Required", b"this endpoint needs Upgrade: derp\n",
                          extra="Upgrade: derp\r\n", close=True)
            return
        srv = self.server
        self.hs = F.ServerHandshake(srv.private, os.urandom(F.CHALLENGE_LEN), srv._server_info,
                                    srv.config.mesh_key)
        self.state = _HANDSHAKE
        self.transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: derp\r\nConnection: Upgrade\r\n\r\n"
            + self.hs.start())
        if rest:
            self._frames(rest)

    # ---- frames ------------------------------------------------------------------------------

    def _frames(self, data: bytes) -> None:
        """Parse every whole frame in the buffer and act on it (one batch, see deliver()).

        The frame layout and payload checks are ``frames.decode_frame``'s; only send-packet,
        nearly every frame on a busy server, is recognised here from its header without
        building a ``SendPacket`` and ``NodeKey`` (about a third of the per-packet CPU).
        """
        buf = self.buf
        buf += data
        srv = self.server
        srv._batching = True
        pos = 0
        end = len(buf)
        try:
            while self.state == _READY or self.state == _HANDSHAKE:
                if end - pos < _HDR_LEN:
                    break
                ftype, length = _HDR.unpack_from(buf, pos)
                if length > _MAX_FRAME:
                    raise F.FrameError(f"frame of {length} bytes exceeds {_MAX_FRAME}")
                stop = pos + _HDR_LEN + length
                if stop > end:
                    break
                if ftype == _SEND and self.state == _READY:
                    if length < _KEY_LEN or length - _KEY_LEN > _MAX_PACKET:
                        raise F.FrameError(f"send-packet of {length} bytes")
                    start = pos + _HDR_LEN
                    pos = stop
                    srv._forward(self, bytes(buf[start : start + _KEY_LEN]),
                                 bytes(buf[start + _KEY_LEN : stop]))
                    continue
                f = F.decode_frame(ftype, bytes(buf[pos + _HDR_LEN : stop]))
                pos = stop
                if self.state == _HANDSHAKE:
                    self._handshake(f)
                else:
                    self._control(f)
        except F.HandshakeError as e:
            self.refuse(RefuseReason.HANDSHAKE, f"handshake failed: {e}")
        except (F.FrameError, ValueError) as e:  # ValueError: a key or address the codec refused
            self.refuse(RefuseReason.BAD_FRAME if self.state == _READY else RefuseReason.HANDSHAKE,
                        f"bad frame: {e}")
        finally:
            if self.state == _CLOSED:
                buf.clear()
            elif pos:
                del buf[:pos]
            srv._batching = False
            dirty = srv._dirty
            if dirty:
                srv._dirty = []
                for c in dirty:
                    c.flush()

    def _handshake(self, f: F.Frame) -> None:
        assert self.hs is not None and self.transport is not None
        reply = self.hs.receive(f)  # raises HandshakeError: no proof, no service
        key = self.hs.client_key
        assert key is not None
        srv = self.server
        if not self.hs.is_mesh_peer and not srv.admission.allowed(key):
            self.refuse(RefuseReason.NOT_ADMITTED, "not admitted: node key not in the tailnet")
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.key = key
        self.key_raw = key.raw
        self.is_mesh = self.hs.is_mesh_peer
        if srv.config.rate_limit > 0 and not self.is_mesh:
            self.bucket = TokenBucket(srv.config.rate_limit, srv.config.burst, srv._loop.time())
        self.state = _READY
        self.transport.write(reply)
        srv._register(self)

    def _control(self, f: F.Frame) -> None:
        srv = self.server
        t = type(f)
        if t is F.ForwardPacket:
            assert isinstance(f, F.ForwardPacket)
            if self.is_mesh:
                srv._from_mesh(f.src, f.dst, f.packet)
            else:
                srv.metrics.drops[DropReason.NOT_MESH_PEER] += 1
        elif t is F.Ping:
            assert isinstance(f, F.Ping)
            self.deliver(F.encode_frame(F.Pong(f.data)), -1)
        elif t is F.KeepAlive or t is F.Pong:
            pass
        elif t is F.NotePreferred:
            assert isinstance(f, F.NotePreferred)
            self.preferred = f.preferred
        elif t is F.WatchConns:
            if self.is_mesh:
                srv._watch(self)
            else:
                srv.metrics.drops[DropReason.NOT_MESH_PEER] += 1
        else:  # server-only frames, or types this version does not know: skip, counted
            srv.metrics.drops[DropReason.UNEXPECTED_FRAME] += 1


class DerpServer:
    """A DERP server bound to the running event loop (construct it inside that loop).

    ``await start(host, port)``, optionally ``start_stun``/``start_metrics``/``add_mesh_peer``,
    then ``await close()``.
    """

    def __init__(self, private: PrivateKey, admission: Admission | None = None,
                 config: DerpServerConfig | None = None) -> None:
        self.private = private
        self.key = private.node_public()
        self.admission = admission or AllowAll()
        self.config = config or DerpServerConfig()
        self.metrics = DerpMetrics()
        self._server_info = F.ServerInfoPayload(
            token_bucket_bytes_per_second=self.config.rate_limit,
            token_bucket_bytes_burst=self.config.burst if self.config.rate_limit else 0)
        self._clients: dict[NodeKey, _Conn] = {}
        self._by_raw: dict[bytes, _Conn] = {}  # the same, keyed by raw key: the hot path's map
        self._mesh_conns: set[_Conn] = set()
        self._watchers: set[_Conn] = set()
        self._conns: set[_Conn] = set()
        self._senders: dict[NodeKey, set[NodeKey]] = {}  # dst -> local srcs that sent to it
        self._remote: dict[NodeKey, MeshLink] = {}
        self._batching = False  # inside _Conn._frames: deliver() collects, flush() writes
        self._dirty: list[_Conn] = []
        self._links: list[MeshLink] = []
        self._servers: list[asyncio.Server] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.stun: StunServer | None = None
        self._loop = asyncio.get_running_loop()  # construct inside the loop that serves
        self.address: tuple[str, int] | None = None
        self.admission.subscribe(self._on_admission_change)

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0,
                    ssl_context: ssl.SSLContext | None = None) -> tuple[str, int]:
        """Listen for DERP clients; returns the bound (host, port). Starts admission and mesh."""
        self._loop = asyncio.get_running_loop()
        await self.admission.start()
        srv = await self._loop.create_server(lambda: _Conn(self), host, port, ssl=ssl_context,
                                             reuse_address=True)
        self._servers.append(srv)
        sock = srv.sockets[0].getsockname()
        self.address = (str(sock[0]), int(sock[1]))
        self._tasks.append(asyncio.create_task(self._keepalive_loop()))
        for url in self.config.mesh_with:
            self.add_mesh_peer(url)
        return self.address

    def add_mesh_peer(self, url: str) -> None:
        """Dial another server of this region (needs ``config.mesh_key``)."""
        from relaymesh.derp.mesh import MeshLink

        if not self.config.mesh_key:
            raise ValueError("meshing needs a mesh key")
        link = MeshLink(self, url, self.config.mesh_key)
        self._links.append(link)
        link.start()

    async def start_metrics(self, host: str, port: int) -> tuple[str, int]:
        """A separate listener for /metrics only; /metrics leaves the DERP port."""
        self.config.serve_metrics = False
        srv = await self._loop.create_server(lambda: _Conn(self, metrics_only=True), host, port,
                                             reuse_address=True)
        self._servers.append(srv)
        sock = srv.sockets[0].getsockname()
        return str(sock[0]), int(sock[1])

    async def start_stun(self, host: str, port: int) -> tuple[str, int]:
        from relaymesh.stunserver import start_stun_server

        self.stun = await start_stun_server(host, port)
        return self.stun.address

    async def close(self, restarting: bool = True) -> None:
        """Stop listening, tell clients (restarting frame) and close every connection."""
        for s in self._servers:
            s.close()
        for task in self._tasks:
            task.cancel()
        for link in self._links:
            await link.close()
        self._links.clear()
        frame = F.encode_frame(F.Restarting(RESTART_RECONNECT_MS, RESTART_TRY_FOR_MS))
        for c in list(self._conns):
            if restarting and c.state == _READY and c.transport is not None:
                c.transport.write(frame)
            c.close()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        for s in self._servers:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(s.wait_closed(), 1.0)
        self._servers.clear()
        for c in list(self._conns):
            if c.transport is not None:
                c.transport.abort()
        if self.stun is not None:
            self.stun.close()
            self.stun = None
        await self.admission.close()

    async def _keepalive_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.keepalive_interval)
            for c in [*self._clients.values(), *self._mesh_conns]:
                c.deliver(_KEEPALIVE, -1)

    # ---- registry ----------------------------------------------------------------------------

    @property
    def client_keys(self) -> list[NodeKey]:
        return list(self._clients)

    def _register(self, conn: _Conn) -> None:
        key = conn.key
        assert key is not None
        if conn.is_mesh:
            self._mesh_conns.add(conn)
            return
        old = self._clients.get(key)
        if old is not None:
            self.metrics.evictions[EvictReason.REPLACED] += 1
            old.close("replaced by a newer connection with the same node key")
        self._clients[key] = conn
        self._by_raw[key.raw] = conn
        present = F.encode_frame(F.PeerPresent(key))
        for w in self._watchers:
            w.deliver(present, -1)

    def _unregister(self, conn: _Conn) -> None:
        if conn.is_mesh:
            self._mesh_conns.discard(conn)
            self._watchers.discard(conn)
            return
        key = conn.key
        if key is None or self._clients.get(key) is not conn:
            return  # never admitted, or replaced by a newer connection
        del self._clients[key]
        del self._by_raw[key.raw]
        gone = F.encode_frame(F.PeerGone(key, F.PeerGoneReason.DISCONNECTED))
        for w in self._watchers:
            w.deliver(gone, -1)
        self._notify_gone(key)

    def _notify_gone(self, key: NodeKey) -> None:
        """Tell local clients that sent to ``key`` that it is gone (unless still reachable)."""
        if key in self._clients or key in self._remote:
            return
        senders = self._senders.pop(key, None)
        if not senders:
            return
        frame = F.encode_frame(F.PeerGone(key, F.PeerGoneReason.DISCONNECTED))
        for s in senders:
            c = self._clients.get(s)
            if c is not None:
                c.last_dst = None
                c.deliver(frame, -1)

    def _on_admission_change(self, keys: frozenset[NodeKey]) -> None:
        for c in list(self._clients.values()):
            if c.key is not None and not self.admission.allowed(c.key):
                self.metrics.evictions[EvictReason.LEFT_TAILNET] += 1
                log.info("evicting %r: left the tailnet", c.key)
                c.close("node key no longer in the tailnet")

    def _watch(self, conn: _Conn) -> None:
        self._watchers.add(conn)
        for key in self._clients:
            conn.deliver(F.encode_frame(F.PeerPresent(key)), -1)

    # ---- forwarding --------------------------------------------------------------------------

    def _forward(self, src: _Conn, dst_raw: bytes, packet: bytes) -> None:
        """A send-packet from ``src``: rewrite to recv-packet with src's own key and deliver."""
        m = self.metrics
        n = len(packet)
        m.packets_received += 1
        m.bytes_received += n
        bucket = src.bucket
        if bucket is not None and not bucket.take(n, self._loop.time()):
            m.drops[DropReason.RATE_LIMITED] += 1
            return
        d = self._by_raw.get(dst_raw)
        if d is not None:
            if src.last_dst is not d:
                assert src.key is not None and d.key is not None
                self._senders.setdefault(d.key, set()).add(src.key)
                src.last_dst = d
            d.deliver(_HDR.pack(_RECV, _KEY_LEN + n) + src.key_raw + packet, n)
            return
        skey = src.key
        assert skey is not None
        dst = NodeKey(dst_raw)
        link = self._remote.get(dst)
        if link is not None:
            if src.last_dst is not link:
                self._senders.setdefault(dst, set()).add(skey)
                src.last_dst = link
            if link.forward(skey, dst, packet):
                m.forwarded_mesh += 1
                m.forwarded_mesh_bytes += n
            else:
                m.drops[DropReason.MESH_BACKPRESSURE] += 1
            return
        m.drops[DropReason.UNKNOWN_DEST] += 1
        if dst not in src.not_here:
            if len(src.not_here) >= NOT_HERE_MEMORY:
                src.not_here.clear()
            src.not_here.add(dst)
            src.deliver(F.encode_frame(F.PeerGone(dst, F.PeerGoneReason.NOT_HERE)), -1)

    def _from_mesh(self, src: NodeKey, dst: NodeKey, packet: bytes) -> None:
        """A forward-packet from a mesh peer: deliver locally only (never re-forward: no loops)."""
        m = self.metrics
        n = len(packet)
        m.packets_received += 1
        m.bytes_received += n
        d = self._clients.get(dst)
        if d is None:
            m.drops[DropReason.UNKNOWN_DEST] += 1
            return
        d.deliver(F.encode_recv_packet(src, packet), n)

    # ---- mesh link callbacks (relaymesh.derp.mesh) ---------------------------------------------

    def _mesh_present(self, link: MeshLink, key: NodeKey) -> None:
        self._remote[key] = link
        for c in self._clients.values():  # a key that moved here -> there: forget "not here"
            c.not_here.discard(key)

    def _mesh_gone(self, link: MeshLink, key: NodeKey) -> None:
        if self._remote.get(key) is link:
            del self._remote[key]
            self._notify_gone(key)

    def _mesh_down(self, link: MeshLink) -> None:
        for key in [k for k, v in self._remote.items() if v is link]:
            del self._remote[key]
            self._notify_gone(key)

    # ---- metrics -----------------------------------------------------------------------------

    def metrics_text(self) -> str:
        return self.metrics.render(
            clients=len(self._clients),
            mesh_clients=len(self._mesh_conns),
            remote_clients=len(self._remote),
            mesh_links_up=sum(1 for link in self._links if link.up),
            stun_requests=self.stun.requests if self.stun else 0,
            stun_drops=self.stun.drops if self.stun else 0,
        )



KEY_FILE = "derp.key"  # in the state dir: the server's private key (the DERP map may pin it)
KEY_FILE_MODE = 0o600  # private key: owner only
STATE_DIR_MODE = 0o700


def load_or_create_server_key(state_dir: Path) -> PrivateKey:
    """The server key from ``state_dir/derp.key`` (``privkey:hex``), created 0600 if absent.

    A stable key matters: clients pin it from the DERP map, and a restart must not change it.
    A key file readable by others is tightened to 0600 rather than refused.
    """
    state_dir.mkdir(parents=True, exist_ok=True, mode=STATE_DIR_MODE)
    path = state_dir / KEY_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, KEY_FILE_MODE)
    except FileExistsError:
        if path.stat().st_mode & 0o077:
            log.warning("%s was readable by others: mode set to 0600", path)
            os.chmod(path, KEY_FILE_MODE)
        return PrivateKey.parse(path.read_text())
    key = PrivateKey.generate()
    with os.fdopen(fd, "w") as f:
        f.write(key.to_text() + "\n")
    return key
