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


def render_sessions(r: dict[str, Any]) -> list[str]:
    """One line per relay session: both ends by name and address, packets/bytes each way."""
    cands = ", ".join(r.get("candidates") or []) or "-"
    lines = [f"relay port {r.get('port')}, candidates {cands}"]
    sessions = r.get("sessions") or []
    if not sessions:
        lines.append("no sessions")
    for s in sessions:
        n0, n1 = (s.get("names") or ["?", "?"])[:2]
        a0, a1 = (x or "unbound" for x in (s.get("addrs") or [None, None])[:2])
        p0, p1 = (s.get("packets") or [0, 0])[:2]
        b0, b1 = (s.get("bytes") or [0, 0])[:2]
        kernel = " kernel" if s.get("kernel") else ""
        lines.append(f"session {s.get('session_id')} {s.get('state')}{kernel}: "
                     f"{n0} ({a0}) -> {n1} ({a1}) {p0} pkts {b0} B; "
                     f"{n1} -> {n0} {p1} pkts {b1} B")
    drops = (r.get("metrics") or {}).get("drops") or {}
    if drops:
        lines.append("drops: " + ", ".join(f"{k} {v}" for k, v in sorted(drops.items())))
    return lines


@command.command("peer-relay-sessions")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable sessions and metrics.")
@socket_option
def peer_relay_sessions(as_json: bool, socket_path: str) -> None:
    """Sessions of this node's peer relay, by node names and addresses, traffic each way."""
    r = LocalClient(socket_path).request("GET", "/local/v1/debug/peer-relay-sessions")
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    for line in render_sessions(dict(r)):
        click.echo(line)
