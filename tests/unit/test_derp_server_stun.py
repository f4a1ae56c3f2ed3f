"""The STUN responder used by DERP servers: answers binding requests with the source address."""

from __future__ import annotations

import asyncio
import socket

from relaymesh import stun
from relaymesh.stunserver import start_stun_server, stun_reply


async def _exchange(port: int, data: bytes, timeout: float = 1.0) -> tuple[bytes | None,
                                                                             tuple[str, int]]:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.bind(("127.0.0.1", 0))
    try:
        await loop.sock_sendto(sock, data, ("127.0.0.1", port))
        try:
            reply = await asyncio.wait_for(loop.sock_recv(sock, 2048), timeout)
        except TimeoutError:
            reply = None
        return reply, sock.getsockname()
    finally:
        sock.close()


async def test_binding_request_gets_the_right_xor_mapped_address() -> None:
    srv = await start_stun_server("127.0.0.1", 0)
    try:
        txid, req = stun.binding_request()
        reply, mine = await _exchange(srv.address[1], req)
        assert reply is not None
        assert stun.parse_binding_response(reply, txid) == mine
        assert stun.decode(reply).get(stun.ATTR_XOR_MAPPED_ADDRESS) is not None
        assert srv.requests == 1 and srv.drops == 0
    finally:
        srv.close()


async def test_malformed_and_non_request_datagrams_are_dropped_and_counted() -> None:
    srv = await start_stun_server("127.0.0.1", 0)
    try:
        txid = stun.new_transaction_id()
        response = stun.binding_response(txid, ("192.0.2.1", 1))
        for junk in (b"hello", b"\x00\x01\x00\x00" + b"\x00" * 16, response):
            reply, _ = await _exchange(srv.address[1], junk, timeout=0.2)
            assert reply is None
        assert srv.drops == 3 and srv.requests == 0
        _, req = stun.binding_request()
        reply, _ = await _exchange(srv.address[1], req)
        assert reply is not None  # still serving
    finally:
        srv.close()


def test_reply_mirrors_fingerprint_and_unmaps_v4_mapped_sources() -> None:
    _, req = stun.binding_request(fingerprint=True)
    reply = stun_reply(req, ("::ffff:198.51.100.7", 4242))
    assert reply is not None
    msg = stun.decode(reply)
    assert msg.fingerprint_ok is True
    assert msg.mapped_address == ("198.51.100.7", 4242)
    _, plain = stun.binding_request()
    reply = stun_reply(plain, ("2001:db8::1", 5))
    assert reply is not None
    assert stun.decode(reply).fingerprint_ok is None
    assert stun.decode(reply).mapped_address == ("2001:db8::1", 5)
