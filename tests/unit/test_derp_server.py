"""DERP server, in process on loopback: forwarding, proof, spoofing, queues, peer-gone, limits."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator

import pytest
from asyncwait import wait_for
from nacl.public import Box
from nacl.public import PrivateKey as NaclPrivateKey
from nacl.public import PublicKey as NaclPublicKey

from relaymesh.derp import frames as F
from relaymesh.derp.client import DerpClient, DerpRefusedError, ReceivedPacket
from relaymesh.derp.metrics import DropReason, RefuseReason, parse_prometheus_text, sample
from relaymesh.derp.server import DerpServer, DerpServerConfig
from relaymesh.keys import PrivateKey

PAYLOAD = bytes(range(256)) * 5 + b"x" * 120  # 1400 bytes, like a WireGuard packet



@pytest.fixture
async def server() -> AsyncIterator[DerpServer]:
    srv = DerpServer(PrivateKey.generate())
    await srv.start("127.0.0.1", 0)
    yield srv
    await srv.close()


def url_of(srv: DerpServer) -> str:
    assert srv.address is not None
    return f"http://127.0.0.1:{srv.address[1]}/derp"


async def client(srv: DerpServer, priv: PrivateKey | None = None, **kw: object) -> DerpClient:
    c = DerpClient(url_of(srv), priv or PrivateKey.generate(), server_key=srv.key, **kw)  # type: ignore[arg-type]
    await c.connect()
    return c


async def recv(c: DerpClient, timeout: float = 2.0) -> ReceivedPacket:
    return await asyncio.wait_for(c.recv(), timeout)


class Raw:
    """A hand-driven DERP connection, for what DerpClient will not do (bad proofs, spoofing)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.fr = F.FrameReader()
        self.pending: list[F.Frame] = []

    @classmethod
    async def open(cls, srv: DerpServer, rcvbuf: int | None = None) -> Raw:
        assert srv.address is not None
        sock = socket.socket()
        if rcvbuf is not None:  # small kernel buffer: the server's own queue fills sooner
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", srv.address[1]))
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: derp\r\n"
                     b"Connection: Upgrade\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 ")
        return cls(reader, writer)

    async def frame(self, timeout: float = 2.0) -> F.Frame:
        while not self.pending:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
            if not data:
                raise EOFError
            self.pending.extend(self.fr.frames(data))
        return self.pending.pop(0)

    async def handshake(self, priv: PrivateKey) -> None:
        hs = F.ClientHandshake(priv)
        self.writer.write(hs.receive_server_key(await self.frame()))
        hs.receive_server_info(await self.frame())

    async def closed(self, timeout: float = 2.0) -> list[F.Frame]:
        """Frames until EOF (asserts the server closes the connection)."""
        out: list[F.Frame] = []
        while True:
            try:
                out.append(await self.frame(timeout))
            except EOFError:
                return out


async def test_two_clients_exchange_packets(server: DerpServer) -> None:
    a, b = await client(server), await client(server)
    try:
        assert a.server_key == server.key
        assert await a.send(b.node_key, PAYLOAD)
        got = await recv(b)
        assert got == ReceivedPacket(a.node_key, PAYLOAD)
        assert await b.send(a.node_key, b"reply")
        assert await recv(a) == ReceivedPacket(b.node_key, b"reply")
        assert server.metrics.forwarded_local == 2
        assert server.metrics.forwarded_local_bytes == len(PAYLOAD) + 5
    finally:
        await a.close()
        await b.close()


async def test_client_with_bad_proof_is_refused(server: DerpServer) -> None:
    victim = PrivateKey.generate().node_public()
    attacker = PrivateKey.generate()
    raw = await Raw.open(server)
    sk = await raw.frame()
    assert isinstance(sk, F.ServerKey)
    # Claim the victim's key, but seal with the attacker's private key: the box cannot open.
    info = F.ClientInfoPayload(challenge=sk.challenge).to_json()
    nonce = os.urandom(F.NONCE_LEN)
    sealed = Box(NaclPrivateKey(attacker.raw), NaclPublicKey(sk.key.raw)).encrypt(info, nonce)
    raw.writer.write(F.encode_frame(F.ClientInfo(victim, nonce, sealed.ciphertext)))
    rest = await raw.closed()
    assert [type(f) for f in rest] == [F.Health]  # no server-info: nothing was granted
    assert server.metrics.refused[RefuseReason.HANDSHAKE] == 1
    assert victim not in server.client_keys


