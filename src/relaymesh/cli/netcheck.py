"""``relaymesh netcheck``: the daemon checks the network over its own UDP socket (STUN + DERP).

Run through the daemon (not a fresh socket) so the global address shown is the mapping peers see
for this node's WireGuard port. Without a running daemon, ``python -m
relaymesh.magicsock.netcheck_io`` does a one-shot check from a fresh socket.
"""

from __future__ import annotations

import json

import click

from relaymesh.cli._local import LocalClient, socket_option
from relaymesh.magicsock.netcheck import Report

NETCHECK_TIMEOUT = 30.0  # s: STUN and HTTP probe timeouts plus slack


@click.command("netcheck")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
@socket_option
def command(as_json: bool, socket_path: str) -> None:
    """Report UDP reachability, global address, NAT mapping behaviour and DERP latencies."""
    r = LocalClient(socket_path).request("GET", "/local/v1/netcheck", timeout=NETCHECK_TIMEOUT)
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    click.echo(Report.from_dict(r).summary())
