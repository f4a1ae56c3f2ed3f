"""``relaymesh status``: this node and its peers (path, endpoint, traffic, handshake, online)."""

from __future__ import annotations

import json
import time
from typing import Any

import click

from relaymesh.cli._local import Fail, LocalClient, socket_option


def _ago(t: float | None, now: float) -> str:
    if t is None:
        return "never"
    s = max(0, int(now - t))
    return f"{s}s ago" if s < 120 else f"{s // 60}m ago" if s < 7200 else f"{s // 3600}h ago"


def _v4(addrs: list[str]) -> str:
    for a in addrs:
        if ":" not in a:
            return a.split("/")[0]
    return addrs[0].split("/")[0] if addrs else "-"


def _via(p: dict[str, Any]) -> str:
    """``direct ip:port`` or ``derp(region)`` (older daemons: path and endpoint)."""
    if p.get("via"):
        return str(p["via"])
    return " ".join(str(x) for x in (p.get("path"), p.get("endpoint")) if x) or "-"


def render(st: dict[str, Any], now: float) -> list[str]:
    """One line per node; the name and via columns are as wide as their longest entry, so a
    ``peer-relay NAME (ip:port, session N)`` never runs into the counters."""
    me = st.get("self") or {}
    peers = st.get("peers") or []
    relay = me.get("relay_server_port")
    name_w = max([20] + [len(str(n.get("name") or "-")) + 2 for n in [me, *peers]])
    via_w = max([32] + [len(_via(p)) + 2 for p in peers])
    lines = [f"{_v4(me.get('addresses') or []):<16}{me.get('name') or '-':<{name_w}}"
             f"{me.get('user') or '-':<12}self"
             + (f"  peer relay on UDP {relay}" if relay is not None else "")]
    for p in peers:
        lines.append(
            f"{_v4(p.get('addresses') or []):<16}{p.get('name') or '-':<{name_w}}"
            f"{_via(p):<{via_w}}"
            f"tx {p.get('tx_bytes', 0)} rx {p.get('rx_bytes', 0)}  "
            f"handshake {_ago(p.get('last_handshake'), now)}  "
            f"{'online' if p.get('online') else 'offline'}"
        )
    return lines


@click.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable status.")
@socket_option
def command(as_json: bool, socket_path: str) -> None:
    """Show this node and its peers."""
    st = LocalClient(socket_path).request("GET", "/local/v1/status")
    if as_json:
        click.echo(json.dumps(st, indent=2, sort_keys=True))
        return
    state = st.get("backend_state")
    if state == "NeedsLogin":
        raise Fail("logged out: run `relaymesh up --login-server URL --auth-key KEY`")
    if state == "Stopped":
        raise Fail("stopped: run `relaymesh up`")
    for line in render(st, time.time()):
        click.echo(line)
    ctl = st.get("control") or {}
    if not ctl.get("connected"):
        click.echo(f"# control server {ctl.get('login_server')} unreachable"
                   f"{': ' + ctl['last_error'] if ctl.get('last_error') else ''}; "
                   "the tunnel keeps the last map")