async def test_replayed_challenge_is_refused(server: DerpServer) -> None:
    """A client-info made for one connection does not work on another (fresh challenge)."""
    priv = PrivateKey.generate()
    first = await Raw.open(server)
    hs = F.ClientHandshake(priv)
    captured = hs.receive_server_key(await first.frame())
    second = await Raw.open(server)
    await second.frame()  # its own server-key, with another challenge
    second.writer.write(captured)
    assert [type(f) for f in await second.closed()] == [F.Health]
    assert server.metrics.refused[RefuseReason.HANDSHAKE] == 1
    first.writer.close()


async def test_frames_before_the_proof_are_refused(server: DerpServer) -> None:
    raw = await Raw.open(server)
    await raw.frame()
    raw.writer.write(F.encode_send_packet(PrivateKey.generate().node_public(), b"early"))
    assert [type(f) for f in await raw.closed()] == [F.Health]
    assert server.metrics.refused[RefuseReason.HANDSHAKE] == 1
    assert server.metrics.packets_received == 0


async def test_source_cannot_be_spoofed(server: DerpServer) -> None:
    victim, b = await client(server), await client(server)
    attacker_key = PrivateKey.generate()
    raw = await Raw.open(server)
    await raw.handshake(attacker_key)
    try:
        # 1. A send-packet is always delivered with the sender's authenticated key.
        raw.writer.write(F.encode_send_packet(b.node_key, b"from attacker"))
        got = await recv(b)
        assert got.src == attacker_key.node_public() and got.src != victim.node_key
        # 2. forward-packet names a source: only mesh peers may send it. Dropped and counted.
        raw.writer.write(F.encode_frame(F.ForwardPacket(victim.node_key, b.node_key, b"spoof")))
        # 3. recv-packet is a server frame: a client sending it is ignored and counted.
        raw.writer.write(F.encode_frame(F.RecvPacket(victim.node_key, b"spoof2")))
        raw.writer.write(F.encode_send_packet(b.node_key, b"marker"))
        got = await recv(b)
        assert got == ReceivedPacket(attacker_key.node_public(), b"marker")
        assert server.metrics.drops[DropReason.NOT_MESH_PEER] == 1
        assert server.metrics.drops[DropReason.UNEXPECTED_FRAME] == 1
    finally:
        raw.writer.close()
        await victim.close()
        await b.close()


async def test_queue_overflow_drops_are_counted_and_the_connection_survives() -> None:
    srv = DerpServer(PrivateKey.generate(), config=DerpServerConfig(queue_len=16))
    await srv.start("127.0.0.1", 0)
    a = await client(srv)
    slow_key = PrivateKey.generate()
    slow = await Raw.open(srv, rcvbuf=4096)
    await slow.handshake(slow_key)
    dst = slow_key.node_public()
    try:
        sent = 8000  # 11 MB: over the 4 MiB tcp_wmem max + 256 KiB transport + 16 queued frames
        for _ in range(sent):
            assert await a.send(dst, PAYLOAD)
        await wait_for(lambda: srv.metrics.packets_received == sent, 10, "server read all")
        m = srv.metrics
        drops = m.drops[DropReason.QUEUE_FULL]
        assert drops > 0
        assert a.connected and slow_key.node_public() in srv.client_keys
        # Now the slow client reads: every packet not dropped arrives, in order of sending.
        received = 0
        while received < sent - drops:
            f = await slow.frame(5)
            if isinstance(f, F.RecvPacket):
                assert f.src == a.node_key and f.packet == PAYLOAD
                received += 1
        assert received + drops == sent
        assert m.forwarded_local == received
        assert await a.send(dst, b"still alive")
        while not isinstance(f := await slow.frame(), F.RecvPacket):
            pass
        assert f.packet == b"still alive"
    finally:
        slow.writer.close()
        await a.close()
        await srv.close()


async def test_peer_gone_is_sent_when_a_destination_disconnects(server: DerpServer) -> None:
    frames: list[F.Frame] = []
    a = await client(server, on_frame=frames.append)
    b, c = await client(server), await client(server)
    try:
        await a.send(b.node_key, b"hi")
        await recv(b)
        await c.close()  # a never sent to c: no notice about c
        await b.close()
        await wait_for(lambda: any(isinstance(f, F.PeerGone) for f in frames), what="peer-gone")
        await asyncio.sleep(0.1)
        gone = [f for f in frames if isinstance(f, F.PeerGone)]
        assert gone == [F.PeerGone(b.node_key, F.PeerGoneReason.DISCONNECTED)]
    finally:
        await a.close()


