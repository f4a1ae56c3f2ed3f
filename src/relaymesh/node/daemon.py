"""``relaymesh daemon``: wire state dir, backend and local API together; run until a signal.

Logs go to stderr and name nodes by name and short key; key material never reaches a log line.
The line ``relaymesh daemon: listening on PATH`` tells scripts and lab tests it is ready.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

from relaymesh.node import metrics
from relaymesh.node.backend import APIError, Backend
from relaymesh.node.localapi import SocketInUse, close, make_app, serve
from relaymesh.node.state import StateDir

log = logging.getLogger("relaymesh.daemon")

DEFAULT_SOCKET = Path("/run/relaymesh/relaymeshd.sock")
DEFAULT_PORT = 41641  # Tailscale's default; peers reach us here
DEFAULT_TUN = "relaymesh0"


class DaemonError(RuntimeError):
    """A startup failure the CLI prints as one line."""


async def run(state_dir: Path, socket_path: Path, tun: str, port: int, *,
              derp_node: str | None = None, metrics_listen: str | None = None) -> None:
    try:
        state = StateDir(state_dir)
    except RuntimeError as e:
        raise DaemonError(str(e)) from None
    backend = Backend(state, port=port, tun_name=tun, derp_node=derp_node)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        runner = await serve(make_app(backend), socket_path)
    except (SocketInUse, OSError) as e:
        raise DaemonError(f"local API socket: {e}") from None
    metrics_runner = None
    try:
        try:
            await backend.start()
        except APIError as e:
            raise DaemonError(e.message) from None
        if metrics_listen:
            host, _, mport = metrics_listen.rpartition(":")
            try:
                metrics_runner = await metrics.serve(backend.metrics, host.strip("[]") or "0.0.0.0",
                                                     int(mport))
            except (OSError, ValueError) as e:
                raise DaemonError(f"--metrics-listen {metrics_listen}: {e}") from None
            log.info("metrics on http://%s/metrics", metrics_listen)
        log.info("node %s, UDP port %d, state %s", state.node_key.node_public().short,
                 backend.port, state_dir)
        print(f"relaymesh daemon: listening on {socket_path}", flush=True)
        await stop.wait()
        log.info("shutting down")
    finally:
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        await close(runner, socket_path)
        await backend.close()
