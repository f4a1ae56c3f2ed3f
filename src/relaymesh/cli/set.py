"""``relaymesh set``: change preferences on a running daemon (stored in its state dir)."""

from __future__ import annotations

from typing import Any

import click

from relaymesh.cli._local import LocalClient, socket_option

PATH_POLICIES = ("auto", "no-direct", "no-relay")


@click.command("set")
@click.option("--hostname", help="Node name to report ('' = the host name).")
@click.option("--relay-server-port", metavar="N|''",
              help="Run a peer relay on UDP port N (0 = any free port), '' = off.")
@click.option("--relay-server-static-endpoints", metavar="IP:PORT,...",
              help="Extra relay endpoints to advertise, e.g. behind a 1:1 NAT or a load "
                   "balancer ('' = none).")
@click.option("--path-policy", "path_policy", multiple=True, metavar="PEER=POLICY",
              help="Per-peer path policy: auto, no-direct or no-relay (repeatable).")
@click.option("--advertise-tags", metavar="TAGS", help="Comma-separated tags for the next up.")
@socket_option
def command(hostname: str | None, relay_server_port: str | None,
            relay_server_static_endpoints: str | None, path_policy: tuple[str, ...],
            advertise_tags: str | None, socket_path: str) -> None:
    """Set one or more preferences."""
    patch: dict[str, Any] = {}
    if hostname is not None:
        patch["hostname"] = hostname
    if relay_server_port is not None:
        if relay_server_port.strip() == "":
            patch["relay_server_port"] = None
        else:
            try:
                port = int(relay_server_port)
            except ValueError:
                raise click.UsageError("--relay-server-port: a port number or ''") from None
            if not 0 <= port <= 65535:
                raise click.UsageError("--relay-server-port: 0..65535")
            patch["relay_server_port"] = port
    if relay_server_static_endpoints is not None:
        patch["relay_server_static_endpoints"] = [
            e.strip() for e in relay_server_static_endpoints.split(",") if e.strip()]
    if path_policy:
        pp: dict[str, str] = {}
        for item in path_policy:
            peer, sep, pol = item.partition("=")
            if not sep or not peer or pol not in PATH_POLICIES:
                raise click.UsageError(
                    f"--path-policy {item!r}: expected PEER=auto|no-direct|no-relay")
            pp[peer] = pol
        patch["path_policy"] = pp
    if advertise_tags is not None:
        patch["advertise_tags"] = [t.strip() for t in advertise_tags.split(",") if t.strip()]
    if not patch:
        raise click.UsageError("nothing to set; see `relaymesh set --help`")
    LocalClient(socket_path).request("PATCH", "/local/v1/prefs", patch)
