"""``relaymesh debug ...``: why the node does what it does (path choice per peer, relays)."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import click

from relaymesh.cli._local import LocalClient, socket_option


def render_path(rows: list[dict[str, Any]]) -> list[str]:
    """One line per candidate: state, latency, what it is, and why it is (not) used."""
    lines = [f"{'STATE':<12}{'LATENCY':>10}  {'CANDIDATE':<40}REASON"]
    for r in rows:
        lat = r.get("latency_ms")
        lat_s = "-" if lat is None else f"{lat:.1f} ms"
        lines.append(f"{r.get('state', '-'):<12}{lat_s:>10}  {r.get('candidate', '-'):<40}"
                     f"{r.get('reason', '')}")
    return lines


@click.group("debug")
def command() -> None:
    """Debugging views of the daemon's state."""


@command.command("path")
@click.argument("peer")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable rows.")
@socket_option
def path(peer: str, as_json: bool, socket_path: str) -> None:
    """Every candidate path to PEER, its state and latency, and why it is or is not used."""
    rows = LocalClient(socket_path).request("GET", f"/local/v1/debug/path?peer={quote(peer)}")
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for line in render_path(list(rows)):
        click.echo(line)


@command.command("peer-relay-sessions")
@socket_option
def peer_relay_sessions(socket_path: str) -> None:
    """Peer relay sessions this node holds (not available until peer relays land)."""
    r = LocalClient(socket_path).request("GET", "/local/v1/debug/peer-relay-sessions")
    click.echo(json.dumps(r, indent=2))
