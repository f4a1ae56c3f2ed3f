"""`make demo`: a tailnet in network namespaces, shown step by step.

Today's story (issues 2-4): a coordination server and three nodes on the lab's internet join one
tailnet with an auth key, find each other on direct paths, and carry TCP through WireGuard; the
path table and per-path throughput are printed as `relaymesh status` sees them. The peer relay
and failover chapters join the story as issues 5-7 land (see docs/demo.md).

Root is needed for namespaces and TUN devices; without it the demo says so in one line and exits 2.
Everything it starts is torn down on exit, on error and on Ctrl-C (the lab owns every process).
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from relaymesh.lab import Lab, Topology
from relaymesh.lab.scenario import ECHO_PORT, ECHO_SERVER, Tailnet, until

NODES = ("a", "b", "c")
IPERF_SECONDS = 5
IPERF_PORT = 5201

console = Console(highlight=False)


@contextmanager
def step(title: str) -> Iterator[None]:
    t0 = time.monotonic()
    with console.status(f"[bold]{title}[/]"):
        yield
    console.print(f"[green]✓[/] {title} [dim]({time.monotonic() - t0:.1f} s)[/]")


def path_table(tn: Tailnet) -> Table:
    table = Table(title="paths as `relaymesh status` sees them")
    for col in ("from", "to", "tailnet address", "path", "endpoint"):
        table.add_column(col)
    for src in NODES:
        for p in sorted(tn.status(src)["peers"], key=lambda p: p["name"]):
            table.add_row(src, p["name"], p["addresses"][0], p["path"], escape(str(p["endpoint"])))
    return table


def iperf(tn: Tailnet, src: str, dst: str) -> float:
    """TCP throughput src -> dst through the tunnel, in Mbit/s."""
    server = tn.lab.spawn(dst, ["iperf3", "-s", "-1", "--forceflush", "-p", str(IPERF_PORT)],
                          name="iperf3-s")
    try:
        until(lambda: "Server listening" in server.output(), 10, "iperf3 server")
        cp = tn.lab.exec(src, ["iperf3", "-c", tn.ipv4(dst), "-p", str(IPERF_PORT), "-t",
                               str(IPERF_SECONDS), "-J"], timeout=IPERF_SECONDS + 30)
        result: dict[str, Any] = json.loads(cp.stdout)
        return float(result["end"]["sum_received"]["bits_per_second"]) / 1e6
    finally:
        server.stop()


def run(workdir: Path) -> None:
    topo = Topology("demo")
    for h in ("ctl", *NODES):
        topo.add_host(h)
    with Lab(topo, state_dir=None) as lab:
        tn = Tailnet(lab, workdir)
        with step("coordination server up (SQLite state)"):
            tn.start_control()
            tn.admin("users", "create", "alice")
            key = tn.new_key("--reusable")
        with step(f"nodes {', '.join(NODES)} joined with one auth key"):
            for n in NODES:
                lab.spawn(n, [sys.executable, "-c", ECHO_SERVER, str(ECHO_PORT)], name="echo")
                tn.start_daemon(n)
                tn.cli(n, "up", "--login-server", tn.url, "--auth-key", key, "--hostname", n)
        with step("every pair on a direct path"):
            until(lambda: tn.all_direct(NODES), 20, "direct paths")
        console.print(path_table(tn))
        ping = tn.cli("a", "ping", "b", "-c", "1").stdout.strip()
        console.print(f"[bold]relaymesh ping b[/] (from a): {escape(ping)}")
        rows = []
        for src, dst in (("a", "b"), ("b", "c")):
            with step(f"iperf3 {src} -> {dst} through WireGuard ({IPERF_SECONDS} s)"):
                mbit = iperf(tn, src, dst)
            path = {p["name"]: p["path"] for p in tn.status(src)["peers"]}[dst]
            rows.append((src, dst, path, mbit))
        summary = Table(title="summary")
        for col in ("pair", "path", "Mbit/s"):
            summary.add_column(col)
        for src, dst, path, mbit in rows:
            summary.add_row(f"{src} -> {dst}", path, f"{mbit:.0f}")
        console.print(summary)
        with step("tearing down"):
            pass  # the Lab context manager removes every namespace and process on exit
    leftovers = [ns for ns in os.listdir("/run/netns") if re.match(rf"rm-{lab.run_id}-", ns)] \
        if os.path.isdir("/run/netns") else []
    if leftovers:
        raise SystemExit(f"demo: left behind {leftovers}")


def main() -> int:
    if os.geteuid() != 0:
        print("relaymesh demo: needs root (network namespaces and TUN devices); "
              "run `sudo make demo`.", file=sys.stderr)
        return 2
    console.rule("[bold]relaymesh demo")
    try:
        with tempfile.TemporaryDirectory(prefix="relaymesh-demo-") as d:
            run(Path(d))
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: everything torn down[/]")
        return 130
    except Exception as e:  # one clear line, not a traceback; the lab is already torn down
        console.print(f"[red]demo failed:[/] {type(e).__name__}: {e}")
        return 1
    console.rule("[bold green]done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