async def test_unknown_destination_gets_one_not_here_notice(server: DerpServer) -> None:
    frames: list[F.Frame] = []
    a = await client(server, on_frame=frames.append)
    nobody = PrivateKey.generate().node_public()
    try:
        for _ in range(3):
            await a.send(nobody, b"x")
        await wait_for(lambda: server.metrics.drops[DropReason.UNKNOWN_DEST] == 3)
        await wait_for(lambda: bool(frames))
        assert frames == [F.PeerGone(nobody, F.PeerGoneReason.NOT_HERE)]
    finally:
        await a.close()


async def test_rate_limit_drops_are_counted() -> None:
    cfg = DerpServerConfig(rate_limit=10_000, rate_burst=10_000)
    srv = DerpServer(PrivateKey.generate(), config=cfg)
    await srv.start("127.0.0.1", 0)
    a, b = await client(srv), await client(srv)
    try:
        assert a.server_info is not None
        assert a.server_info.token_bucket_bytes_per_second == 10_000
        for _ in range(50):
            a.send_nowait(b.node_key, b"r" * 1000)
        await wait_for(lambda: srv.metrics.packets_received == 50)
        limited = srv.metrics.drops[DropReason.RATE_LIMITED]
        passed = 50 - limited
        # The 10 kB bucket holds 10 packets; refill during the burst adds at most a few.
        assert 10 <= passed < 50
        await wait_for(lambda: b.packets_received == passed)
        await asyncio.sleep(0.05)
        assert b.packets_received == passed
        # B is not limited by A's bucket.
        assert await b.send(a.node_key, b"back")
        assert (await recv(a)).packet == b"back"
    finally:
        await a.close()
        await b.close()
        await srv.close()


async def test_newer_connection_with_the_same_key_replaces_the_older(server: DerpServer) -> None:
    priv = PrivateKey.generate()
    old = await client(server, priv)
    new = await client(server, priv)
    other = await client(server)
    try:
        await wait_for(lambda: not old.connected, what="old connection closed")
        assert server.client_keys.count(priv.node_public()) == 1
        await other.send(priv.node_public(), b"to new")
        assert (await recv(new)).packet == b"to new"
    finally:
        for c in (old, new, other):
            await c.close()


async def test_malformed_frame_closes_only_that_connection(server: DerpServer) -> None:
    a, b = await client(server), await client(server)
    raw = await Raw.open(server)
    await raw.handshake(PrivateKey.generate())
    try:
        raw.writer.write(F.frame_header(F.FrameType.PING, 3) + b"abc")  # ping must be 8 bytes
        assert [type(f) for f in await raw.closed()] == [F.Health]
        assert server.metrics.refused[RefuseReason.BAD_FRAME] == 1
        await a.send(b.node_key, b"unaffected")
        assert (await recv(b)).packet == b"unaffected"
    finally:
        await a.close()
        await b.close()


async def _http(srv: DerpServer, request: bytes, port: int | None = None) -> bytes:
    assert srv.address is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", port or srv.address[1])
    writer.write(request)
    data = await asyncio.wait_for(reader.read(), 2)
    writer.close()
    return data


