"""``relaymesh ip``: this node's tailnet addresses."""

from __future__ import annotations

import click

from relaymesh.cli._local import Fail, LocalClient, socket_option


@click.command("ip")
@click.option("-4", "v4", is_flag=True, help="Only the IPv4 address.")
@click.option("-6", "v6", is_flag=True, help="Only the IPv6 address.")
@socket_option
def command(v4: bool, v6: bool, socket_path: str) -> None:
    """Print the node's tailnet IPv4 and IPv6 addresses, one per line."""
    if v4 and v6:
        raise click.UsageError("-4 and -6 are exclusive")
    r = LocalClient(socket_path).request("GET", "/local/v1/ip")
    keys = ["ipv4"] if v4 else ["ipv6"] if v6 else ["ipv4", "ipv6"]
    out = [r.get(k) for k in keys if r.get(k)]
    if not out:
        raise Fail(f"no {'IPv4' if v4 else 'IPv6' if v6 else ''} tailnet address".replace(
            "  ", " "))
    for a in out:
        click.echo(a)
