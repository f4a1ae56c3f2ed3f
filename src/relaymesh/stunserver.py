"""A small STUN binding responder (RFC 5389) for DERP servers and ``control serve --derp``.

Nodes send a binding request to learn their public ip:port (the NAT mapping); the answer carries
XOR-MAPPED-ADDRESS with the request's source address. The core, :func:`stun_reply`, is sans-IO:
bytes and source in, reply bytes (or None) out; :class:`StunServer` is the asyncio UDP shell.
Anything that is not a well-formed binding request is dropped and counted, never raised.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

from relaymesh import stun

log = logging.getLogger(__name__)

DEFAULT_STUN_PORT = 3478  # RFC 5389 section 18.4: the registered STUN port


def stun_reply(data: bytes, source: tuple[str, int]) -> bytes | None:
    """The binding success response for a binding request from ``source``, else None.

    The reply carries a FINGERPRINT when the request did (RFC 5389 section 7.3: mirror the
    client's choice so both multiplexing styles work).
    """
    if not stun.is_stun(data):
        return None
    try:
        msg = stun.decode(data)
    except stun.StunError:
        return None
    if msg.msg_type != stun.BINDING_REQUEST:
        return None
    host = source[0]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]  # dual-stack socket: report the IPv4 address the client knows
    host = host.split("%", 1)[0]  # drop an IPv6 zone id
    try:
        return stun.binding_response(msg.txid, (host, source[1]),
                                     fingerprint=msg.fingerprint_ok is not None)
    except stun.StunError:
        return None


class StunServer(asyncio.DatagramProtocol):
    """Answers binding requests on one UDP socket; counts answers and drops."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.requests = 0
        self.drops = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # 3.11's is no subclass

    def datagram_received(self, data: bytes, addr: Any) -> None:
        reply = stun_reply(data, (str(addr[0]), int(addr[1])))
        if reply is None or self.transport is None:
            self.drops += 1
            return
        self.requests += 1
        self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:  # ICMP errors: nothing to do but count
        self.drops += 1

    @property
    def address(self) -> tuple[str, int]:
        assert self.transport is not None
        name = self.transport.get_extra_info("sockname")
        return str(name[0]), int(name[1])

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def start_stun_server(host: str = "0.0.0.0", port: int = DEFAULT_STUN_PORT) -> StunServer:
    """Bind and serve; ``port=0`` picks a free port (see ``.address``)."""
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_datagram_endpoint(StunServer, local_addr=(host, port))
    return proto
