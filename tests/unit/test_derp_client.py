"""DERP client: reconnect after a server restart, key pinning, TLS, probes, home region."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
from pathlib import Path

import pytest
from asyncwait import wait_for
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from relaymesh.derp import frames as F
from relaymesh.derp.client import (
    DerpClient,
    DerpError,
    DerpURL,
    ReceivedPacket,
    measure_regions,
    node_url,
    pick_home_region,
    probe_latency,
)
from relaymesh.derp.server import DerpServer
from relaymesh.keys import PrivateKey


def url_of(srv: DerpServer, scheme: str = "http") -> str:
    assert srv.address is not None
    return f"{scheme}://127.0.0.1:{srv.address[1]}/derp"


async def test_server_restart_client_reconnects_and_traffic_resumes_within_5s() -> None:
    server_priv = PrivateKey.generate()
    srv = DerpServer(server_priv)
    _, port = await srv.start("127.0.0.1", 0)
    got: list[ReceivedPacket] = []
    a = DerpClient(url_of(srv), PrivateKey.generate(), server_key=server_priv.node_public())
    b = DerpClient(url_of(srv), PrivateKey.generate(), server_key=server_priv.node_public(),
                   on_packet=lambda src, pkt: got.append(ReceivedPacket(src, pkt)))
    a.start()
    b.start()
    loop = asyncio.get_running_loop()
    try:
        await a.wait_connected(3)
        await b.wait_connected(3)
        assert await a.send(b.node_key, b"before")
        await wait_for(lambda: len(got) == 1)
        await srv.close()
        await wait_for(lambda: not a.connected and not b.connected, what="both see the restart")
        t0 = loop.time()
        srv = DerpServer(server_priv)  # same key, same port: what an operator's restart does
        await srv.start("127.0.0.1", port)
        n = 0
        while not any(p.packet.startswith(b"after") for p in got):
            assert loop.time() - t0 < 5.0, "traffic did not resume within 5 s"
            a.send_nowait(b.node_key, b"after %d" % n)
            n += 1
            await asyncio.sleep(0.02)
        assert a.connects == 2 and b.connects == 2
        assert got[-1].src == a.node_key
    finally:
        await a.close()
        await b.close()
        await srv.close()


async def test_pinned_server_key_mismatch_is_refused_by_the_client() -> None:
    srv = DerpServer(PrivateKey.generate())
    await srv.start("127.0.0.1", 0)
    c = DerpClient(url_of(srv), PrivateKey.generate(),
                   server_key=PrivateKey.generate().node_public())
    try:
        with pytest.raises(F.HandshakeError, match="does not match"):
            await c.connect()
        assert not c.connected
    finally:
        await c.close()
        await srv.close()


async def test_supervised_client_retries_while_the_server_is_down() -> None:
    srv = DerpServer(PrivateKey.generate())
    _, port = await srv.start("127.0.0.1", 0)
    await srv.close()
    c = DerpClient(f"http://127.0.0.1:{port}/derp", PrivateKey.generate(), backoff_max=0.2)
    c.start()
    try:
        await wait_for(lambda: c.connect_failures >= 3, what="retries")
        assert isinstance(c.last_error, OSError)
        srv = DerpServer(PrivateKey.generate())
        await srv.start("127.0.0.1", port)
        await c.wait_connected(3)
    finally:
        await c.close()
        await srv.close()


async def test_async_iteration_ping_and_recv_queue_bound() -> None:
    srv = DerpServer(PrivateKey.generate())
    await srv.start("127.0.0.1", 0)
    a = DerpClient(url_of(srv), PrivateKey.generate())
    b = DerpClient(url_of(srv), PrivateKey.generate(), recv_queue_len=4)
    await a.connect()
    await b.connect()
    try:
        rtt = await a.ping()
        assert 0 < rtt < 2
        for i in range(6):
            await a.send(b.node_key, b"%d" % i)
        await wait_for(lambda: b.packets_received == 6)
        assert b.recv_dropped == 2  # the two oldest made room
        seen = []
        async for pkt in b:
            seen.append(pkt.packet)
            if len(seen) == 4:
                break
        assert seen == [b"2", b"3", b"4", b"5"]
        await b.close()
        with pytest.raises(DerpError):
            await b.recv()
        assert not await b.send(a.node_key, b"closed")
        assert b.send_dropped == 1
    finally:
        await a.close()
        await b.close()
        await srv.close()


async def test_client_notices_a_silent_server_and_redials() -> None:
    """A path that goes silent without a FIN is detected by the read timeout."""
    srv = DerpServer(PrivateKey.generate())
    await srv.start("127.0.0.1", 0)
    c = DerpClient(url_of(srv), PrivateKey.generate(), keepalive_interval=0.05,
                   read_timeout=0.3)
    c.start()
    try:
        await c.wait_connected(3)
        conn = next(iter(srv._clients.values()))
        assert conn.transport is not None
        conn.transport.pause_reading()  # server stops answering pings: the path is "dead"
        await wait_for(lambda: c.connects == 2, 5, "redial after silence")
    finally:
        await c.close()
        await srv.close()


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "derp.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


async def test_tls_connection_and_probe(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    srv = DerpServer(PrivateKey.generate())
    await srv.start("127.0.0.1", 0, ssl_context=server_ctx)
    a = DerpClient(url_of(srv, "https"), PrivateKey.generate(), ssl_context=client_ctx)
    b = DerpClient(url_of(srv, "https"), PrivateKey.generate(), ssl_context=client_ctx)
    try:
        await a.connect()
        await b.connect()
        await a.send(b.node_key, b"over tls")
        assert (await asyncio.wait_for(b.recv(), 2)).packet == b"over tls"
        assert await probe_latency(url_of(srv, "https"), ssl_context=client_ctx) > 0
        plain = DerpClient(url_of(srv, "https"), PrivateKey.generate())  # system CAs: untrusted
        with pytest.raises(ssl.SSLError):
            await plain.connect()
    finally:
        await a.close()
        await b.close()
        await srv.close()


async def test_probe_and_region_measurement() -> None:
    srv = DerpServer(PrivateKey.generate())
    _, port = await srv.start("127.0.0.1", 0)
    dead = DerpServer(PrivateKey.generate())
    _, dead_port = await dead.start("127.0.0.1", 0)
    await dead.close()
    try:
        rtt = await probe_latency(url_of(srv), count=3)
        assert 0 < rtt < 1
        derp_map = {"regions": [
            {"id": 1, "code": "up", "nodes": [{"name": "1a", "host": "127.0.0.1",
                                                "derp_port": port, "tls": False}]},
            {"id": 2, "code": "down", "nodes": [{"name": "2a", "host": "127.0.0.1",
                                                  "derp_port": dead_port, "tls": False}]},
        ]}
        node = {**derp_map["regions"][0]["nodes"][0], "server_key": str(srv.key)}
        c = DerpClient.for_map_node(node, PrivateKey.generate())
        assert c.expected_server_key == srv.key
        await c.connect()
        await c.close()
        lat = await measure_regions(derp_map, timeout=1.0)
        assert lat[2] is None and lat[1] is not None and lat[1] > 0
        assert pick_home_region(lat) == 1
        with pytest.raises(DerpError):
            await probe_latency(f"http://127.0.0.1:{dead_port}/derp", timeout=0.5)
    finally:
        await srv.close()


def test_pick_home_region_hysteresis() -> None:
    assert pick_home_region({}) is None
    assert pick_home_region({1: None}) is None
    lat: dict[int, float | None] = {1: 0.010, 2: 0.009, 3: None}
    assert pick_home_region(lat) == 2
    assert pick_home_region(lat, current=1) == 1  # 10% faster is not worth a move
    assert pick_home_region({1: 0.010, 2: 0.007}, current=1) == 2  # 30% faster is
    assert pick_home_region({1: 0.010, 2: 0.007}, current=3) == 2  # current is down


def test_urls() -> None:
    assert DerpURL.parse("http://h:1") == DerpURL("h", 1, False, "/derp")
    assert DerpURL.parse("https://h/derp") == DerpURL("h", 443, True, "/derp")
    assert DerpURL.parse("h:5").port == 5
    assert DerpURL.parse("http://[::1]:7/derp").hostport == "[::1]:7"
    with pytest.raises(ValueError):
        DerpURL.parse("ftp://h/")
    assert node_url({"host": "198.18.0.2", "derp_port": 3340, "tls": False}) == (
        "http://198.18.0.2:3340/derp")
    assert node_url({"host": "::1", "tls": True}) == "https://[::1]:443/derp"


async def test_short_lived_connections_keep_backing_off() -> None:
    """Two supervised clients with the same key evict each other; backoff keeps growing
    (connections shorter than STABLE_S do not reset it), so they do not hammer the server."""
    srv = DerpServer(PrivateKey.generate())
    await srv.start("127.0.0.1", 0)
    priv = PrivateKey.generate()
    a = DerpClient(url_of(srv), priv, backoff_max=1.0)
    b = DerpClient(url_of(srv), priv, backoff_max=1.0)
    a.start()
    b.start()
    try:
        await asyncio.sleep(3.0)
        # With a fixed 0.1 s delay each would connect ~25 times in 3 s; with doubling from
        # 0.1 s (+-20%) to 1 s, at most 0.1+0.2+0.4+0.8 = 1.5 s, then one per second: < 8.
        assert a.connects + b.connects <= 16
        assert a.connects >= 1 and b.connects >= 1
    finally:
        await a.close()
        await b.close()
        await srv.close()