async def test_http_endpoints(server: DerpServer) -> None:
    probe = await _http(server, b"GET /derp/probe HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert probe.startswith(b"HTTP/1.1 200 ")
    no_upgrade = await _http(server, b"GET /derp HTTP/1.1\r\n\r\n")
    assert no_upgrade.startswith(b"HTTP/1.1 426 ")
    assert (await _http(server, b"GET /nope HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.1 404 ")
    assert (await _http(server, b"POST /derp HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 405 ")
    assert (await _http(server, b"garbage\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
    assert server.metrics.refused[RefuseReason.NO_UPGRADE] == 1
    assert server.metrics.refused[RefuseReason.BAD_HTTP] == 1


async def test_metrics_text_parses_and_counts(server: DerpServer) -> None:
    a, b = await client(server), await client(server)
    try:
        await a.send(b.node_key, PAYLOAD)
        await recv(b)
        await a.send(PrivateKey.generate().node_public(), b"lost")
        await wait_for(lambda: server.metrics.drops[DropReason.UNKNOWN_DEST] == 1)
        resp = await _http(server, b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n")
        head, _, body = resp.partition(b"\r\n\r\n")
        assert b"text/plain; version=0.0.4" in head
        s = parse_prometheus_text(body.decode())
        assert sample(s, "relaymesh_derp_clients", kind="client") == 2
        assert sample(s, "relaymesh_derp_packets_forwarded_total", via="local") == 1
        assert sample(s, "relaymesh_derp_bytes_forwarded_total", via="local") == len(PAYLOAD)
        assert sample(s, "relaymesh_derp_packets_received_total") == 2
        assert sample(s, "relaymesh_derp_drops_total", reason="unknown_dest") == 1
        assert sample(s, "relaymesh_derp_drops_total", reason="queue_full") == 0
        # A separate metrics listener takes /metrics off the DERP port.
        _host, port = await server.start_metrics("127.0.0.1", 0)
        resp = await _http(server, b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n", port)
        assert resp.startswith(b"HTTP/1.1 200 ")
        gone = await _http(server, b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert gone.startswith(b"HTTP/1.1 404 ")
    finally:
        await a.close()
        await b.close()


def test_metrics_parser_rejects_malformed_text() -> None:
    from relaymesh.derp.metrics import MetricsParseError

    good = "# TYPE x counter\nx{a=\"1\"} 2\n"
    assert parse_prometheus_text(good) == {("x", frozenset({("a", "1")})): 2.0}
    for bad in ("x 1\n", "# TYPE x counter\nx{a=1} 2\n", "# TYPE x counter\nx one\n",
                "# TYPE x bogus\nx 1\n", "# TYPE x counter\nx 1\nx 2\n"):
        with pytest.raises(MetricsParseError):
            parse_prometheus_text(bad)


async def test_two_meshed_servers_relay_between_their_clients() -> None:
    s1 = DerpServer(PrivateKey.generate(), config=DerpServerConfig(mesh_key="region-secret"))
    s2 = DerpServer(PrivateKey.generate(), config=DerpServerConfig(mesh_key="region-secret"))
    await s1.start("127.0.0.1", 0)
    await s2.start("127.0.0.1", 0)
    s1.add_mesh_peer(url_of(s2))
    s2.add_mesh_peer(url_of(s1))
    a, b = await client(s1), await client(s2)
    try:
        await wait_for(lambda: b.node_key in s1._remote and a.node_key in s2._remote, 5,
                       "peer-present over the mesh")
        assert await a.send(b.node_key, PAYLOAD)
        assert await recv(b) == ReceivedPacket(a.node_key, PAYLOAD)
        assert await b.send(a.node_key, b"back")
        assert await recv(a) == ReceivedPacket(b.node_key, b"back")
        assert s1.metrics.forwarded_mesh == 1 and s2.metrics.forwarded_mesh == 1
        # B leaves server 2: server 1 hears it over the mesh and tells A, who had sent to B.
        frames: list[F.Frame] = []
        a.on_frame = frames.append
        await b.close()
        await wait_for(lambda: F.PeerGone(b.node_key, F.PeerGoneReason.DISCONNECTED) in frames,
                       5, "peer-gone over the mesh")
        assert b.node_key not in s1._remote
    finally:
        await a.close()
        await b.close()
        await s1.close()
        await s2.close()


async def test_wrong_mesh_key_is_an_ordinary_client() -> None:
    s1 = DerpServer(PrivateKey.generate(), config=DerpServerConfig(mesh_key="right"))
    await s1.start("127.0.0.1", 0)
    intruder = await client(s1, mesh_key="wrong", watch_conns=True)
    try:
        await wait_for(lambda: s1.metrics.drops[DropReason.NOT_MESH_PEER] == 1,
                       what="watch-conns refused")
        assert intruder.node_key in s1.client_keys  # admitted (AllowAll) but not as a mesh peer
        assert not s1._watchers
    finally:
        await intruder.close()
        await s1.close()


async def test_restarting_frame_on_close(server: DerpServer) -> None:
    frames: list[F.Frame] = []
    a = await client(server, on_frame=frames.append)
    try:
        await server.close()
        await wait_for(lambda: not a.connected)
        assert F.Restarting(200, 60_000) in frames
    finally:
        await a.close()


async def test_refused_client_sees_the_reason() -> None:
    from relaymesh.derp.admission import StaticKeys

    adm = StaticKeys()
    srv = DerpServer(PrivateKey.generate(), admission=adm)
    await srv.start("127.0.0.1", 0)
    try:
        with pytest.raises(DerpRefusedError, match="not in the tailnet"):
            await client(srv)
        assert srv.metrics.refused[RefuseReason.NOT_ADMITTED] == 1
    finally:
        await srv.close()



async def test_server_sends_keepalives_and_answers_pings() -> None:
    srv = DerpServer(PrivateKey.generate(), config=DerpServerConfig(keepalive_interval=0.05))
    await srv.start("127.0.0.1", 0)
    raw = await Raw.open(srv)
    await raw.handshake(PrivateKey.generate())
    try:
        assert isinstance(await raw.frame(), F.KeepAlive)
        assert isinstance(await raw.frame(), F.KeepAlive)
        raw.writer.write(F.encode_frame(F.Ping(b"12345678")))
        while isinstance(f := await raw.frame(), F.KeepAlive):
            pass
        assert f == F.Pong(b"12345678")
    finally:
        raw.writer.close()
        await srv.close()
