"""Fuzz the DERP server's receive path: any bytes, any chunking, never an exception escapes;
a connection either keeps working or is closed with the refusal counted."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relaymesh.derp import frames as F
from relaymesh.derp.server import DerpServer, _Conn
from relaymesh.keys import PrivateKey

EXAMPLES = int(os.environ.get("RELAYMESH_FUZZ_EXAMPLES", "300"))
UPGRADE = b"GET /derp HTTP/1.1\r\nUpgrade: derp\r\nConnection: Upgrade\r\n\r\n"


class FakeTransport(asyncio.Transport):
    """Records writes; enough of asyncio.Transport for _Conn."""

    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.closed = False

    def write(self, data: Any) -> None:
        assert not self.closed, "wrote after close"
        self.out += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("198.51.100.1", 1) if name == "peername" else default


@contextlib.contextmanager
def _server() -> Iterator[DerpServer]:
    """A server on a loop that is not running: timers are scheduled, never fired."""
    loop = asyncio.new_event_loop()

    async def make() -> DerpServer:
        return DerpServer(PrivateKey.generate())

    try:
        yield loop.run_until_complete(make())
    finally:
        loop.close()


def _ready_conn(srv: DerpServer) -> tuple[_Conn, FakeTransport]:
    """A connection driven through the upgrade and a real handshake."""
    conn, t = _Conn(srv), FakeTransport()
    conn.connection_made(t)
    conn.data_received(UPGRADE)
    head, _, rest = bytes(t.out).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 ")
    reader = F.FrameReader()
    hs = F.ClientHandshake(PrivateKey.generate())
    t.out.clear()
    conn.data_received(hs.receive_server_key(reader.frames(rest)[0]))
    hs.receive_server_info(reader.frames(bytes(t.out))[0])
    return conn, t


def _refusals(srv: DerpServer) -> int:
    return sum(srv.metrics.refused.values())


def _drive(srv: DerpServer, conn: _Conn, t: FakeTransport, chunks: list[bytes]) -> None:
    before = _refusals(srv)
    for c in chunks:
        if t.closed:
            break
        conn.data_received(c)  # must never raise
    if t.closed:
        assert _refusals(srv) == before + 1  # every close of a misbehaving peer is counted


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=300), max_size=8))
def test_random_bytes_after_the_handshake(chunks: list[bytes]) -> None:
    with _server() as srv:
        conn, t = _ready_conn(srv)
        _drive(srv, conn, t, chunks)


frame_types = st.integers(0, 20)


@st.composite
def framed(draw: st.DrawFn) -> bytes:
    """Well-framed but arbitrary frames: exercises every payload check."""
    out = b""
    for _ in range(draw(st.integers(1, 6))):
        payload = draw(st.binary(max_size=80))
        out += F.frame_header(draw(frame_types), len(payload)) + payload
    return out


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(framed(), st.integers(1, 64))
def test_arbitrary_frames_any_chunking(data: bytes, step: int) -> None:
    with _server() as srv:
        conn, t = _ready_conn(srv)
        _drive(srv, conn, t, [data[i : i + step] for i in range(0, len(data), step)])


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=200), max_size=6))
def test_random_bytes_before_and_during_the_handshake(chunks: list[bytes]) -> None:
    with _server() as srv:
        conn, t = _Conn(srv), FakeTransport()
        conn.connection_made(t)
        for c in [UPGRADE, *chunks]:
            if t.closed:
                break
            conn.data_received(c)
        assert srv.client_keys == []  # nobody gets in without the proof
