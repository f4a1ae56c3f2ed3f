"""``relaymesh daemon``: the node daemon (control client, WireGuard engine, disco, local API)."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

import click

from relaymesh.cli._local import SOCKET_ENV, Fail
from relaymesh.wireguard.tun import check_ifname


@click.command("daemon")
@click.option("--state-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Keys (0600), node state and prefs; created if missing.")
@click.option("--socket", "socket_path", envvar=SOCKET_ENV,
              default="/run/relaymesh/relaymeshd.sock", show_default=True,
              type=click.Path(dir_okay=False, path_type=Path), help="Local API unix socket.")
@click.option("--tun", default="relaymesh0", show_default=True, help="TUN interface name.")
@click.option("--port", default=41641, show_default=True, type=click.IntRange(0, 65535),
              help="UDP port for WireGuard and disco (0: any free port).")
@click.option("--derp-node", default=None, metavar="NAME",
              help="Use this server (by its DERP map node name) in its region instead of the "
              "region's first one (operations, tests of meshed servers).")
@click.option("--metrics-listen", default=None, metavar="HOST:PORT",
              help="Serve Prometheus metrics (traffic by path; relay counters) on /metrics.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def command(state_dir: Path, socket_path: Path, tun: str, port: int, derp_node: str | None,
            metrics_listen: str | None, verbose: bool) -> None:
    """Run the node daemon in the foreground until SIGINT/SIGTERM."""
    from relaymesh.node.daemon import DaemonError, run

    try:
        check_ifname(tun)
    except ValueError as e:
        raise click.UsageError(f"--tun: {e}") from None
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    try:
        asyncio.run(run(state_dir, socket_path, tun, port, derp_node=derp_node,
                        metrics_listen=metrics_listen))
    except DaemonError as e:
        raise Fail(str(e)) from None
