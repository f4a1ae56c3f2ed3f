"""``relaymesh get KEY``: print one preference stored by the daemon."""

from __future__ import annotations

import json

import click

from relaymesh.cli._local import Fail, LocalClient, socket_option


@click.command("get")
@click.argument("key")
@socket_option
def command(key: str, socket_path: str) -> None:
    """Print preference KEY (e.g. relay-server-port, hostname, path-policy)."""
    prefs = LocalClient(socket_path).request("GET", "/local/v1/prefs")
    name = key.replace("-", "_")
    if name not in prefs:
        raise Fail(f"unknown pref {key!r}; known: "
                   + ", ".join(sorted(k.replace("_", "-") for k in prefs)))
    v = prefs[name]
    if v is None:
        click.echo("")
    elif isinstance(v, str | int):
        click.echo(v)
    elif isinstance(v, list):
        click.echo(",".join(str(x) for x in v))
    else:
        click.echo(json.dumps(v, sort_keys=True))
