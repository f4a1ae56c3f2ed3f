"""Prometheus text exposition of the daemon's metrics (``relaymesh daemon --metrics-listen``).

Per-path traffic on every node (packets and bytes in and out, label ``path`` = direct,
peer_relay, derp: the same names as :class:`relaymesh.paths.Path`), the birthday-paradox port
spray's events (sprays, hits, misses, probes...) and open spray sockets, and, on a node that runs a
peer relay, the relay server's forwarded traffic, sessions by state and drops by reason.
:func:`render` is pure (a metrics dict in, text out); :func:`serve` runs it on a TCP port.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

PATHS = ("direct", "peer_relay", "derp")
CONTENT_TYPE = "text/plain; version=0.0.4"  # Prometheus text exposition format 0.0.4


def _label(v: object) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(m: dict[str, Any]) -> str:
    """The text format for ``Backend.metrics()``."""
    lines: list[str] = []
    paths = m.get("paths") or {}
    for unit in ("packets", "bytes"):
        name = f"relaymesh_path_{unit}_total"
        lines.append(f"# HELP {name} Tunnel {unit} by underlay path and direction.")
        lines.append(f"# TYPE {name} counter")
        for path in PATHS:
            for direction, key in (("in", "rx"), ("out", "tx")):
                v = int(paths.get(f"{path}_{key}_{unit}", 0))
                lines.append(f'{name}{{path="{path}",direction="{direction}"}} {v}')
    spray = m.get("spray")
    if isinstance(spray, dict):
        lines.append("# HELP relaymesh_spray_events_total Port spray events (docs/magicsock.md).")
        lines.append("# TYPE relaymesh_spray_events_total counter")
        for event, n in sorted(spray.items()):
            if event != "open_sockets":
                lines.append(f'relaymesh_spray_events_total{{event="{_label(event)}"}} {int(n)}')
        lines.append("# HELP relaymesh_spray_open_sockets Spray sockets open now.")
        lines.append("# TYPE relaymesh_spray_open_sockets gauge")
        lines.append(f"relaymesh_spray_open_sockets {int(spray.get('open_sockets', 0))}")
    relay = m.get("relay")
    if isinstance(relay, dict) and relay.get("running"):
        for unit in ("packets", "bytes"):
            name = f"relaymesh_relay_forwarded_{unit}_total"
            lines.append(f"# HELP {name} Peer relay: forwarded {unit} (userspace + kernel).")
            lines.append(f"# TYPE {name} counter")
            lines.append(f"{name} {int(relay.get(f'forwarded_{unit}', 0))}")
        lines.append("# HELP relaymesh_relay_sessions Peer relay sessions by state.")
        lines.append("# TYPE relaymesh_relay_sessions gauge")
        for state, n in sorted((relay.get("sessions_by_state") or {}).items()):
            lines.append(f'relaymesh_relay_sessions{{state="{_label(state)}"}} {int(n)}')
        lines.append("# HELP relaymesh_relay_drops_total Peer relay drops by reason.")
        lines.append("# TYPE relaymesh_relay_drops_total counter")
        for reason, n in sorted((relay.get("drops") or {}).items()):
            lines.append(f'relaymesh_relay_drops_total{{reason="{_label(reason)}"}} {int(n)}')
    return "\n".join(lines) + "\n"


async def serve(source: Callable[[], dict[str, Any]], host: str, port: int) -> web.AppRunner:
    """Serve ``GET /metrics`` on host:port; returns the runner (``await runner.cleanup()``)."""

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=render(source()).encode(),
                            headers={"Content-Type": CONTENT_TYPE})

    app = web.Application()
    app.router.add_get("/metrics", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
