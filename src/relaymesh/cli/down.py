"""``relaymesh down``: disconnect from the control server and remove the tunnel; keys stay."""

from __future__ import annotations

import click

from relaymesh.cli._local import LocalClient, socket_option


@click.command("down")
@socket_option
def command(socket_path: str) -> None:
    """Take the node off the tailnet until the next `relaymesh up`."""
    LocalClient(socket_path).request("POST", "/local/v1/down", {})
    click.echo("down")
