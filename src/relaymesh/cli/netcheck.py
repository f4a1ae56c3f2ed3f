"""``relaymesh netcheck``: the daemon's view of the network (needs DERP and STUN: next issue)."""

from __future__ import annotations

import json

import click

from relaymesh.cli._local import LocalClient, socket_option


@click.command("netcheck")
@socket_option
def command(socket_path: str) -> None:
    """Report UDP reachability, NAT kind and DERP latencies."""
    r = LocalClient(socket_path).request("GET", "/local/v1/netcheck")
    click.echo(json.dumps(r, indent=2))
