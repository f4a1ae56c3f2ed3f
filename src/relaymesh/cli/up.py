"""``relaymesh up``: join the tailnet (register with an auth key) or resume after ``down``."""

from __future__ import annotations

import click

from relaymesh.cli._local import LocalClient, socket_option

UP_TIMEOUT = 30.0  # s: registration plus waiting for the first network map


@click.command("up")
@click.option("--login-server", metavar="URL", help="The coordination server, http(s)://...")
@click.option("--auth-key", metavar="KEY", help="Pre-auth key (not needed for a known machine).")
@click.option("--hostname", help="Node name to request (default: the host name).")
@click.option("--advertise-tags", metavar="TAGS",
              help="Comma-separated tags to request, e.g. tag:relay,tag:web.")
@click.option("--relay-server-port", type=click.IntRange(0, 65535),
              help="Run a peer relay on this UDP port (0 = any free port).")
@socket_option
def command(login_server: str | None, auth_key: str | None, hostname: str | None,
            advertise_tags: str | None, relay_server_port: int | None, socket_path: str) -> None:
    """Connect to the tailnet and bring the tunnel up."""
    tags = None
    if advertise_tags is not None:
        tags = [t.strip() for t in advertise_tags.split(",") if t.strip()]
        bad = [t for t in tags if not t.startswith("tag:") or len(t) <= 4]
        if bad:
            raise click.UsageError(f"--advertise-tags: {bad[0]!r} is not tag:NAME")
    st = LocalClient(socket_path).request("POST", "/local/v1/up", {
        "login_server": login_server, "auth_key": auth_key, "hostname": hostname,
        "advertise_tags": tags, "relay_server_port": relay_server_port,
    }, timeout=UP_TIMEOUT)
    me = st.get("self") or {}
    click.echo(f"up: {me.get('name')} {' '.join(me.get('addresses') or [])} "
               f"({len(st.get('peers') or [])} peer(s))")
