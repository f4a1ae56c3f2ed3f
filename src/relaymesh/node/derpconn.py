"""The node's DERP connections: one to the home region, more on demand for peers homed elsewhere.

A peer is reached over DERP through ITS home region (it is connected there; servers of one region
mesh, so any server of that region will do). Our own home connection is what peers use to reach
us, so it is opened as soon as the DERP map is known (first region, before netcheck has measured
anything: a new node must be reachable at once) and moved when netcheck prefers another region.
Connections to other regions are opened on first use and closed after ``FOREIGN_IDLE_CLOSE`` of
silence. Each connection is a :class:`~relaymesh.derp.client.DerpClient` supervisor, which
redials with backoff (so a restarted DERP server is back within its 2 s backoff cap).

Which server of a region: ``pinned`` (the daemon's ``--derp-node NAME``, for operations and for the
meshed-servers test) if it names one of the region's nodes, else the region's first node. A map
node's ``server_key`` is pinned (the client refuses a server that proves another key).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from relaymesh.derp.client import DerpClient, node_url
from relaymesh.keys import KeyError_, NodeKey, PrivateKey

log = logging.getLogger("relaymesh.derp")

FOREIGN_IDLE_CLOSE = 60.0  # s: a connection to a non-home region nobody used this long closes

OnPacket = Callable[[int, NodeKey, bytes], None]  # (region, source node key, packet)


class DerpConns:
    def __init__(self, private: PrivateKey, on_packet: OnPacket, *, pinned: str | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._private = private
        self._on_packet = on_packet
        self.pinned = pinned
        self._clock = clock
        self.derp_map: dict[str, Any] = {}
        self.home = 0
        self._conns: dict[int, DerpClient] = {}
        self._last_used: dict[int, float] = {}
        self.sent = 0
        self.dropped = 0
        self.received = 0

    # -- map and home --------------------------------------------------------------------------

    def regions(self) -> dict[int, Mapping[str, Any]]:
        out: dict[int, Mapping[str, Any]] = {}
        for r in self.derp_map.get("regions") or []:
            try:
                out[int(r["id"])] = r
            except (KeyError, TypeError, ValueError):
                continue
        return out

    def set_map(self, derp_map: Mapping[str, Any]) -> None:
        """A new DERP map: drop connections to regions that vanished; keep the rest."""
        self.derp_map = dict(derp_map)
        regions = self.regions()
        for rid in [r for r in self._conns if r not in regions]:
            self._close(rid)
        if self.home not in regions:
            self.home = 0

    def set_home(self, region: int) -> None:
        if region == self.home or region not in self.regions():
            return
        old = self.home
        self.home = region
        self._ensure(region)
        if old and old in self._conns:
            self._last_used[old] = self._clock()  # becomes a foreign connection; idles out
        log.info("DERP home region %d (%s)", region, self.url(region))

    def node(self, region: int) -> Mapping[str, Any] | None:
        """The DERP map node (server) this node uses in ``region``."""
        r = self.regions().get(region)
        if r is None:
            return None
        nodes: list[Mapping[str, Any]] = list(r.get("nodes") or [])
        if not nodes:
            return None
        return next((n for n in nodes if self.pinned and n.get("name") == self.pinned), nodes[0])

    def url(self, region: int) -> str | None:
        n = self.node(region)
        return node_url(n) if n is not None else None

    def connected(self, region: int) -> bool:
        c = self._conns.get(region)
        return c is not None and c.connected

    # -- I/O -----------------------------------------------------------------------------------

    def send(self, node_key_raw: bytes, region: int, data: bytes) -> bool:
        """Event loop thread. Dropped (counted) when that region has no live connection yet."""
        c = self._conns.get(region) or self._ensure(region)
        if region != self.home:
            self._last_used[region] = self._clock()
        if c is None:
            self.dropped += 1
            return False
        try:
            ok = c.send_nowait(NodeKey(node_key_raw), data)
        except (KeyError_, ValueError):
            ok = False
        if ok:
            self.sent += 1
        else:
            self.dropped += 1
        return ok

    def tick(self) -> None:
        """Close idle foreign connections."""
        now = self._clock()
        for rid in [r for r, t in self._last_used.items()
                    if r != self.home and now - t > FOREIGN_IDLE_CLOSE]:
            self._close(rid)

    def _ensure(self, region: int) -> DerpClient | None:
        c = self._conns.get(region)
        if c is not None:
            return c
        node = self.node(region)
        if node is None:
            return None

        def on_packet(src: NodeKey, pkt: bytes, region: int = region) -> None:
            self.received += 1
            self._on_packet(region, src, pkt)

        try:  # pins the server key when the map gives one
            c = DerpClient.for_map_node(node, self._private, on_packet=on_packet,
                                        preferred=region == self.home)
        except (KeyError_, ValueError) as e:
            log.warning("DERP region %d: bad map node %r: %s", region, node.get("name"), e)
            return None
        c.start()
        self._conns[region] = c
        self._last_used[region] = self._clock()
        return c

    def _close(self, region: int) -> None:
        c = self._conns.pop(region, None)
        self._last_used.pop(region, None)
        if c is not None:
            task = asyncio.ensure_future(c.close())
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def close(self) -> None:
        """Close every connection and forget the map and home (``down``, logout, exit)."""
        self.derp_map = {}
        self.home = 0
        conns = list(self._conns.values())
        self._conns.clear()
        self._last_used.clear()
        for c in conns:
            with contextlib.suppress(Exception):
                await c.close()

    def status(self) -> dict[str, Any]:
        return {
            "home_region": self.home or None,
            "connections": {str(r): {"url": c.url.hostport, "connected": c.connected}
                            for r, c in sorted(self._conns.items())},
            "sent": self.sent, "dropped": self.dropped, "received": self.received,
        }
