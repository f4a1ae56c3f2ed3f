"""DERP client: what a node (and a meshing DERP server) uses to talk to a DERP server.

``DerpClient`` dials ``http(s)://host:port/derp``, upgrades the connection (``Upgrade: derp``),
proves its node key (``ClientHandshake``; the server key is pinned when the DERP map gives one),
and then sends packets by destination node key and receives ``(source key, packet)``.

Two ways to run it:

- ``await client.connect()``: one attempt; raises :class:`DerpRefusedError` (the server said why:
  bad proof, not in the tailnet), :class:`DerpError`, ``HandshakeError`` or ``OSError``. The
  connection is not re-established when it drops.
- ``client.start()``: a supervisor keeps it connected, reconnecting with exponential backoff
  (``BACKOFF_MIN_S`` doubling to ``BACKOFF_MAX_S``, +-20% jitter). A server that is shutting down
  sends a restarting frame whose delay replaces the backoff.

Packets arrive through ``on_packet(src, packet)`` (called from the read loop: cheapest) or, when
no callback is given, a bounded queue read with ``await client.recv()`` / ``async for pkt in
client`` (full queue: the oldest packet is dropped and counted). Control frames (peer-gone,
peer-present, health, restarting) go to ``on_frame``.

Liveness: the client pings the server every ``keepalive_interval`` (30 s) and drops the
connection when nothing arrived for ``read_timeout`` (75 s: two missed pings plus slack), so a
silently dead path (NAT state lost, server gone without FIN) is noticed and redialled.

Latency: :func:`probe_latency` times ``GET /derp/probe`` on one kept-alive connection (the TCP
and TLS setup are excluded, so the figure is the path RTT); :func:`measure_regions` and
:func:`pick_home_region` choose the home region from a DERP map.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from relaymesh.derp import frames as F
from relaymesh.keys import NodeKey, PrivateKey

log = logging.getLogger(__name__)

BACKOFF_MIN_S = 0.1  # first retry soon: a restarting server is usually back within a second
BACKOFF_MAX_S = 2.0  # cap low so traffic resumes within 5 s of a server restart (issue 5 #3)
STABLE_S = 5.0  # a connection that lasted this long resets the backoff; shorter ones keep
# growing it, so a server that accepts and then drops us (eviction, duplicate key) is not hammered
CONNECT_TIMEOUT_S = 5.0  # TCP + TLS + HTTP upgrade + key proof
KEEPALIVE_INTERVAL_S = 30.0  # client ping; the server also sends keep-alives every 60 s
READ_TIMEOUT_S = 75.0  # no byte for this long: the connection is dead, redial
RECV_QUEUE_LEN = 1024  # packets buffered for recv() when the application lags
MAX_WRITE_BUFFER = 1024 * 1024  # send_nowait drops (counted) beyond this much unsent data
READ_CHUNK = 256 * 1024
PROBE_PATH = "/derp/probe"
HOME_HYSTERESIS = 0.8  # switch home region only if the new one is at least 20% faster


class DerpError(Exception):
    """The server could not be reached or spoke something else than DERP."""


class DerpRefusedError(DerpError):
    """The server refused us and said why (health text): bad proof, not in the tailnet, ..."""


@dataclass(frozen=True, slots=True)
class ReceivedPacket:
    src: NodeKey
    packet: bytes


@dataclass(frozen=True, slots=True)
class DerpURL:
    host: str
    port: int
    tls: bool
    path: str

    @classmethod
    def parse(cls, url: str) -> DerpURL:
        u = urlsplit(url if "://" in url else "http://" + url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"not a DERP URL (http[s]://host:port[/derp]): {url!r}")
        tls = u.scheme == "https"
        return cls(u.hostname, u.port or (443 if tls else 80), tls,
                   u.path if u.path not in ("", "/") else "/derp")

    @property
    def hostport(self) -> str:
        h = f"[{self.host}]" if ":" in self.host else self.host
        return f"{h}:{self.port}"


def node_url(node: Mapping[str, Any]) -> str:
    """URL of one DERP map node ``{"host", "derp_port", "tls"}`` (control-protocol.md)."""
    tls = bool(node.get("tls", False))
    host = str(node["host"])
    port = int(node.get("derp_port") or (443 if tls else 80))
    h = f"[{host}]" if ":" in host else host
    return f"{'https' if tls else 'http'}://{h}:{port}/derp"


async def _open(u: DerpURL, ssl_context: ssl.SSLContext | None
                ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    ctx = ssl_context if ssl_context is not None else (
        ssl.create_default_context() if u.tls else None)
    if ctx is not None and not u.tls:
        ctx = None
    return await asyncio.open_connection(
        u.host, u.port, ssl=ctx, server_hostname=u.host if ctx else None, limit=READ_CHUNK)


class DerpClient:
    """One node's connection to one DERP server (see the module docstring)."""

    def __init__(
        self,
        url: str,
        private: PrivateKey,
        *,
        server_key: NodeKey | None = None,
        mesh_key: str | None = None,
        watch_conns: bool = False,
        preferred: bool = False,
        on_packet: Callable[[NodeKey, bytes], None] | None = None,
        on_frame: Callable[[F.Frame], None] | None = None,
        on_state: Callable[[bool], None] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        recv_queue_len: int = RECV_QUEUE_LEN,
        backoff_min: float = BACKOFF_MIN_S,
        backoff_max: float = BACKOFF_MAX_S,
        connect_timeout: float = CONNECT_TIMEOUT_S,
        keepalive_interval: float = KEEPALIVE_INTERVAL_S,
        read_timeout: float = READ_TIMEOUT_S,
        max_write_buffer: int = MAX_WRITE_BUFFER,
    ) -> None:
        self.url = DerpURL.parse(url)
        self._private = private
        self.node_key = private.node_public()
        self.expected_server_key = server_key
        self.mesh_key = mesh_key
        self.watch_conns = watch_conns
        self.preferred = preferred
        self.on_packet = on_packet
        self.on_frame = on_frame
        self.on_state = on_state
        self.ssl_context = ssl_context
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.connect_timeout = connect_timeout
        self.keepalive_interval = keepalive_interval
        self.read_timeout = read_timeout
        self.max_write_buffer = max_write_buffer
        self.server_key: NodeKey | None = None
        self.server_info: F.ServerInfoPayload | None = None
        self._queue: asyncio.Queue[ReceivedPacket | None] = asyncio.Queue(recv_queue_len)
        self._writer: asyncio.StreamWriter | None = None
        self._out: list[bytes] = []  # frames written this loop turn, see _write()
        self._out_bytes = 0
        self._flush_scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._supervisor: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._closing = False
        self._restart_hint: float | None = None
        self._pings: dict[bytes, asyncio.Future[None]] = {}
        self._last_rx = 0.0
        self.last_error: BaseException | None = None
        # counters
        self.connects = 0
        self.connect_failures = 0
        self.refusals = 0
        self.recv_dropped = 0
        self.send_dropped = 0
        self.bad_frames = 0
        self.packets_received = 0

    @classmethod
    def for_map_node(cls, node: Mapping[str, Any], private: PrivateKey,
                     **kwargs: Any) -> DerpClient:
        """A client for one DERP map node; pins ``node["server_key"]`` when the map has it."""
        key = node.get("server_key")
        return cls(node_url(node), private,
                   server_key=NodeKey.parse(str(key)) if key else None, **kwargs)

    # ---- state -------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._writer is not None

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Until the handshake completed (raises TimeoutError)."""
        await asyncio.wait_for(self._connected.wait(), timeout)

    # ---- connecting --------------------------------------------------------------------------

    async def _dial(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter,
                                   F.FrameReader, list[F.Frame]]:
        u = self.url
        reader, writer = await _open(u, self.ssl_context)
        try:
            writer.write(
                f"GET {u.path} HTTP/1.1\r\nHost: {u.hostport}\r\nUpgrade: derp\r\n"
                f"Connection: Upgrade\r\nUser-Agent: relaymesh\r\n\r\n".encode())
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as e:
                raise DerpError("connection closed before the HTTP answer") from e
            except asyncio.LimitOverrunError as e:
                raise DerpError("HTTP answer head too long") from e
            status = head.split(b"\r\n", 1)[0].decode("latin-1")
            if status.split(" ")[1:2] != ["101"]:
                raise DerpError(f"no DERP upgrade: {status!r}")
            fr = F.FrameReader()
            pending: list[F.Frame] = []

            async def next_frame() -> F.Frame:
                while not pending:
                    data = await reader.read(READ_CHUNK)
                    if not data:
                        raise DerpError("connection closed during the handshake")
                    pending.extend(fr.frames(data))
                return pending.pop(0)

            hs = F.ClientHandshake(self._private, self.expected_server_key, self.mesh_key)
            writer.write(hs.receive_server_key(await next_frame()))
            f = await next_frame()
            if isinstance(f, F.Health):
                raise DerpRefusedError(f.problem or "refused")
            self.server_info = hs.receive_server_info(f)
            self.server_key = hs.server_key
            if self.watch_conns:
                writer.write(F.encode_frame(F.WatchConns()))
            if self.preferred:
                writer.write(F.encode_frame(F.NotePreferred(True)))
            return reader, writer, fr, pending
        except BaseException:
            writer.transport.abort()
            raise

    async def _dial_timed(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter,
                                         F.FrameReader, list[F.Frame]]:
        try:
            return await asyncio.wait_for(self._dial(), self.connect_timeout)
        except TimeoutError as e:
            raise DerpError(f"connect to {self.url.hostport} timed out") from e

    async def connect(self) -> None:
        """One connection attempt; the read loop then runs until the connection ends."""
        reader, writer, fr, pending = await self._dial_timed()
        self._attach(writer)
        self._spawn(self._read_loop(reader, writer, fr, pending))

    def start(self) -> None:
        """Stay connected in the background (reconnect with backoff) until ``close()``."""
        if self._supervisor is None:
            self._supervisor = asyncio.create_task(self._supervise())

    async def _supervise(self) -> None:
        delay = self.backoff_min
        while not self._closing:
            try:
                reader, writer, fr, pending = await self._dial_timed()
            except DerpRefusedError as e:
                self.refusals += 1
                self.last_error = e
                log.warning("DERP %s refused us: %s", self.url.hostport, e)
                delay = self.backoff_max  # a refusal will not change within milliseconds
            except (OSError, DerpError, F.FrameError) as e:
                self.connect_failures += 1
                self.last_error = e
                log.debug("DERP %s connect failed: %s", self.url.hostport, e)
            else:
                loop = asyncio.get_running_loop()
                up_at = loop.time()
                self._attach(writer)
                await self._read_loop(reader, writer, fr, pending)
                if loop.time() - up_at >= STABLE_S:
                    delay = self.backoff_min  # it worked for a while: retry at once
                if self._restart_hint is not None:
                    delay, self._restart_hint = self._restart_hint, None
            if self._closing:
                break
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, self.backoff_max)

    def _attach(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self.connects += 1
        self._last_rx = asyncio.get_running_loop().time()
        self._connected.set()
        self._spawn(self._keepalive(writer))
        if self.on_state is not None:
            self.on_state(True)

    def _detach(self, writer: asyncio.StreamWriter) -> None:
        if self._writer is not writer:
            return
        self._writer = None
        self._out, self._out_bytes = [], 0
        self._connected.clear()
        writer.transport.abort()
        for fut in self._pings.values():
            if not fut.done():
                fut.set_exception(DerpError("disconnected"))
        self._pings.clear()
        if self.on_state is not None:
            self.on_state(False)

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _keepalive(self, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        while self._writer is writer:
            await asyncio.sleep(self.keepalive_interval)
            if self._writer is not writer:
                return
            if loop.time() - self._last_rx > self.read_timeout:
                log.info("DERP %s silent for %.0f s: reconnecting", self.url.hostport,
                         loop.time() - self._last_rx)
                writer.transport.abort()
                return
            self._write(F.encode_frame(F.Ping(os.urandom(F.PING_LEN))))

    async def _read_loop(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         fr: F.FrameReader, pending: list[F.Frame]) -> None:
        loop = asyncio.get_running_loop()
        try:
            for f in pending:
                self._handle(f, writer)
            while True:
                data = await reader.read(READ_CHUNK)
                if not data:
                    break
                self._last_rx = loop.time()
                fr.feed(data)
                while (nf := fr.next_frame()) is not None:
                    self._handle(nf, writer)
        except F.FrameError as e:
            self.bad_frames += 1
            log.warning("DERP %s sent a bad frame: %s", self.url.hostport, e)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._detach(writer)

    def _handle(self, f: F.Frame, writer: asyncio.StreamWriter) -> None:
        if type(f) is F.RecvPacket:
            assert isinstance(f, F.RecvPacket)
            self.packets_received += 1
            if self.on_packet is not None:
                self.on_packet(f.src, f.packet)
                return
            q = self._queue
            if q.full():
                q.get_nowait()
                self.recv_dropped += 1
            q.put_nowait(ReceivedPacket(f.src, f.packet))
            return
        if isinstance(f, F.Ping):
            self._write(F.encode_frame(F.Pong(f.data)))
            return
        if isinstance(f, F.Pong):
            fut = self._pings.pop(f.data, None)
            if fut is not None and not fut.done():
                fut.set_result(None)
            return
        if isinstance(f, F.Restarting):
            self._restart_hint = f.reconnect_in_ms / 1000
        if isinstance(f, F.Health) and f.problem:
            self.last_error = DerpRefusedError(f.problem)
            log.warning("DERP %s: %s", self.url.hostport, f.problem)
        if isinstance(f, F.KeepAlive):
            return
        if self.on_frame is not None:
            self.on_frame(f)

    # ---- sending -----------------------------------------------------------------------------

    def _write(self, frame: bytes) -> None:
        """Collect a frame; all frames collected in one event-loop turn go out in one write
        (one send(2) for a burst of packets instead of one per packet)."""
        self._out.append(frame)
        self._out_bytes += len(frame)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out = self._out
        if not out:
            return
        self._out, self._out_bytes = [], 0
        w = self._writer
        if w is not None:
            w.write(out[0] if len(out) == 1 else b"".join(out))

    def _backed_up(self, w: asyncio.StreamWriter) -> bool:
        return self._out_bytes + w.transport.get_write_buffer_size() > self.max_write_buffer

    def send_nowait(self, dst: NodeKey, packet: bytes) -> bool:
        """Queue one packet for ``dst``; False (counted) if disconnected or too far behind."""
        w = self._writer
        if w is None or self._backed_up(w):
            self.send_dropped += 1
            return False
        self._write(F.encode_send_packet(dst, packet))
        return True

    async def send(self, dst: NodeKey, packet: bytes) -> bool:
        """Like ``send_nowait`` but waits while the socket is backed up (flow control)."""
        w = self._writer
        if w is None:
            self.send_dropped += 1
            return False
        self._write(F.encode_send_packet(dst, packet))
        self._flush()
        try:
            await w.drain()
        except ConnectionError:
            return False
        return True

    def send_forward_nowait(self, src: NodeKey, dst: NodeKey, packet: bytes) -> bool:
        """Mesh only: hand a packet from ``src`` (on our server) to ``dst`` (on theirs)."""
        w = self._writer
        if w is None or self._backed_up(w):
            self.send_dropped += 1
            return False
        self._write(F.encode_frame(F.ForwardPacket(src, dst, packet)))
        return True

    async def ping(self, timeout: float = 2.0) -> float:
        """Round trip of a DERP ping frame over the live connection, in seconds."""
        w = self._writer
        if w is None:
            raise DerpError("not connected")
        loop = asyncio.get_running_loop()
        data = os.urandom(F.PING_LEN)
        fut: asyncio.Future[None] = loop.create_future()
        self._pings[data] = fut
        t0 = loop.time()
        self._write(F.encode_frame(F.Ping(data)))
        try:
            await asyncio.wait_for(fut, timeout)
        finally:
            self._pings.pop(data, None)
        return loop.time() - t0

    # ---- receiving ---------------------------------------------------------------------------

    async def recv(self) -> ReceivedPacket:
        """The next packet (only when no ``on_packet`` callback is set); raises DerpError
        after ``close()``."""
        item = await self._queue.get()
        if item is None:
            self._queue.put_nowait(None)  # keep waking other readers
            raise DerpError("client closed")
        return item

    def __aiter__(self) -> DerpClient:
        return self

    async def __anext__(self) -> ReceivedPacket:
        try:
            return await self.recv()
        except DerpError:
            raise StopAsyncIteration from None

    # ---- shutdown ----------------------------------------------------------------------------

    async def close(self) -> None:
        self._closing = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        if self._writer is not None:
            self._detach(self._writer)
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._queue.full():
            self._queue.get_nowait()
        self._queue.put_nowait(None)

    async def __aenter__(self) -> DerpClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


# ---- latency probes and home region ----------------------------------------------------------


async def probe_latency(url: str, *, count: int = 3, timeout: float = 2.0,
                        ssl_context: ssl.SSLContext | None = None) -> float:
    """Best of ``count`` ``GET /derp/probe`` round trips on one connection, in seconds.

    Raises DerpError when the server cannot be reached or answers something else.
    """
    u = DerpURL.parse(url)

    async def run() -> float:
        reader, writer = await _open(u, ssl_context)
        loop = asyncio.get_running_loop()
        best = float("inf")
        req = (f"GET {PROBE_PATH} HTTP/1.1\r\nHost: {u.hostport}\r\n"
               f"User-Agent: relaymesh\r\n\r\n").encode()
        try:
            for _ in range(count):
                t0 = loop.time()
                writer.write(req)
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                if lines[0].split(" ")[1:2] != ["200"]:
                    raise DerpError(f"probe answered {lines[0]!r}")
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                if length:
                    await reader.readexactly(length)
                best = min(best, loop.time() - t0)
        finally:
            writer.transport.abort()
        return best

    try:
        return await asyncio.wait_for(run(), timeout)
    except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
            ValueError) as e:
        raise DerpError(f"probe of {u.hostport} failed: {e!r}") from e


async def measure_regions(derp_map: Mapping[str, Any], *, count: int = 3, timeout: float = 2.0,
                          ssl_context: ssl.SSLContext | None = None) -> dict[int, float | None]:
    """Latency per region id (best of its nodes), None where no node answered."""
    jobs: list[tuple[int, asyncio.Task[float]]] = []
    out: dict[int, float | None] = {}
    for region in derp_map.get("regions", []):
        rid = int(region["id"])
        out[rid] = None
        for node in region.get("nodes", []):
            task = asyncio.create_task(probe_latency(node_url(node), count=count,
                                                     timeout=timeout, ssl_context=ssl_context))
            jobs.append((rid, task))
    for rid, task in jobs:
        try:
            rtt = await task
        except DerpError:
            continue
        best = out[rid]
        out[rid] = rtt if best is None else min(best, rtt)
    return out


def pick_home_region(latencies: Mapping[int, float | None],
                     current: int | None = None) -> int | None:
    """Fastest region; keep ``current`` unless another is ``HOME_HYSTERESIS`` faster
    (so two near-equal regions do not make the node flap between home servers)."""
    alive = {r: t for r, t in latencies.items() if t is not None}
    if not alive:
        return None
    best = min(alive, key=lambda r: (alive[r], r))
    if current in alive and alive[best] >= alive[current] * HOME_HYSTERESIS:
        return current
    return best
