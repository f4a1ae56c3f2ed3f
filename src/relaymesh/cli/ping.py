"""``relaymesh ping PEER``: a disco ping (not ICMP) that shows the path and its latency."""

from __future__ import annotations

import click

from relaymesh.cli._local import Fail, LocalClient, socket_option


@click.command("ping")
@click.argument("peer")
@click.option("-c", "--count", default=3, show_default=True, type=click.IntRange(1, 1000),
              help="Number of pings.")
@click.option("--timeout", default=5.0, show_default=True, type=click.FloatRange(0.1, 60),
              help="Seconds to wait for each pong.")
@socket_option
def command(peer: str, count: int, timeout: float, socket_path: str) -> None:
    """Ping PEER (a name or tailnet IP) over disco; prints the path each pong took."""
    r = LocalClient(socket_path).request(
        "POST", "/local/v1/ping", {"peer": peer, "count": count, "timeout": timeout},
        timeout=count * timeout + 10,
    )
    ok = 0
    for res in r.get("results") or []:
        if "error" in res:
            click.echo(res["error"])
            continue
        ok += 1
        # direct(ip:port), derp(region) or peer-relay(NAME ip:port session N): path and where
        path = "peer-relay" if res["path"] == "peer_relay" else res["path"]
        click.echo(f"pong from {res['peer']} ({res['ip']}) via {path}({res['detail']}) "
                   f"in {res['latency_ms']:.1f} ms")
    if ok == 0:
        raise Fail(f"no pong from {peer}")
