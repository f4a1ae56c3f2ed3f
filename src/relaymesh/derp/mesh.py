"""Meshing DERP servers of one region, so a client on server 1 reaches a client on server 2.

Every server dials every other server of its region (``--mesh-with URL,...``) as a DERP client
that presents the region's pre-shared mesh key in client-info. Over that link it sends
watch-conns; the peer answers with peer-present for each of its clients and then streams
peer-present / peer-gone as clients come and go. The dialling server records "key K is on peer
P" and, when one of its own clients sends to K, hands the packet to P as forward-packet (source
key, destination key, packet). P delivers it to K as recv-packet with that source key. P trusts
the source key only because the link authenticated with the mesh key.

Links are one-directional (each server dials each peer), a forward-packet is only ever delivered
locally, never forwarded again, so a mesh cannot loop. A link that drops takes its routes with
it; it redials with the DERP client's backoff. A URL that turns out to be this server itself
(same server key) is dropped.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from relaymesh.derp import frames as F
from relaymesh.derp.client import DerpClient
from relaymesh.keys import NodeKey

if TYPE_CHECKING:
    from relaymesh.derp.server import DerpServer

log = logging.getLogger(__name__)

MESH_BACKOFF_MAX_S = 2.0  # a peer restart must not cut the region for longer than a client's


class MeshLink:
    """The outbound connection from ``server`` to one mesh peer."""

    def __init__(self, server: DerpServer, url: str, mesh_key: str) -> None:
        self.server = server
        self.url = url
        self.up = False
        self.client = DerpClient(
            url, server.private, mesh_key=mesh_key, watch_conns=True,
            on_frame=self._on_frame, on_state=self._on_state, backoff_max=MESH_BACKOFF_MAX_S,
        )

    def start(self) -> None:
        self.client.start()

    async def close(self) -> None:
        await self.client.close()
        if self.up:
            self._on_state(False)

    def forward(self, src: NodeKey, dst: NodeKey, packet: bytes) -> bool:
        return self.client.send_forward_nowait(src, dst, packet)

    def _on_state(self, up: bool) -> None:
        if up and self.client.server_key == self.server.key:
            log.warning("mesh peer %s is this server itself: dropping the link", self.url)
            self.server._loop.create_task(self.client.close())
            return
        self.up = up
        if not up:
            self.server._mesh_down(self)
        log.info("mesh link to %s %s", self.url, "up" if up else "down")

    def _on_frame(self, f: F.Frame) -> None:
        if isinstance(f, F.PeerPresent):
            self.server._mesh_present(self, f.key)
        elif isinstance(f, F.PeerGone):
            self.server._mesh_gone(self, f.key)
